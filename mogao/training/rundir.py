"""The directory a run writes to, known on every rank without a collective after the first call.

Lightning's `trainer.log_dir` broadcasts rank 0's answer (a logger's version folder can differ between ranks
that list the disk at different moments), so it is a collective: reached on one rank only, it pairs with some
other collective on the rest and the ranks deadlock. `run_dir` asks it once, from a hook every rank runs
(`MogaoModule.setup`, and any other first caller that every rank reaches), and caches the answer on the trainer.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

_ATTR = "_mogao_run_dir"


def run_dir(trainer: pl.Trainer) -> Path:
    """The logger's log_dir, else `default_root_dir`; a broadcast on the first call per trainer (every rank
    must make that call), a cached value afterwards."""
    cached = trainer.__dict__.get(_ATTR)
    if cached is None:
        cached = Path(trainer.log_dir or trainer.default_root_dir)
        trainer.__dict__[_ATTR] = cached
    return cached
