"""One process of a 2-rank FSDP2 run (gloo) for tests/model/test_meta_init.py, launched as torchrun would (env
MASTER_ADDR/MASTER_PORT/WORLD_SIZE/NODE_RANK/LOCAL_RANK).

    python tests/meta_init_child.py SPEC.json

SPEC (JSON): out (directory), tokenizer / llm / vit / vae (tiny part directories), saved (a saved mogao model
directory), runs (names among "normal": `load_model(cfg)` in `__init__`; "meta": `meta_init` from the parts;
"saved_meta": `meta_init` from `saved`).

For each run, one training step on a fixed global batch (rank r packs samples r, r + 2, ...). Writes, per run:
state.<run>.pt (rank 0: the full state dict gathered after setup, before the step) and
<run>.rank<r>.json: the first step's loss, the parameter bytes held after `__init__` (non-meta storage) and
after setup (local shards), the global parameter bytes, and (meta runs) the rows read per checkpoint tensor.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_child import GLOBAL, GlobalBatches  # noqa: E402


def param_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of parameter storage this process holds, bytes of the whole model's parameters)."""
    local = total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        if not p.is_meta:
            t = p.to_local() if hasattr(p, "to_local") else p
            local += t.numel() * t.element_size()
    return local, total


class Record(pl.Callback):
    def __init__(self, out: Path, run: str, after_init: int) -> None:
        self.out, self.run = out, run
        self.report: dict = {"after_init_bytes": after_init}

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        local, total = param_bytes(pl_module.model)
        self.report.update(params=len(list(pl_module.model.parameters())), after_setup_bytes=local,
                           total_bytes=total, row_bytes=sum(
            p.numel() // p.shape[0] * p.element_size() for p in pl_module.model.parameters() if p.dim()))
        load = getattr(pl_module, "weight_load_report", None)
        if load is not None:
            self.report["reads"] = {k: v for k, v in load.reads.items()}
            self.report["whole"] = load.whole
        state = get_model_state_dict(pl_module.model, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
        if trainer.global_rank == 0:
            torch.save(state, self.out / f"state.{self.run}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.report["loss"] = pl_module.last_metrics["loss"]
        (self.out / f"{self.run}.rank{trainer.global_rank}.json").write_text(json.dumps(self.report))


def run(spec: dict, name: str) -> None:
    from mogao.data.shapes_mini import interleaved_samples
    from mogao.model.config import ModelConfig
    from mogao.training.module import InterleavedModule
    from mogao.training.strategies import MoTFSDP2Strategy

    out = Path(spec["out"])
    torch.manual_seed(0)
    if name == "saved_meta":
        module = InterleavedModule(tokenizer=spec["tokenizer"], init_from=spec["saved"], train=["und", "gen"],
                                   meta_init=True)
    else:
        cfg = ModelConfig(llm=spec["llm"], vit=spec["vit"], autoencoder=spec["vae"], latent_patch=2)
        module = InterleavedModule(model=cfg, tokenizer=spec["tokenizer"], train=["und", "gen"],
                                   meta_init=name == "meta")
    record = Record(out, name, param_bytes(module.model)[0])
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=MoTFSDP2Strategy(activation_checkpointing=False),
                         max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[record], default_root_dir=str(out))
    dicts = interleaved_samples(GLOBAL, seed=5, max_targets=2)
    loader = torch.utils.data.DataLoader(GlobalBatches(module, dicts, trainer), batch_size=None,
                                         collate_fn=lambda b: b)
    module.on_fit_end = lambda: None
    trainer.fit(module, train_dataloaders=loader)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name in spec["runs"]:
        run(spec, name)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
