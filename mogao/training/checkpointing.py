"""Crash-safe checkpoint files: atomic writes, validated reads, and finding the newest usable checkpoint.

`AtomicCheckpointIO` is the checkpoint IO plugin of every `mogao fit` run. A checkpoint is serialised into a
temporary file next to its final name (`.<name>.<pid>-<random>.tmp`), flushed and `fsync`ed, renamed onto the
final name with `os.replace` (atomic on POSIX file systems), and the directory is `fsync`ed so that the rename
itself survives a power loss. A process killed at any moment therefore leaves either the previous complete
file or the new complete file under the final name, plus at most one stale temporary file that nothing reads
and that the next resume removes.

Lightning's own `TorchCheckpointIO` also writes through a temporary file, but it serialises the whole
checkpoint into memory first, stages the bytes in the system temporary directory (an fsspec transaction) and
moves them with `shutil.move`: when that directory is on another file system the move is a copy that a kill
can tear, nothing is `fsync`ed, and a killed save leaves its staging file behind in /tmp. Remote (fsspec URL)
paths still go through Lightning's implementation here.

Reading validates, and never runs code from the file: checkpoints are read in torch's weights-only format
(tensors, containers, numbers, strings and the few config classes the project registers with
`torch.serialization.add_safe_globals`), whatever a caller asks for. `AtomicCheckpointIO.load_checkpoint` raises
`CheckpointError`, naming the file and the problem, for a file that cannot be loaded that way (truncated,
empty, garbage, or holding other objects) or that lacks what a Lightning checkpoint has (`state_dict`,
`global_step`). `check_checkpoint` also compares every record with its CRC-32, so it finds damage that
unpickling alone does not notice. A sharded checkpoint's shard index (`.metadata`, which torch's distributed
checkpoint reader unpickles without restriction) is first read by `read_shard_index`, an unpickler that
builds only the index classes torch writes there, and every non-tensor record of the shards is read
weights-only, so a folder that would run code is refused before torch opens it. `find_valid_checkpoint` returns the newest
checkpoint of a directory that passes `check_checkpoint`, skipping (with a warning) those that do not;
`resolve_ckpt_path` is what `mogao fit --ckpt_path=last` goes through; in a process group restarted by its
launcher (torchrun `--max-restarts`, a requeued SLURM job) it resumes the run's newest valid checkpoint whatever
`--ckpt_path` says (`launcher_restart`).

Sharded checkpoints (directories, one shard file per rank) are written the same way as a unit:
`MoTFSDP2Strategy` has every rank write into a temporary sibling folder (`.<name>.<pid>-<random>.tmp`) and
the first rank renames it into place (`commit_directory`). Replacing an existing folder takes two renames (the
old one is first moved aside as `.<name>.<pid>-<random>.old`); a kill between them leaves the moved-aside
folder, complete, which `checkpoint_candidates` counts as `<name>` for as long as `<name>` does not exist.
`remove_temp_files` removes killed writers' temporary folders as well as files.

Keeping the last N checkpoints is Lightning's `ModelCheckpoint`, not this module:
`ModelCheckpoint(every_n_train_steps=K, save_top_k=N, monitor="step", mode="max", save_last=True)` keeps the
N newest `epoch=E-step=S.ckpt` files plus `last.ckpt`. Nothing has to be logged under the name `step`: a
checkpoint callback adds the global step to the metrics it ranks by. Its deletions go through
`AtomicCheckpointIO.remove_checkpoint`. (It never deletes the checkpoint a run resumed from, so a step
checkpoint that a run was resumed from can outlive the N newest.)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import torch
from fsspec.core import strip_protocol
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from mogao.model.checkpoint_files import (
    CheckpointError,
    _unloadable,
    check_checkpoint,
    refuse_compressed_records,
    register_safe_globals,
    validate_checkpoint,
)
from mogao.model.io import TEMP_SUFFIX, fsync_directory
from mogao.training.faults import launcher_restart

CHECKPOINT_SUFFIX = ".ckpt"
QUARANTINE_SUFFIX = ".corrupt"
MOVED_ASIDE_SUFFIX = ".old"  # a checkpoint folder being replaced (`commit_directory`)
LAST_NAME = "last"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it cannot be used."""


# ---- writing -------------------------------------------------------------------------------------------


def temp_path_for(path: _PATH) -> Path:
    """A fresh temporary name next to `path`: hidden, unique per writer, and never matching `*.ckpt`."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def is_temp_file(path: _PATH) -> bool:
    """Whether `path` is a temporary file of `atomic_save` (`.<name>.ckpt.<pid>-<random>.tmp`)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX) and f"{CHECKPOINT_SUFFIX}." in name


def moved_aside_target(path: _PATH) -> Path | None:
    """For `.<name>.<pid>-<random>.old` (a checkpoint folder `commit_directory` moved aside), `<name>`'s path;
    None for any other name."""
    p = Path(path)
    name = p.name
    if not (name.startswith(".") and name.endswith(MOVED_ASIDE_SUFFIX)):
        return None
    stem = name[1: -len(MOVED_ASIDE_SUFFIX)].rsplit(".", 1)[0]  # drop the `<pid>-<random>` tag
    return p.with_name(stem) if stem.endswith(CHECKPOINT_SUFFIX) else None


def commit_directory(tmp: _PATH, final: _PATH) -> None:
    """Rename the complete folder `tmp` onto `final` (a folder or file: a previous checkpoint of that name).

    Every file in `tmp` is `fsync`ed first. An existing `final` is moved aside (`.<name>.<tag>.old`), `tmp` is
    renamed onto `final` and the moved-aside one is removed; the parent directory is `fsync`ed. A kill leaves
    either the previous checkpoint (at `final`, or moved aside: see the module docstring) or the new one.
    """
    tmp, final = Path(tmp), Path(final)
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_directory(tmp)
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}{MOVED_ASIDE_SUFFIX}")
        os.rename(final, old)
        os.rename(tmp, final)
        fsync_directory(final.parent)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                old.unlink()
    else:
        os.rename(tmp, final)
    fsync_directory(final.parent)


def atomic_save(obj: Any, path: _PATH, write: Callable[[Any, IO[bytes]], None] | None = None) -> None:
    """Write `obj` with `torch.save` (or `write(obj, file)`) so that `path` is never seen half written.

    The bytes go to a temporary file in the same directory, which is flushed, `fsync`ed and then renamed onto
    `path` with `os.replace`; the directory is `fsync`ed afterwards. On any error the temporary file is
    removed and the previous file at `path` (if any) is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        with open(tmp, "wb") as f:
            (write or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_directory(final.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO with atomic, durable saves and validated loads (see the module docstring).

    Local paths are written with `atomic_save`; fsspec URLs fall back to Lightning's `TorchCheckpointIO`.
    `load_checkpoint` raises `CheckpointError` for a file that is truncated, not a checkpoint, or lacks
    `state_dict` / `global_step`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("`Trainer.save_checkpoint(..., storage_options=...)` is not supported by "
                            f"{type(self).__name__}")
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_save(checkpoint, strip_protocol(str(path)), write=self.write)

    def write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        """Serialise `checkpoint` into the open temporary file (`torch.save`); a hook for other formats."""
        torch.save(checkpoint, f)

    def load_checkpoint(self, path: _PATH, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        register_safe_globals()
        if isinstance(get_filesystem(path), LocalFileSystem):  # (no compressed member to inflate)
            refuse_compressed_records(strip_protocol(str(path)), path, "the checkpoint")
        try:  # weights only whatever is asked: a checkpoint from elsewhere must not run code
            checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except MemoryError:
            raise
        except Exception as e:  # torch.load's errors for a torn or foreign file: RuntimeError, EOFError, ...
            raise CheckpointError(path, _unloadable(path, e)) from e
        validate_checkpoint(checkpoint, path)
        return checkpoint


# ---- finding the checkpoint to resume from -------------------------------------------------------------


def checkpoint_dir(trainer: Any) -> Path:
    """The directory a trainer's checkpoints go to, known before training starts.

    The first `ModelCheckpoint`'s `dirpath` when given, else the directory that Lightning's `ModelCheckpoint`
    picks: `<logger save_dir>/<name>/<version>/checkpoints` with a logger (`<run>/checkpoints` with the logger
    that `mogao fit` sets up), `<default_root_dir>/checkpoints` without one.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        return Path(save_dir, str(logger.name), version, "checkpoints")
    return Path(trainer.default_root_dir, "checkpoints")


def checkpoint_candidates(directory: _PATH, extra: Iterable[_PATH] = ()) -> list[Path]:
    """The `*.ckpt` entries of `directory` and the `extra` paths, newest first (`last*.ckpt` first among
    equally new ones).

    Newest means most recently written: the state a run reached last, which is also how Lightning's
    `ckpt_path="last"` chooses. Temporary files and folders of interrupted saves are not candidates; a folder
    that `commit_directory` moved aside is one while the name it replaces is missing (a kill between its two
    renames).
    """
    d = Path(directory)
    found = []
    if d.is_dir():
        entries = list(d.iterdir())
        found = [p for p in entries if p.name.endswith(CHECKPOINT_SUFFIX) and not p.name.startswith(".")]
        names = {p.name for p in found}
        found += [p for p in entries if (t := moved_aside_target(p)) is not None and t.name not in names]
    found += [Path(p) for p in extra if Path(p) not in found and Path(p).exists()]

    def key(p: Path) -> tuple[int, int]:
        try:
            mtime = p.stat().st_mtime_ns
        except OSError:
            mtime = 0
        return -mtime, 0 if p.name.startswith(LAST_NAME) else 1

    return sorted(found, key=key)


def find_valid_checkpoint(directory: _PATH) -> Path | None:
    """The newest checkpoint in `directory` that passes `check_checkpoint`, or None.

    Candidates are tried newest first (`checkpoint_candidates`; normally `last.ckpt`, which is written last);
    each one that fails is skipped with a `CheckpointWarning` naming it and the problem. Temporary files of
    interrupted saves are ignored.
    """
    for p in checkpoint_candidates(directory):
        try:
            check_checkpoint(p)
        except CheckpointError as e:
            warnings.warn(f"skipping {e}", CheckpointWarning, stacklevel=2)
            continue
        return p
    return None


def remove_temp_files(directory: _PATH) -> list[Path]:
    """Delete the temporary files and folders that saves killed mid-write left in `directory`, and folders
    moved aside by `commit_directory` whose replacement is in place; returns what was removed.

    Call this while no save can be running into the directory (e.g. before training starts). As a safeguard,
    an entry whose writer (the process id in its name) is still running on this machine is left alone. A
    moved-aside folder whose name is missing is kept: it is the checkpoint of that name.
    """
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.iterdir():
            target = moved_aside_target(p)
            stale = is_temp_file(p) or (target is not None and target.exists())
            if not stale or _writer_alive(p, MOVED_ASIDE_SUFFIX if target is not None else TEMP_SUFFIX):
                continue
            try:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError:
                continue
            removed.append(p)
    return removed


def _writer_alive(temp: Path, suffix: str = TEMP_SUFFIX) -> bool:
    try:
        pid = int(temp.name[: -len(suffix)].rsplit(".", 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists and belongs to someone else
        return True
    return True


def quarantine(path: _PATH) -> Path:
    """Rename an unusable checkpoint to `<name>.corrupt` (`.corrupt-2`, ... if taken): no lookup finds it."""
    p = Path(path)
    target, n = p.with_name(p.name + QUARANTINE_SUFFIX), 1
    while target.exists():
        n += 1
        target = p.with_name(f"{p.name}{QUARANTINE_SUFFIX}-{n}")
    os.replace(p, target)
    return target


def resolve_resume(directory: _PATH, extra: Iterable[_PATH] = (), tidy: bool = True,
                   say: Callable[[str], None] = print) -> Path | None:
    return _resolve_resume(directory, extra, tidy, say)[0]


def _resolve_resume(directory: _PATH, extra: Iterable[_PATH] = (), tidy: bool = True,
                    say: Callable[[str], None] = print) -> tuple[Path | None, int | None]:
    """The checkpoint to resume from in `directory` (what `ckpt_path="last"` should mean), or None.

    The newest candidate (`checkpoint_candidates` over `directory` and the `extra` paths) that passes
    `check_checkpoint`: normally `last.ckpt`, silently. Otherwise it says (through `say`) what is wrong with
    each checkpoint it skipped and which one it resumes from instead, or that none is usable and training
    starts from scratch. With `tidy` (on one process only, before training) the temporary files of
    interrupted saves are removed and, when no checkpoint is usable, the unusable ones are renamed to
    `*.corrupt` so that nothing else picks them up.
    """
    d = Path(directory)
    if tidy:
        for p in remove_temp_files(d):
            say(f"removed {p.name}, left in {d} by a save that was interrupted")
    problems: list[CheckpointError] = []
    for p in checkpoint_candidates(d, extra):
        try:
            step = check_checkpoint(p)
        except CheckpointError as e:
            problems.append(e)
            continue
        for e in problems:
            say(f"skipping {e}")
        if problems or p.name != LAST_NAME + CHECKPOINT_SUFFIX:
            say(f"resuming from {p} (global step {step})")
        return p, step
    for e in problems:
        say(f"skipping {e}")
    if problems:
        set_aside = [quarantine(e.path) for e in problems] if tidy else []
        moved = f"; renamed them to {', '.join(p.name for p in set_aside)}" if set_aside else ""
        say(f"no usable checkpoint in {d}{moved}: training starts from scratch")
    return None, None


# ---- what `mogao fit` uses ------------------------------------------------------------------------------


def with_atomic_checkpoint_io(plugins: Any) -> list[Any]:
    """A trainer's `plugins` plus `AtomicCheckpointIO`, unless they already include a CheckpointIO plugin."""
    from lightning.fabric.plugins import CheckpointIO

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def resolve_ckpt_path(trainer: Any, ckpt_path: str | None, fit: bool) -> str | None:
    """The `ckpt_path` to give `trainer.fit` / `trainer.validate` for the one given on the command line.

    `"last"` becomes the newest checkpoint of the run that passes `check_checkpoint` (`resolve_resume` over
    the trainer's checkpoint directory and SLURM's `hpc_ckpt_<n>.ckpt` files in its root directory); when
    none does it stays `"last"`, for which Lightning then finds nothing and starts from scratch. A fit without
    a path is treated the same way when the trainer has an on-exception checkpoint, since Lightning resumes
    such a fit from its last checkpoint. Other values are returned as given - except in a fit that its
    launcher restarted (`launcher_restart`): there the run's newest valid checkpoint is the one resumed from
    whatever was given (the given path only when the run has none yet), so a restart never goes back to the
    start. Only the first process prints, and only a fit tidies the directory.
    """
    from lightning.pytorch.callbacks import OnExceptionCheckpoint
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    has_crash_checkpoint = any(isinstance(c, OnExceptionCheckpoint) for c in trainer.callbacks)
    implicit = ckpt_path is None and fit and has_crash_checkpoint
    restart = launcher_restart() if fit else None
    if ckpt_path != LAST_NAME and not implicit and restart is None:
        return ckpt_path
    rank_zero = rank_zero_only.rank == 0

    def say(message: str) -> None:
        if rank_zero:
            print(f"[mogao] {message}", flush=True)

    directory = checkpoint_dir(trainer)
    hpc = sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    path, step = _resolve_resume(directory, extra=hpc, tidy=rank_zero and fit, say=say)
    if restart is not None:
        name, count = restart
        if path is None:
            given = f"; starting from --ckpt_path={ckpt_path}" if ckpt_path not in (None, LAST_NAME) else ""
            say(f"restart {count} of the process group ({name}={count}): no checkpoint in {directory} yet"
                f"{given or ': training starts from scratch'}")
            return ckpt_path
        say(f"restart {count} of the process group ({name}={count}): resuming from {path} (global step {step})")
        return str(path)
    if path is None:
        if not implicit:
            say(f"--ckpt_path=last: nothing to resume from in {directory}; training starts from scratch")
        return ckpt_path
    if implicit:
        say(f"{directory} holds checkpoints: continuing from {path} (to start over, use a new "
            "--trainer.default_root_dir)")
    return str(path)
