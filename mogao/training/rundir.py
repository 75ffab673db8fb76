"""The directory a run writes to, known on every rank without a collective after the first call.

Lightning's `trainer.log_dir` broadcasts rank 0's answer (a logger's version folder can differ between ranks
that list the disk at different moments), so it is a collective: reached on one rank only, it pairs with some
other collective on the rest and the ranks deadlock. `run_dir` asks it once, from a hook every rank runs
(`MogaoModule.setup`, and any other first caller that every rank reaches), and caches the answer on the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this training step's logs (its `log_every_n_steps`), or it is the last step: the
    steps where per-step metrics need logging at all (a `log_dict` costs a few ms on a CPU, a tenth of a tiny
    model's step). Asked in `on_train_batch_end` or `training_step`; the same answer on every rank, so a
    collective behind it is reached by all or none."""
    if trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps:
        return True
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def cached_run_dir(trainer: Any) -> Path | None:
    """`run_dir`'s answer when it is known already (no collective), else None: for code that may run on one
    rank alone or outside the main thread (fault reports, the collective watchdog)."""
    cached = getattr(trainer, "__dict__", {}).get(_ATTR)
    return Path(cached) if cached is not None else None


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` (an empty list when absent); a torn last line is ignored."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows
