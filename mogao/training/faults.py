"""Numerical-fault policy of a training run, and the one writer of per-rank JSON reports.

A non-finite loss (checked before backward) or a non-finite total gradient norm of the trainable parameters
(checked before the optimizer step) is logged with the step and the batch's sample ids, counted and recorded in
`<run dir>/numerical_faults.json`; with policy "skip" the step makes no update. Too many consecutive faults (or
any, with "stop") stop the run with a `NumericalError`. The data module's `data_faults.json` is written by the
same `write_rank_report`.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

from mogao.errors import ConfigError, NumericalError
from mogao.training.rundir import run_dir

log = logging.getLogger(__name__)

NonFinite = Literal["skip", "stop"]
MAX_FAULT_RECORDS = 100  # faults listed in numerical_faults.json and checkpoints (the counts are complete)
ELSEWHERE = "finite on this rank, non-finite on another"
_KIND = {"loss": "loss", "grad_norm": "gradient norm"}


def rank_report_path(trainer: Any, stem: str) -> Path:
    """`<run dir>/<stem>.json` on the first process, `<stem>.rank<k>.json` on process k."""
    rank = trainer.global_rank
    return run_dir(trainer) / (f"{stem}.json" if rank == 0 else f"{stem}.rank{rank}.json")


def write_rank_report(path: Path, report: dict[str, Any]) -> Path:
    """Write `report` as JSON to `path` whole (a temporary file renamed onto it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    return path


def sample_ids_text(ids: list[str], shown: int = 8) -> str:
    """Sample ids for a log line: the first few and how many more."""
    text = ", ".join(repr(i) for i in ids[:shown])
    return f"[{text}{f', ... ({len(ids) - shown} more)' if len(ids) > shown else ''}]"


class NumericalFaults:
    """Counts, records and rules on the non-finite steps of a run (state saved in checkpoints)."""

    def __init__(self, policy: NonFinite = "skip", max_consecutive: int = 5) -> None:
        if policy not in ("skip", "stop"):
            raise ConfigError(f"model.nonfinite must be 'skip' or 'stop', got {policy!r}")
        if max_consecutive < 1:
            raise ConfigError(f"model.max_nonfinite_consecutive must be >= 1, got {max_consecutive}")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.steps = 0  # faults so far (a step with a bad loss and bad gradients counts once)
        self.records: list[dict[str, Any]] = []  # the first MAX_FAULT_RECORDS faults
        self.consecutive: list[dict[str, Any]] = []  # the current run of consecutive faults

    def state_dict(self) -> dict[str, Any]:
        return {"nonfinite_steps": self.steps, "faults": self.records, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("nonfinite_steps", 0))
        self.records = [dict(r) for r in state.get("faults", [])]
        self.consecutive = [dict(r) for r in state.get("consecutive", [])]

    def step_ok(self) -> None:
        """An optimizer step made its update: the run of consecutive faults ends."""
        self.consecutive = []

    def record(self, trainer: Any, kind: str, value: float | str, batch_info: dict[str, Any]) -> None:
        """Count and record a non-finite loss or gradient norm of the step being taken, write the report, and
        raise `NumericalError` when the policy says the run must stop."""
        step = trainer.global_step + 1  # the optimizer step being taken (as numbered in metrics.jsonl)
        rec = {"step": step, "kind": kind, "value": str(value), **copy.deepcopy(batch_info)}
        last = self.consecutive[-1] if self.consecutive else None
        if last is not None and last["step"] == step:  # another micro-batch of the same step: still one fault
            last["sample_ids"] += [i for i in rec["sample_ids"] if i not in last["sample_ids"]]
            if kind not in last["kind"].split("+"):
                last["kind"] += f"+{kind}"
                last["value"] += f", {value}"
        else:
            self.steps += 1
            self.consecutive.append(rec)
            if len(self.records) < MAX_FAULT_RECORDS:
                self.records.append(rec)
        log.warning("non-finite %s (%s) at step %d on samples %s (source %r); %s", _KIND[kind], value, step,
                    sample_ids_text(rec["sample_ids"]), rec["source"],
                    "stopping" if self.must_stop() else "the step makes no update")
        path = self.write(trainer)
        if self.must_stop():
            raise NumericalError(self.stop_message(path))

    def must_stop(self) -> bool:
        return self.policy == "stop" or len(self.consecutive) >= self.max_consecutive

    def stop_message(self, path: Path | None) -> str:
        if self.policy == "stop":
            head = ("training stopped at a non-finite value (model.init_args.nonfinite='stop'; 'skip' skips "
                    "such steps):")
        else:
            head = (f"training stopped: {len(self.consecutive)} consecutive steps had a non-finite loss or "
                    f"gradient norm (model.init_args.max_nonfinite_consecutive={self.max_consecutive}):")
        lines = [head]
        for r in self.consecutive[-10:]:
            what = " and ".join(_KIND[k] for k in r["kind"].split("+"))
            lines.append(f"  step {r['step']}: {what} = {r['value']} on samples {sample_ids_text(r['sample_ids'])} "
                         f"(source {r['source']!r})")
        recorded = f"; every fault is recorded in {path}" if path else ""
        lines.append("Lower the learning rate (model.init_args.optimizer.init_args.lr) or add warm-up, clip "
                     "gradients (trainer.gradient_clip_val), train in bf16 or fp32 rather than fp16, or "
                     f"check the samples listed{recorded}.")
        return "\n".join(lines)

    def report(self) -> dict[str, Any]:
        """The numerical faults of this run so far (continued across resumes)."""
        return {"policy": self.policy, "max_nonfinite_consecutive": self.max_consecutive,
                "nonfinite_steps": self.steps, "consecutive": len(self.consecutive), "faults": self.records}

    def write(self, trainer: Any) -> Path | None:
        """Write `report()` to `<run dir>/numerical_faults.json` (one file per process)."""
        if trainer is None:
            return None
        path = rank_report_path(trainer, "numerical_faults")
        try:
            return write_rank_report(path, self.report())
        except OSError as e:  # a report that cannot be written must not stop training
            log.warning("could not write %s: %s", path, e)
            return None
