"""Leave a resumable checkpoint when a run is pre-empted or crashes.

`PreemptionCheckpoint` (on by default in `mogao fit`): a configured signal (SIGTERM and SIGUSR1 by default)
only sets a flag. At the end of the next training batch that completes an optimizer step - after every other
callback's batch-end work, periodic checkpoints included - the callback saves `last.ckpt` in the checkpoint
directory (where `--ckpt_path=last` and the curriculum look; skipped when a `ModelCheckpoint` has just written
it for the same step) and stops the run by raising `Preempted`, a `SIGTERMException` whose exit status is
128 + the signal number (143 for SIGTERM). The run ends as *interrupted*, like a crash: the final model is not
written as if training had finished. Resume with `--ckpt_path=last`. A signal that arrives during validation
takes effect after it (SIGTERM: see below).

`CrashCheckpoint` (on by default): Lightning's `OnExceptionCheckpoint` writing `on_exception.ckpt` next to the
other checkpoints, with two guards: it saves only once training has started (an error while restoring a
checkpoint must not overwrite a good one with an unrestored model), and not when `PreemptionCheckpoint` has
saved the same state.

Which facility covers what:

- SIGKILL, power loss, OOM killer: nothing can run. `mogao.training.checkpointing.AtomicCheckpointIO` keeps
  every checkpoint on disk complete (and `MoTFSDP2Strategy` every sharded one), and `--ckpt_path=last`
  resumes from the newest valid one: at most the interval of the periodic `ModelCheckpoint` is lost.
- One rank of several killed, or hung: the others' next collective fails at once (a peer is gone) or, for a
  hang, the collective watchdog (`mogao.training.faults.CollectiveWatchdog`, added by `add_fault_tolerance`)
  ends them after the strategy's collective timeout, with a report naming the rank that holds the group up.
  No checkpoint is written then (`CrashCheckpoint` skips a failed collective: the group cannot complete a
  save); the launcher restarts the group (torchrun --max-restarts, a SLURM requeue) and the restarted run
  resumes from the last complete checkpoint (`mogao.training.checkpointing.resolve_ckpt_path`).
- A Python exception, and Ctrl-C (Lightning turns KeyboardInterrupt into `on_exception` and exits with
  status 1): Lightning's `OnExceptionCheckpoint`, here as `CrashCheckpoint`.
- SIGUSR1 under SLURM with `SLURMEnvironment(auto_requeue=True)` (Lightning's default on SLURM): Lightning
  saves `hpc_ckpt_<n>.ckpt` in the root directory and requeues the job. `PreemptionCheckpoint` leaves the
  requeue signal to Lightning there (and `--ckpt_path=last` considers the `hpc_ckpt` files).
- SIGTERM: Lightning's signal connector records it (`trainer.received_sigterm`, also telling launched worker
  processes) and raises its `SIGTERMException` at the end of the batch or of the current validation batch;
  that exit has status 0 and saves nothing by itself. `PreemptionCheckpoint` chains to Lightning's handler
  and normally stops first; when Lightning's stop comes first (in validation), it saves `last.ckpt` from
  `on_exception` (unless that step's `last.ckpt` exists). `mogao.cli.main` exits with status 143 either way.
- SIGUSR1 (or any other configured signal) outside SLURM: no Lightning facility (the default action kills
  the process): `PreemptionCheckpoint`.

The handlers are installed when training starts (after Lightning has installed its own) and the previous ones
are restored when training ends, on an exception, and at teardown. With several processes the decision to
stop is reduced across ranks (any rank that got the signal stops all of them after the same batch), and every
rank takes part in the save, as distributed strategies require.
"""

from __future__ import annotations

import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from mogao.training.checkpointing import checkpoint_dir
from mogao.training.faults import CollectiveWatchdog, is_collective_failure

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(SIGTERMException):
    """Training stopped on a signal after saving `checkpoint` at `step`; the exit status is 128 + `signum`."""

    def __init__(self, signum: int, checkpoint: Path | None, step: int) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.checkpoint, self.step = int(signum), checkpoint, step


def _signal_number(s: str | int) -> int:
    if isinstance(s, int):
        return int(signal.Signals(s))
    name = s.upper() if s.upper().startswith("SIG") else "SIG" + s.upper()
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"PreemptionCheckpoint: unknown signal {s!r} (e.g. SIGTERM, SIGUSR1)") from None


def _say(trainer: pl.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(f"[mogao] {message}", file=sys.stderr, flush=True)


class PreemptionCheckpoint(pl.Callback):
    """On one of `signals`, save `last.ckpt` at the next step boundary and stop (see the module docstring).

    Args:
        signals: names or numbers of the signals to handle (default: SIGTERM and SIGUSR1). Under SLURM with
            auto-requeue Lightning's requeue signal is left to Lightning.
        dirpath: where to save (default: the directory of the run's first `ModelCheckpoint`, else the run's
            `checkpoints/`).
        filename: file name without `.ckpt` (default `last`, which `--ckpt_path=last` resumes from).
    """

    def __init__(self, signals: Sequence[str | int] | None = None, dirpath: str | None = None,
                 filename: str = "last") -> None:
        if signals is None:  # the defaults this platform has (Windows has no SIGUSR1)
            signals = [name for name in DEFAULT_SIGNALS if hasattr(signal, name)]
        self.signals = [_signal_number(s) for s in signals]
        self.dirpath, self.filename = dirpath, filename
        self.received: int | None = None  # the first signal since training started
        self.saved: Path | None = None  # the checkpoint written on it
        self._previous: dict[int, Any] = {}
        self._step_before: int | None = None  # global step when the current batch started

    # ---- signal handling ---------------------------------------------------------------------------------

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        previous = self._previous.get(signum)
        if callable(previous):  # Lightning's handler (SIGTERM) or whoever was there before: keep them working
            previous(signum, frame)

    def _install(self, trainer: pl.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionCheckpoint: training does not run in the main thread, where Python "
                          "delivers signals; pre-emption signals are not handled", stacklevel=2)
            return
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        owned_by_lightning = set()
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            owned_by_lightning.add(int(env.requeue_signal))
        for signum in self.signals:
            if signum in owned_by_lightning or signum in self._previous:
                continue
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore(self) -> None:
        """Put back the handlers found at installation, where ours is still the one installed."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle and previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    # ---- hooks -------------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received, self.saved = None, None
        self._install(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._step_before:
            return  # inside a gradient accumulation: the accumulated gradients are in no checkpoint
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        signum = self.received or int(signal.SIGTERM)  # a rank that did not get the signal itself
        self._save(trainer, signum)
        raise Preempted(signum, self.saved, trainer.global_step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException) and not isinstance(exception, Preempted) \
                and self.received is not None:
            # Lightning's own SIGTERM stop came first (in validation, or the signal arrived after this step's
            # check): save the same way, unless this step's last.ckpt is already there
            try:
                self._save(trainer, self.received)
            except Exception as e:
                warnings.warn(f"could not save the pre-emption checkpoint: {e}", stacklevel=2)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    # ---- saving ------------------------------------------------------------------------------------------

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the pre-emption checkpoint goes (see `dirpath`, `filename`)."""
        ext = ModelCheckpoint.FILE_EXTENSION
        return Path(self.dirpath or checkpoint_dir(trainer)) / f"{self.filename}{ext}"

    def _save(self, trainer: pl.Trainer, signum: int) -> None:
        path = None
        if not trainer.fast_dev_run:
            path = self.checkpoint_path(trainer)
            if not self._already_saved(trainer, path):
                trainer.save_checkpoint(path)
        self.saved = path
        where = f"saved {path}" if path else "no checkpoint (fast_dev_run)"
        name = signal.Signals(signum).name
        _say(trainer, f"{name}: stopped at global step {trainer.global_step}, {where}; resume with "
                      "--ckpt_path=last")

    @staticmethod
    def _already_saved(trainer: pl.Trainer, path: Path) -> bool:
        """Whether a ModelCheckpoint wrote `path` for this very step a moment ago (its save_last)."""
        return any(isinstance(cb, ModelCheckpoint) and cb.last_model_path and Path(cb.last_model_path) == path
                   and getattr(cb, "_last_global_step_saved", None) == trainer.global_step
                   for cb in trainer.callbacks)


class CrashCheckpoint(OnExceptionCheckpoint):
    """Lightning's `OnExceptionCheckpoint` (`<dirpath>/<filename>.ckpt`) with the guards of the module doc.

    A save that itself fails (e.g. a full disk) is reported as a warning, so the original exception is the one
    that propagates. Nothing is saved after a failed collective (a rank died or timed out): the ranks cannot
    complete a save together, and one that a rank completed alone could record a step that was not taken. The
    file is removed when a fit finishes normally, as Lightning's callback does.
    """

    def __init__(self, dirpath: str | Path, filename: str = "on_exception") -> None:
        super().__init__(str(dirpath), filename)
        self._training = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._training = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True  # the checkpoint (if any) is restored by now

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if not self._training or trainer.fast_dev_run:
            return
        if isinstance(exception, SIGTERMException) and any(
                isinstance(cb, PreemptionCheckpoint) and cb.saved is not None for cb in trainer.callbacks):
            return  # the pre-emption checkpoint holds this state already
        if trainer.world_size > 1 and is_collective_failure(exception):
            _say(trainer, f"a collective failed at global step {trainer.global_step}: no on-exception checkpoint "
                          "(the ranks cannot complete one); a restart resumes from the last complete checkpoint")
            return
        try:
            super().on_exception(trainer, pl_module, exception)
        except Exception as e:
            warnings.warn(f"could not save the on-exception checkpoint {self.ckpt_path}: {e}", stacklevel=2)
            return
        _say(trainer, f"{type(exception).__name__} at global step {trainer.global_step}: saved "
                      f"{self.ckpt_path}; resume with --ckpt_path=last")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not trainer.interrupted:
            super().teardown(trainer, pl_module, stage)


def add_fault_tolerance(trainer: pl.Trainer, fit: bool = True) -> None:
    """Give a trainer what `mogao fit` runs with: `PreemptionCheckpoint`, appended last so that it stops a run
    after every other callback's batch-end work (periodic checkpoints included); for a fit with checkpointing
    on, `CrashCheckpoint` in the run's checkpoint directory; and, first in the list, the `CollectiveWatchdog`
    with the strategy's collective timeout (`configure_collective_timeout`, which also gives Lightning's
    strategies mogao's default). Each is added only where the trainer has none of its kind (any
    `OnExceptionCheckpoint` counts). Under torchrun the strategy takes the launcher's number of nodes when
    it differs (`follow_launcher_world`: an elastic restart with fewer or more nodes), and a restarted group
    gets store keys of its own (`isolate_restarted_store`)."""
    from mogao.training.strategies import (
        configure_collective_timeout,
        follow_launcher_world,
        isolate_restarted_store,
    )

    isolate_restarted_store()
    follow_launcher_world(trainer.strategy)
    timeout = configure_collective_timeout(trainer.strategy)
    cbs = trainer.callbacks
    if not any(isinstance(c, CollectiveWatchdog) for c in cbs):
        cbs.insert(0, CollectiveWatchdog(timeout))
    if not any(isinstance(c, PreemptionCheckpoint) for c in cbs):
        cbs.append(PreemptionCheckpoint())
    has_crash_checkpoint = any(isinstance(c, OnExceptionCheckpoint) for c in cbs)
    if fit and trainer.checkpoint_callback is not None and not has_crash_checkpoint:
        cbs.append(CrashCheckpoint(checkpoint_dir(trainer)))
