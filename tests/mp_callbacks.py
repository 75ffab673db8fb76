"""Callbacks the multi-process tests add to shipped recipes from the command line (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    """Send `signal` to this process on rank `rank` once the optimizer step `step` has ended (as a scheduler's
    pre-emption notice reaches one process of a job)."""

    def __init__(self, step: int, rank: int = 0, signal: str = "SIGUSR1") -> None:
        self.step, self.rank, self.signal = step, rank, signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signal, self.signal))
