"""One process of a run under `MoTFSDP2Strategy` (gloo) that offers the strategy checkpoints to load, for
tests/test_security.py (launched like tests/dist_child.py, by its `_launch`).

    python tests/security_child.py SPEC.json

SPEC (JSON): out, tokenizer / llm / vit / vae (tiny part directories), devices, load (checkpoint paths). Once
the model is sharded and the optimizer built (at the start of training), the process saves a sharded
checkpoint of its own (`own.ckpt`), then calls `trainer.strategy.load_checkpoint` on it and on each path of
`load` in turn - the call every resume goes through, whichever way its path was chosen - and writes, per rank,
results.rank<r>.json: path -> "loaded" or "<error type>: <message>".
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch


class _Done(Exception):
    pass


class OfferCheckpoints(pl.Callback):
    def __init__(self, out: Path, paths: list[str]) -> None:
        self.out, self.paths = out, paths

    def on_train_start(self, trainer, pl_module) -> None:
        own = self.out / "own.ckpt"
        trainer.save_checkpoint(own)
        results = {}
        for p in [str(own), *self.paths]:
            try:
                trainer.strategy.load_checkpoint(p)
                results[p] = "loaded"
            except Exception as e:  # noqa: BLE001 - the result is what the test checks
                results[p] = f"{type(e).__name__}: {e}"
        (self.out / f"results.rank{trainer.global_rank}.json").write_text(json.dumps(results))
        raise _Done


def main(spec_path: str) -> None:
    from mogao.model.config import ModelConfig
    from mogao.training.module import InterleavedModule
    from mogao.training.strategies import MoTFSDP2Strategy

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = ModelConfig(llm=spec["llm"], vit=spec["vit"], autoencoder=spec["vae"], latent_patch=2)
    module = InterleavedModule(model=cfg, tokenizer=spec["tokenizer"], train=["und"],
                               optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    trainer = pl.Trainer(accelerator="cpu", devices=spec["devices"],
                         strategy=MoTFSDP2Strategy(activation_checkpointing=False), max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[OfferCheckpoints(out, spec["load"])], default_root_dir=str(out))
    loader = torch.utils.data.DataLoader([0], batch_size=None)
    try:
        trainer.fit(module, train_dataloaders=loader)
    except _Done:
        pass


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1])
