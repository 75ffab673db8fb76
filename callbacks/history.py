"""`MetricsHistory`: every training step's losses and every validation's metrics as JSON lines in the run
directory (`metrics.jsonl`), for reports, plots and resume checks. On resume the rows logged after the
checkpoint (by a run that was then killed) are dropped, so the file always describes one consistent run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from mogao.training.rundir import read_history, run_dir


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsHistory(pl.Callback):
    """Append one JSON line per training step ("kind": "train") and per validation ("kind": "val")."""

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename
        self.path: Path | None = None
        self._t0 = time.perf_counter()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        run_dir(trainer)  # every rank: the first call is a broadcast

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:  # (on_train_start: the resumed global step is known here)
            return
        self.path = run_dir(trainer) / self.filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        step = trainer.global_step
        kept = [r for r in read_history(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self._t0 = time.perf_counter()

    def _write(self, row: dict[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        row = {"kind": "train", "step": trainer.global_step, "epoch": trainer.current_epoch,
               "time": round(time.perf_counter() - self._t0, 3)}
        row.update(getattr(pl_module, "last_metrics", {}))
        if trainer.optimizers:  # the optimizer's rate, before a part's `lr_scale`
            group = trainer.optimizers[0].param_groups[0]
            scale = pl_module.lr_scale_of(group.get("part")) if hasattr(pl_module, "lr_scale_of") else 1.0
            row["lr"] = group["lr"] / scale
        self._write(row)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        vals = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if vals:
            self._write({"kind": "val", "step": trainer.global_step, **vals})
