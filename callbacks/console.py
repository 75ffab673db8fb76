"""What a run shows on the console: a progress bar counted in optimizer steps (`step / max_steps`, also on a
resumed run) and a parameter summary by named model part (what this stage trains), in place of Lightning's
epoch bar ("Epoch 0/-2" on the endless packed stream) and its module table (whose FLOPs column reads 0 without
an example input)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from mogao.training.parts import part_parameters


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, its train bar counting `trainer.global_step` up to `trainer.max_steps`."""

    @property
    def total_train_batches(self) -> int | float:
        max_steps = self.trainer.max_steps
        return max_steps if max_steps and max_steps > 0 else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.train_progress_bar_id is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.train_progress_bar_id is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)
            self.refresh()


def part_rows(model: Any) -> list[tuple[str, int, int]]:
    """(part, parameters, trainable parameters) of each named part of a `MogaoModel`, then the frozen rest
    (the autoencoder) as "other"."""
    groups = part_parameters(model)
    rows = [(name, sum(p.numel() for p in ps.values()), sum(p.numel() for p in ps.values() if p.requires_grad))
            for name, ps in groups.items()]
    seen = {id(p) for ps in groups.values() for p in ps.values()}
    rest = [p for p in model.parameters() if id(p) not in seen]
    rows.append(("other", sum(p.numel() for p in rest), sum(p.numel() for p in rest if p.requires_grad)))
    return rows


class PartsSummary(ModelSummary):
    """At fit start (first process): each model part's parameters and how many train in this stage."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not trainer.is_global_zero or model is None:
            return
        rows = part_rows(model)
        total, trainable = sum(r[1] for r in rows), sum(r[2] for r in rows)
        lines = [f"[mogao] model: {get_human_readable_count(total)} parameters, "
                 f"{get_human_readable_count(trainable)} trained in this stage"]
        for name, n, t in rows:
            if n:
                lines.append(f"  {name:<10} {get_human_readable_count(n):>8}  "
                             f"{'trained' if t == n else 'frozen' if t == 0 else get_human_readable_count(t) + ' trained'}")
        print("\n".join(lines), flush=True)
