"""One process of a distributed (or single-process) training run of a tiny Mogao model, for
tests/training/test_distributed.py. Launched like `torchrun` would: env MASTER_ADDR/MASTER_PORT/WORLD_SIZE/NODE_RANK/
LOCAL_RANK for two ranks, nothing for one.

    python tests/dist_child.py SPEC.json

SPEC (JSON): out (directory), tokenizer / llm / vit / vae (tiny part directories), strategy ("fsdp2", "ddp" or
"single"), devices, steps, save_at (step after which a sharded checkpoint `step<k>.ckpt` is written), unfreeze_at
(step at which the generation expert starts training), resume (checkpoint to continue from, or null),
broadcast_from_rank0, train (parts trained at the start, default ["und"]), data ("interleaved", the default, or
"lopsided": `lopsided_samples`).

Each step trains on a fixed global batch of `GLOBAL` samples: rank r of R packs the samples r, r + R, ... of
it, so one process packs them all. Writes, per rank: losses.rank<r>.json (step -> this rank's loss), and, for
steps 1 and the last, memory.rank<r>.step<k>.json (gradient / optimizer-state counts of frozen and trainable
parameters); at the end
`final.ckpt` and, on rank 0, outputs.pt (the trained model's loss terms and logits on a probe batch).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import IterableDataset

GLOBAL = 4  # samples per global batch


def make_plans(tokenizer, dicts: list[dict], indices: list[int], vae_patch: int):
    from mogao.data import DataConfig, lower_sample, samples_from_dicts

    cfg = DataConfig(token_budget=4096, max_image_tokens=16, vit_patch=4, vae_patch=vae_patch, p_drop_text=0.0,
                     p_drop_images=0.0)
    samples = samples_from_dicts([dicts[i] for i in indices])
    return [lower_sample(s, tokenizer, cfg, index=i) for s, i in zip(samples, indices)]


LOPSIDED = [  # (rank 0's two samples, rank 1's two samples) of each global batch
    (("t2i", "t2i"), ("vqa", "vqa")),  # generation targets | no generation target
    (("vqa", "text"), ("vqa", "vqa")),  # no generation target on any rank
    (("text", "text"), ("edit", "edit")),  # text only, no image (connector unused) | condition images and targets
    (("t2i_quiet", "t2i_quiet"), ("text", "t2i")),  # captions without text loss | text only and text-to-image
]


def lopsided_samples(steps: int) -> list[dict]:
    """Global batches whose two ranks' shares hold different kinds of samples (`LOPSIDED`, in a cycle), so that
    parameters some batches leave unused differ between ranks and steps. Sample i of global batch t goes to rank
    i % 2 (`GlobalBatches`), one process packs all four."""
    from mogao.data.shapes_mini import draw_shape

    def sample(kind: str, i: int) -> dict:
        colour, other = ("red", "blue") if i % 2 else ("green", "yellow")
        shape = ("circle", "square", "triangle")[i % 3]
        img, img2 = draw_shape(shape, colour), draw_shape(shape, other)
        segs = {"t2i": [{"text": f"Draw a {colour} {shape}."}, {"image": img, "generate": True}],
                "t2i_quiet": [{"text": f"Draw a {colour} {shape}.", "loss": False}, {"image": img, "generate": True}],
                "vqa": [{"image": img}, {"text": "What is it?", "loss": False}, {"text": f"It is a {colour} {shape}."}],
                "text": [{"text": f"Now make it {other}."}, {"text": f"It is a {other} {shape}."}],
                "edit": [{"image": img}, {"text": f"Now make it {other}.", "loss": False},
                         {"image": img2, "generate": True}]}[kind]
        return {"id": f"{kind}-{i}", "segments": segs}

    out = []
    for t in range(steps):
        r0, r1 = LOPSIDED[t % len(LOPSIDED)]
        out += [sample(k, len(out) + j) for j, k in enumerate((r0[0], r1[0], r0[1], r1[1]))]
    return out


class GlobalBatches(IterableDataset):
    """This rank's share of global batch t, for t from the trainer's current step on (so a resumed run
    continues with the next global batch)."""

    def __init__(self, module, dicts: list[dict], trainer: pl.Trainer) -> None:
        self.module, self.dicts, self.trainer = module, dicts, trainer

    def __iter__(self):
        from mogao.data import collate_plans

        rank, world = self.trainer.global_rank, self.trainer.world_size
        step = self.trainer.global_step
        while (step + 1) * GLOBAL <= len(self.dicts):
            idx = list(range(step * GLOBAL, (step + 1) * GLOBAL))[rank::world]
            plans = make_plans(self.module.tokenizer, self.dicts, idx, self.module.model.vae_patch)
            yield collate_plans(plans, 4096)
            step += 1


class Probe(pl.Callback):
    def __init__(self, out: Path, save_at: int, unfreeze_at: int) -> None:
        self.out, self.save_at, self.unfreeze_at = out, save_at, unfreeze_at
        self.losses: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.unfreeze_at:
            pl_module.set_train_parts([*pl_module.train_parts, "gen"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        self.losses[step] = pl_module.last_metrics["loss"]
        if step in (1, trainer.max_steps):
            (self.out / f"memory.rank{trainer.global_rank}.step{step}.json").write_text(json.dumps(memory_report(
                pl_module, trainer.optimizers[0])))
        if step == self.save_at:
            trainer.save_checkpoint(self.out / f"step{step}.ckpt")

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out / f"losses.rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))


def _local_numel(t: torch.Tensor) -> int:
    return int(t.to_local().numel()) if hasattr(t, "to_local") else int(t.numel())


def memory_report(module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Counts (local shards) of gradients and optimizer state, by frozen / trainable parameter."""
    with_state = {id(p) for p, s in optimizer.state.items() if s}
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    report = {"frozen_params": 0, "frozen_with_grad": 0, "frozen_with_state": 0, "frozen_in_optimizer": 0,
              "trainable_params": 0, "trainable_with_grad": 0, "trainable_with_state": 0, "vae_params": 0,
              "state_numel": 0, "grad_numel": 0, "trainable_numel": 0}
    vae = {id(p) for p in module.model.autoencoder.parameters()}
    for p in module.model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        report[f"{kind}_params"] += 1
        report[f"{kind}_with_grad"] += p.grad is not None
        report[f"{kind}_with_state"] += id(p) in with_state
        report["vae_params"] += id(p) in vae
        if kind == "frozen":
            report["frozen_in_optimizer"] += id(p) in in_groups
        else:
            report["trainable_numel"] += _local_numel(p)
        if p.grad is not None:
            report["grad_numel"] += _local_numel(p.grad)
    for s in optimizer.state.values():
        report["state_numel"] += sum(_local_numel(v) for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return report


def main(spec_path: str) -> None:
    from mogao.data.shapes_mini import interleaved_samples
    from mogao.model.config import ModelConfig
    from mogao.training.module import InterleavedModule
    from mogao.training.strategies import MoTFSDP2Strategy

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = ModelConfig(llm=spec["llm"], vit=spec["vit"], autoencoder=spec["vae"], latent_patch=2)
    lora = None
    if spec.get("lora"):  # adapters on both experts instead of training the understanding expert
        from mogao.lora import LoraSpec

        lora = LoraSpec(und=["q_proj", "v_proj"], gen=["q_proj", "down_proj"], rank=4, alpha=8)
    train = spec.get("train", ["und"])
    module = InterleavedModule(model=cfg, tokenizer=spec["tokenizer"], train=None if lora else train, lora=lora,
                               optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01))
    if spec["strategy"] == "fsdp2":
        strategy = MoTFSDP2Strategy(activation_checkpointing=True,
                                    broadcast_from_rank0=bool(spec.get("broadcast_from_rank0", False)))
    elif spec["strategy"] == "ddp":
        strategy = "ddp"  # the plain Lightning strategy, as `--trainer.strategy=ddp` gives it
    else:
        strategy = "auto"
    probe = Probe(out, spec["save_at"], spec["unfreeze_at"])
    from callbacks.ema import EMA
    from callbacks.throughput import Throughput

    trainer = pl.Trainer(accelerator="cpu", devices=spec["devices"], strategy=strategy, max_steps=spec["steps"],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[EMA(decay=0.5), probe, Throughput(window=1)],  # EMA first: probe saves after its update
                         default_root_dir=str(out))
    if spec.get("data", "interleaved") == "lopsided":
        dicts = lopsided_samples(spec["steps"])
    else:
        dicts = interleaved_samples(GLOBAL * spec["steps"], seed=5, max_targets=2)
    loader = torch.utils.data.DataLoader(GlobalBatches(module, dicts, trainer), batch_size=None,
                                         collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=spec.get("resume"))
    trainer.save_checkpoint(out / "final.ckpt")
    tflops = trainer.callback_metrics.get("throughput/tflops_per_sec")
    from mogao.data import collate_plans

    probe_batch = collate_plans(make_plans(module.tokenizer, dicts, [0, 1, 2], module.model.vae_patch), 4096)
    with torch.no_grad():
        o = module.model(probe_batch, return_logits=True)
    if trainer.global_rank == 0:
        torch.save({"text_sum": o.terms.text_sum, "image_sum": o.terms.image_sum, "logits": o.text_logits,
                    "tflops_logged": None if tflops is None else float(tflops)}, out / "outputs.pt")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
