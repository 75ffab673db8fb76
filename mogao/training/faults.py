"""Faults of a training run: the numerical-fault policy, the collective watchdog of multi-process runs, a
fault-injection hook for tests, and the one writer of per-rank JSON reports.

Numerical faults. A non-finite loss (checked before backward) or a non-finite total gradient norm of the
trainable parameters (checked before the optimizer step) is logged with the step and the batch's sample ids,
counted and recorded in `<run dir>/numerical_faults.json`; with policy "skip" the step makes no update. Too
many consecutive faults (or any, with "stop") stop the run with a `NumericalError`. The data module's
`data_faults.json` is written by the same `write_rank_report`.

A rank that hangs. `CollectiveWatchdog` (a callback every `mogao fit` gets; active with more than one process)
runs a thread in each process that knows the step, where in it the process is (forward, backward, optimizer
step, the callbacks at its end, validation) and the collective it is in: every `torch.distributed` collective
called from Python is timed (the gradient all-reduce of DDP and FSDP's collectives run inside torch and are
covered by timing the forward, backward and optimizer step of each training step instead). When one rank has
waited `timeout` seconds in a collective (or spent `timeout` plus half the backstop margin in one part of a
step), the watchdog reads the other ranks' heartbeats (each rank publishes its state to the process group's
store every few seconds), names the rank(s) that have not reached the collective, writes the report to
`<run dir>/watchdog.json` (`watchdog.rank<k>.json` on process k; one event per firing, kept across
restarts), prints it, and ends the process with `HANG_EXIT_STATUS` so that the launcher (torchrun
--max-restarts, a requeued SLURM job) restarts the group, which resumes from the last complete checkpoint. A
collective that fails instead (a peer died: "Connection closed by peer", a timeout raised by the backend) is
recorded the same way by `on_exception`, and the error then ends the process.

Fault injection (a test hook, inert unless `MOGAO_FAULT` is set): `MOGAO_FAULT` holds faults separated by
";", each `ACTION:key=value,...`:

    kill:rank=1,step=5,delay=0.1     SIGKILL rank 1 0.1 s after training step 5 starts
    kill:rank=1,step=6,at=save       SIGKILL rank 1 while it writes the sharded checkpoint of step 6 (its shards
                                     written, the checkpoint not yet complete)
    hang:rank=1,step=7,at=all_reduce rank 1 stops for good just before its first all_reduce of step 7

`at` is "step" (default: the start of the training step), "save", or the name of a `torch.distributed`
function; `restart=N` limits a fault to the N-th restart of the group (TORCHELASTIC_RESTART_COUNT /
SLURM_RESTART_COUNT, 0 for the first start); a fault without `rank` or `step` applies to any. Each fault fires
at most once per process and is recorded, before it acts, in `<run dir>/injected_faults.jsonl`.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl

from mogao.errors import ConfigError, NumericalError
from mogao.training.rundir import cached_run_dir, run_dir

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


# ---- faults of ranks: the injection hook for tests, the collective watchdog -------------------------------

FAULT_ENV = "MOGAO_FAULT"
INJECTED_LOG = "injected_faults.jsonl"  # in the run directory: every injected fault, before it acts
WATCHDOG_REPORT = "watchdog"  # <run dir>/watchdog.json, watchdog.rank<k>.json
DEFAULT_COLLECTIVE_TIMEOUT = 600.0  # seconds (torch's own default is 30 minutes)
HANG_EXIT_STATUS = 124  # a process the watchdog ended (as `timeout(1)` exits)
# set by launchers that restart a process group: torchrun (--max-restarts) and SLURM (a requeued job)
RESTART_ENV = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
# the torch.distributed functions the watchdog times (called from Python; see the module docstring)
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "barrier", "monitored_barrier", "broadcast_object_list", "all_gather_object", "gather_object",
               "scatter_object_list", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
               "reduce_scatter")
_FAILURE_MARKERS = ("gloo/transport", "nccl", "processgroup", "connection closed by peer",
                    "connection reset by peer", "timed out waiting", "caused pair closure", "broken pipe")


def backstop_margin(collective_timeout: float) -> float:
    """How much later than the collective timeout the process group's own timeout is: 10 %, at least 10 s."""
    return max(10.0, 0.1 * float(collective_timeout))


def launcher_restart() -> tuple[str, int] | None:
    """(environment variable, count) when this process belongs to a process group that its launcher restarted
    (`TORCHELASTIC_RESTART_COUNT` > 0 under torchrun --max-restarts, `SLURM_RESTART_COUNT` > 0 in a requeued
    SLURM job); None for a first start."""
    for name in RESTART_ENV:
        try:
            count = int(os.environ.get(name, "0") or 0)
        except ValueError:
            continue
        if count > 0:
            return name, count
    return None


def restart_count() -> int:
    """How many times the launcher restarted this process group (0 for a first start)."""
    restart = launcher_restart()
    return 0 if restart is None else restart[1]


def is_collective_failure(exception: BaseException | None) -> bool:
    """Whether `exception` (or one it was raised from) is a failed collective: torch's `DistError`s, and the
    RuntimeErrors gloo and NCCL raise when a peer process is gone or a collective timed out."""
    import torch.distributed as dist

    seen = 0
    while exception is not None and seen < 10:
        dist_error = getattr(dist, "DistError", None)
        if dist_error is not None and isinstance(exception, dist_error):
            return True
        if isinstance(exception, RuntimeError) and any(m in str(exception).lower() for m in _FAILURE_MARKERS):
            return True
        exception = exception.__cause__ or exception.__context__
        seen += 1
    return False


# ---- fault injection (MOGAO_FAULT) -----------------------------------------------------------------------


@dataclass(frozen=True)
class InjectedFault:
    """One fault of `MOGAO_FAULT` (see the module docstring)."""

    action: str  # "kill" or "hang"
    at: str = "step"
    rank: int | None = None
    step: int | None = None
    restart: int | None = None
    delay: float = 0.0


def parse_faults(text: str) -> list[InjectedFault]:
    """The faults of a `MOGAO_FAULT` value; ConfigError naming what cannot be read."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        action, _, rest = part.partition(":")
        if action not in ("kill", "hang"):
            raise ConfigError(f"{FAULT_ENV}: unknown action {action!r} in {part!r} (kill, hang)")
        kw: dict[str, Any] = {}
        for item in filter(None, (i.strip() for i in rest.split(","))):
            key, eq, value = item.partition("=")
            try:
                if key in ("rank", "step", "restart"):
                    kw[key] = int(value)
                elif key == "delay":
                    kw[key] = float(value)
                elif key == "at" and value:
                    kw[key] = value
                else:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"{FAULT_ENV}: cannot read {item!r} in {part!r} (keys: at, rank, step, "
                                  "restart, delay)") from None
        faults.append(InjectedFault(action, **kw))
    return faults


_parsed: tuple[str, list[InjectedFault]] | None = None
_fired: set[int] = set()


def fault_point(point: str, rank: int, step: int | None, trainer: Any = None) -> None:
    """Act out the `MOGAO_FAULT` faults for `point` ("step", "save" or a collective's name) on `rank` at
    `step`, if any (a test hook: nothing happens unless the variable is set)."""
    global _parsed
    text = os.environ.get(FAULT_ENV)
    if not text:
        return
    if _parsed is None or _parsed[0] != text:
        _parsed = (text, parse_faults(text))
    restart = restart_count()
    for i, f in enumerate(_parsed[1]):
        if i in _fired or f.at != point or (f.rank is not None and f.rank != rank) \
                or (f.step is not None and f.step != step) or (f.restart is not None and f.restart != restart):
            continue
        _fired.add(i)
        log_path = (cached_run_dir(trainer) if trainer is not None else None) or Path(
            getattr(trainer, "default_root_dir", None) or ".")
        record = {"action": f.action, "at": point, "rank": rank, "step": step, "restart": restart,
                  "pid": os.getpid()}
        if f.action == "kill":
            if f.delay > 0:
                timer = threading.Timer(f.delay, _kill_self, (log_path, {**record, "delay": f.delay}))
                timer.daemon = True
                timer.start()
            else:
                _kill_self(log_path, record)
        else:
            _log_injection(log_path, record)
            print(f"[mogao] injected fault ({FAULT_ENV}): rank {rank} stops before {point} at step {step}",
                  file=sys.stderr, flush=True)
            while True:  # a rank that stops: only a signal's handler runs from here on
                time.sleep(3600)


def _log_injection(directory: Path, record: dict[str, Any]) -> None:
    record = {"time": time.time(), **record}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / INJECTED_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        print(f"[mogao] could not record an injected fault in {directory}: {e}", file=sys.stderr, flush=True)


def _kill_self(directory: Path, record: dict[str, Any]) -> None:
    wd = _ACTIVE
    _log_injection(directory, {**record, "step_at_kill": wd.step if wd is not None else record["step"]})
    os.kill(os.getpid(), signal.SIGKILL)


# ---- the collective watchdog ---------------------------------------------------------------------------


@dataclass
class _Collective:
    name: str
    number: int  # its place in this process's sequence of timed collectives (1 = the first)
    where: str  # the innermost project frames that called it
    since: float  # time.monotonic() when it was entered


_ACTIVE: CollectiveWatchdog | None = None
_ORIGINALS: dict[str, Any] = {}
_OWN_FRAMES = (os.sep + "mogao" + os.sep, os.sep + "callbacks" + os.sep, os.sep + "lightning" + os.sep)
_PHASES = {"setup": 0, "batch start": 1, "forward": 2, "backward": 3, "after backward": 4, "optimizer step": 5,
           "step end": 6, "validation": 7}  # (order inside a step, for telling which rank is behind)


# the collectives torch runs inside each timed part of a step (not seen from Python)
_INSIDE = {"forward": "FSDP's parameter all-gathers, DDP's buffer broadcast",
           "backward": "DDP's gradient all-reduce, FSDP's gradient reduce-scatters",
           "after backward": "DDP's last gradient buckets", "optimizer step": "collectives of the optimizer step"}


def _caller(depth: int = 2, keep: int = 3) -> str:
    """The innermost project frames (mogao, callbacks, lightning) of the calling code, innermost first."""
    frames, f = [], sys._getframe(depth)
    this = __file__
    while f is not None and len(frames) < keep:
        name = f.f_code.co_filename
        if name != this and any(k in name for k in _OWN_FRAMES):
            frames.append(f"{os.path.basename(name)}:{f.f_lineno} {f.f_code.co_name}")
        f = f.f_back
    return " < ".join(frames)


def _watched(name: str, original: Any) -> Any:
    def watched(*args: Any, **kwargs: Any) -> Any:
        wd = _ACTIVE
        if wd is None or threading.current_thread() is not wd.main_thread:
            return original(*args, **kwargs)
        fault_point(name, wd.rank, wd.step, wd.trainer)
        entry = wd.enter(name)
        try:
            return original(*args, **kwargs)
        finally:
            wd.leave(entry)

    watched.__name__ = getattr(original, "__name__", name)
    watched.__doc__ = getattr(original, "__doc__", None)
    watched._mogao_watched = original  # type: ignore[attr-defined]
    return watched


def _install_wrappers() -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        current = getattr(c10d, name, None)
        if current is None or name in _ORIGINALS:
            continue
        _ORIGINALS[name] = current
        fn = _watched(name, current)
        setattr(c10d, name, fn)
        if getattr(dist, name, None) is current:
            setattr(dist, name, fn)


def _remove_wrappers() -> None:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name, original in list(_ORIGINALS.items()):
        for module in (c10d, dist):
            fn = getattr(module, name, None)
            if getattr(fn, "_mogao_watched", None) is original:
                setattr(module, name, original)
        del _ORIGINALS[name]


class CollectiveWatchdog(pl.Callback):
    """Report a rank that hangs and end the process for the launcher to restart the group (module docstring).

    Args:
        timeout: seconds one rank may wait in one collective (None: no watchdog). `mogao fit` passes the
            strategy's `collective_timeout` (`mogao.training.strategies.configure_collective_timeout`).
        heartbeat: seconds between two publications of this rank's state (default: timeout / 4, at most 5).

    Inactive with one process. Also the place of the "step" fault point of `MOGAO_FAULT`.
    """

    def __init__(self, timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT, heartbeat: float | None = None) -> None:
        self.timeout = None if timeout is None else float(timeout)
        self.heartbeat = heartbeat if heartbeat is not None else min(5.0, (self.timeout or 20.0) / 4)
        self.trainer: Any = None
        self.rank, self.world_size, self.step = 0, 1, 0
        self.main_thread: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._store: Any = None
        self._open: list[_Collective] = []
        self._count = 0
        self._last: _Collective | None = None
        self._set_phase("setup", timed=False)

    def __getstate__(self) -> dict[str, Any]:  # (Lightning's spawn launchers pickle the trainer's callbacks)
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_stop", "_thread", "_store", "trainer", "main_thread", "_open", "_last")}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.trainer, self.main_thread, self._thread, self._store = None, None, None, None
        self._stop, self._open, self._last = threading.Event(), [], None

    # ---- what the main thread tells it --------------------------------------------------------------
    def _set_phase(self, phase: str, timed: bool) -> None:
        self._phase, self._timed, self._phase_since = phase, timed, time.monotonic()

    def enter(self, name: str) -> _Collective:
        self._count += 1
        entry = _Collective(name, self._count, _caller(3), time.monotonic())
        self._open.append(entry)
        return entry

    def leave(self, entry: _Collective) -> None:
        if self._open and self._open[-1] is entry:
            self._open.pop()
        elif entry in self._open:
            self._open.remove(entry)
        self._last = entry

    # ---- hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self.step = trainer.global_step
        if self.world_size > 1:
            run_dir(trainer)  # (every rank: the first call is a broadcast) - the reports' folder, cached
            if self.timeout is not None:
                self._start()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = trainer.global_step
        self._set_phase("step end", timed=False)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.step = trainer.global_step + 1  # the optimizer step being taken (numbered as in metrics.jsonl)
        self._set_phase("batch start", timed=False)
        fault_point("step", trainer.global_rank, self.step, trainer)
        self._set_phase("forward", timed=True)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        self._set_phase("backward", timed=True)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_phase("after backward", timed=True)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._set_phase("optimizer step", timed=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._set_phase("step end", timed=False)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_phase("validation", timed=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_phase("step end", timed=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._thread is not None and is_collective_failure(exception):
            state = self._state()
            event = self._event("collective failed", state, waited=None)
            event["error"] = f"{type(exception).__name__}: {exception}"[:4000]
            path = self._write(event)
            print(f"[mogao] rank {self.rank}: a collective failed at step {self.step} ({event['where']}): "
                  f"{str(exception).splitlines()[0][:300] if str(exception) else type(exception).__name__}; "
                  f"{event['verdict']}; report: {path}", file=sys.stderr, flush=True)
        self._shutdown()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._shutdown()

    # ---- the thread ----------------------------------------------------------------------------------
    def _start(self) -> None:
        global _ACTIVE, _EXIT_REGISTERED
        if self._thread is not None:
            return
        if not _EXIT_REGISTERED:
            atexit.register(_destroy_process_group)
            _EXIT_REGISTERED = True
        self.main_thread = threading.current_thread()
        self._store = _heartbeat_store()
        self._stop.clear()
        _ACTIVE = self
        _install_wrappers()
        self._thread = threading.Thread(target=self._run, name="mogao-collective-watchdog", daemon=True)
        self._thread.start()

    def _shutdown(self) -> None:
        global _ACTIVE
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None
        if _ACTIVE is self:
            _ACTIVE = None
            _remove_wrappers()

    def _run(self) -> None:
        assert self.timeout is not None
        tick = min(1.0, self.timeout / 10)
        last_beat = -1e9
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now - last_beat >= self.heartbeat:
                self._publish()
                last_beat = now
            open_ = list(self._open)
            if open_ and now - open_[0].since > self.timeout:
                self._fire(now - open_[0].since)
            elif not open_ and self._timed and now - self._phase_since > self.timeout + backstop_margin(
                    self.timeout) / 2:
                self._fire(now - self._phase_since)

    def _state(self) -> dict[str, Any]:
        now = time.monotonic()
        open_ = list(self._open)
        outer, last = (open_[0] if open_ else None), self._last

        def describe(c: _Collective | None, waited: bool) -> dict[str, Any] | None:
            if c is None:
                return None
            d = {"number": c.number, "name": c.name, "called_from": c.where}
            if waited:
                d["waited_s"] = round(now - c.since, 3)
            return d

        return {"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                "step": self.step, "phase": self._phase, "phase_s": round(now - self._phase_since, 3),
                "collectives": self._count, "in_collective": describe(outer, True),
                "last_collective": describe(last, False)}

    def _publish(self) -> None:
        if self._store is None:
            return
        try:
            self._store.set(str(self.rank), json.dumps(self._state()))
        except Exception as e:  # no view of this rank for the others; the watchdog itself keeps working
            log.warning("collective watchdog: cannot publish the heartbeat of rank %d: %s", self.rank, e)
            self._store = None

    def _await_fresh_heartbeats(self) -> float:
        """Wait (at most one heartbeat interval and a half) until every rank that still publishes has done so
        since now, so that the report describes the ranks as they are; returns the seconds waited."""
        start, since = time.monotonic(), time.time()
        self._publish()
        while time.monotonic() - start < 1.5 * self.heartbeat:
            time.sleep(0.1)
            beats = self._read_heartbeats()
            if all(b is not None and b["time"] >= since for b in beats.values()):
                break
        return time.monotonic() - start

    def _read_heartbeats(self) -> dict[int, dict[str, Any] | None]:
        beats: dict[int, dict[str, Any] | None] = {r: None for r in range(self.world_size)}
        if self._store is not None:
            for r in range(self.world_size):
                try:
                    if self._store.check([str(r)]):
                        beats[r] = json.loads(self._store.get(str(r)))
                except Exception:
                    beats[r] = None
        beats[self.rank] = self._state()
        return beats

    def _event(self, kind: str, state: dict[str, Any], waited: float | None) -> dict[str, Any]:
        beats = self._read_heartbeats()
        stuck, verdict = stuck_ranks(beats, time.time(), stale_after=3 * self.heartbeat + 2.0,
                                     silent_only=kind != "collective timeout")
        if kind != "collective timeout" and not stuck:
            verdict = "another rank's process ended or its connection broke (the error says which peer)"
        inside = _INSIDE.get(state["phase"])
        where = (f"collective #{state['in_collective']['number']} {state['in_collective']['name']} "
                 f"({state['in_collective']['called_from']})" if state["in_collective"]
                 else f"step {state['step']}, {state['phase']}" + (f" (where torch runs {inside})" if inside else ""))
        now = time.time()
        return {"event": kind, "rank": self.rank, "world_size": self.world_size, "restart": restart_count(),
                "time": now, "step": state["step"], "phase": state["phase"], "where": where,
                "collective": state["in_collective"], "last_collective": state["last_collective"],
                "waited_s": None if waited is None else round(waited, 3), "timeout_s": self.timeout,
                "stuck_ranks": stuck, "verdict": verdict,
                "ranks": {str(r): (None if b is None else {**b, "age_s": round(now - b["time"], 3)})
                          for r, b in beats.items()}}

    def _fire(self, waited: float) -> None:
        try:
            waited += self._await_fresh_heartbeats()
            state = self._state()
            event = self._event("collective timeout", state, waited)
            event["exit_status"] = HANG_EXIT_STATUS
            path = self._write(event)
            print(f"[mogao] rank {self.rank}: collective timeout at step {self.step}: waited {waited:.1f} s "
                  f"(collective_timeout={self.timeout:g} s) in {event['where']}; {event['verdict']}; report: "
                  f"{path}; exiting with status {HANG_EXIT_STATUS} for the launcher to restart the group",
                  file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(HANG_EXIT_STATUS)

    def _write(self, event: dict[str, Any]) -> Path | None:
        trainer = self.trainer
        folder = cached_run_dir(trainer) or Path(trainer.default_root_dir)
        path = folder / (f"{WATCHDOG_REPORT}.json" if self.rank == 0 else f"{WATCHDOG_REPORT}.rank{self.rank}.json")
        events = []
        try:
            events = list(json.loads(path.read_text()).get("events", []))
        except (OSError, ValueError, AttributeError):
            pass
        try:
            return write_rank_report(path, {"events": [*events, event]})
        except OSError as e:
            print(f"[mogao] could not write {path}: {e}", file=sys.stderr, flush=True)
            return None


_EXIT_REGISTERED = False


def _destroy_process_group() -> None:
    """At the exit of a multi-process run: end the default process group (Lightning does so for NCCL only). A gloo
    group left to the interpreter's teardown now and then aborts the process at exit ("terminate called without
    an active exception"), which a launcher counts as a failed run and restarts."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:  # exiting anyway
        log.debug("destroy_process_group at exit: %s", e)


def _heartbeat_store() -> Any:
    """A store every rank of the group reaches (the default process group's), under a prefix of its own."""
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        return dist.PrefixStore(f"mogao_watchdog/{restart_count()}", _get_default_store())
    except Exception as e:
        log.warning("collective watchdog: no store to exchange heartbeats (%s); reports show this rank only", e)
        return None


def stuck_ranks(beats: dict[int, dict[str, Any] | None], now: float, stale_after: float,
                silent_only: bool = False) -> tuple[list[int], str]:
    """Which ranks hold the group up, from every rank's last heartbeat (None: none received), and why.

    A rank is named when it has sent no heartbeat for `stale_after` seconds (dead or frozen), when others wait
    in collective #k and it has not entered #k (it issued fewer collectives) or waits in another one, or -
    with nobody inside a Python-level collective - when it is at an earlier step or an earlier part of the
    step than the rank furthest ahead. With `silent_only`, only silent ranks are named."""
    silent = {r for r, b in beats.items() if b is None or now - float(b.get("time", 0)) > stale_after}
    live = {r: b for r, b in beats.items() if r not in silent and b is not None}
    reasons: dict[int, str] = {}
    for r in sorted(silent):
        b = beats[r]
        reasons[r] = ("no heartbeat received" if b is None else
                      f"no heartbeat for {now - float(b['time']):.1f} s (dead or frozen; last at step {b['step']}, "
                      f"{b['phase']})")
    waiting = {r: b["in_collective"] for r, b in live.items() if b.get("in_collective")}
    summary = ""
    if silent_only:
        pass
    elif waiting:
        k = max(c["number"] for c in waiting.values())
        first = next(c for c in waiting.values() if c["number"] == k)
        summary = f"collective #{k} {first['name']} ({first['called_from']})"
        for r, b in sorted(live.items()):
            c = waiting.get(r)
            if c is None and b["collectives"] < k:
                last = b.get("last_collective") or {}
                reasons[r] = (f"has not reached {summary}: it entered {b['collectives']} collectives, the last "
                              f"#{last.get('number', '-')} {last.get('name', '-')}; it is at step {b['step']}, "
                              f"{b['phase']} for {b['phase_s']:.1f} s")
            elif c is not None and c["number"] != k:
                reasons[r] = f"waits in another collective, #{c['number']} {c['name']} ({c['called_from']})"
    elif live:
        key = {r: (int(b["step"]), _PHASES.get(b["phase"], 0)) for r, b in live.items()}
        front = max(key.values())
        for r, b in sorted(live.items()):
            if key[r] < front:
                reasons[r] = f"is behind: at step {b['step']}, {b['phase']} for {b['phase_s']:.1f} s"
    stuck = sorted(reasons)
    if stuck:
        verdict = "; ".join(f"rank {r} {reasons[r]}" for r in stuck)
    elif summary:
        verdict = f"every rank waits in {summary}: the collective itself does not complete (network, backend)"
    else:
        verdict = "every rank is at the same point: no rank is behind the others"
    return stuck, verdict
