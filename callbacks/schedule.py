"""`CurriculumSchedule`: what changes inside a stage, by optimizer step - data-mixture weights, image resolution
(max tokens per image), which parts train (unfreezing), the timestep shift and the loss weights.

Each milestone says what holds from its step on; values not named carry over from earlier milestones (or the
stage's configuration before the first). Data-side values (mixture, resolution) are handed to the data module as
piecewise-constant schedules over batch index, so the data stream stays a pure function of the position and a
resumed run sees exactly the batches an uninterrupted one would. Model-side values are applied at the start of
the step they name (and again on resume).

One approximation: samples the packer had already read ahead when the resolution changes keep the old
resolution in an uninterrupted run, but are lowered again at the new one by a run resumed from a checkpoint
taken in that short window (at most `data.lookahead` samples per source).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl

from mogao.errors import ConfigError


@dataclass
class Milestone:
    """What holds from optimizer step `step` on (None: unchanged)."""

    step: int
    """Optimizer step (0-based: 0 = the first step of the stage)."""
    mixture: dict[str, float] | None = None
    """Data-mixture weights by source name."""
    max_image_tokens: int | None = None
    """Most tokens of one image copy (the resolution)."""
    train: list[str] | None = None
    """Parts that train from here on (und, gen, vit, connector)."""
    shift: float | None = None
    """Fixed timestep shift of the flow-matching σ draw (1 = none)."""
    lambda_text: float | None = None
    """Weight of the text loss."""
    lambda_image: float | None = None
    """Weight of the image loss."""


class CurriculumSchedule(pl.Callback):
    """Apply `milestones` (see the module docstring)."""

    def __init__(self, milestones: list[Milestone]) -> None:
        steps = [m.step for m in milestones]
        if any(s < 0 for s in steps) or len(set(steps)) != len(steps):
            raise ConfigError(f"CurriculumSchedule: milestone steps must be distinct and >= 0, got {steps}")
        self.milestones = sorted(milestones, key=lambda m: m.step)
        self._applied: dict[str, Any] = {}

    def state_at(self, step: int) -> dict[str, Any]:
        """Model-side values in force at `step` (only those some milestone <= step sets)."""
        state: dict[str, Any] = {}
        for m in self.milestones:
            if m.step > step:
                break
            for key in ("train", "shift", "lambda_text", "lambda_image"):
                value = getattr(m, key)
                if value is not None:
                    state[key] = value
        return state

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        mixture = [(m.step, m.mixture) for m in self.milestones if m.mixture is not None]
        resolution = [(m.step, m.max_image_tokens) for m in self.milestones if m.max_image_tokens is not None]
        if (mixture or resolution) and (dm is None or not hasattr(dm, "set_schedules")):
            raise ConfigError("CurriculumSchedule: mixture/resolution milestones need a MogaoDataModule")
        if dm is not None and hasattr(dm, "set_schedules"):
            dm.set_schedules(mixture, resolution, accumulate=trainer.accumulate_grad_batches)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        state = self.state_at(step)
        for key, value in state.items():
            if self._applied.get(key) == value:
                continue
            if key == "train":
                pl_module.set_train_parts(list(value))
            elif key == "shift":
                pl_module.model.cfg.timestep_sampling.shift = float(value)
            else:
                setattr(pl_module, key, float(value))
            self._applied[key] = value

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._applied = {}
        self._apply(trainer, pl_module, trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply(trainer, pl_module, trainer.global_step)
