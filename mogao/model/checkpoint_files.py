"""Training checkpoints read without running code: whole files through `torch.load(weights_only=True)` with the
few classes Lightning puts in them allowed, sharded folders through a shard index read by an unpickler that only
builds torch's own index records. Used by `load_model` and by the training's resume checks."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mogao.errors import ConfigError

StrPath = str | os.PathLike


# ---- training checkpoints: read weights-only, never running code ------------------------------------------

REQUIRED_KEYS = ("state_dict", "global_step")
# a sharded (FSDP) checkpoint is a directory: Lightning's metadata file (non-tensor state) and the shard index
SHARDED_META = "meta.pt"
SHARDED_INDEX = ".metadata"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: the message names the file and what is wrong with it."""

    def __init__(self, path: StrPath, problem: str) -> None:
        super().__init__(f"checkpoint {path}: {problem}")
        self.path, self.problem = Path(path), problem


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _unloadable(path: StrPath, e: BaseException) -> str:
    """Why `torch.load` failed on `path`, in words."""
    with contextlib.suppress(OSError):
        if Path(path).is_file() and not zipfile.is_zipfile(path):
            return f"not a complete torch.save archive (no zip directory at its end): truncated, or not a " \
                   f"checkpoint (torch.load: {type(e).__name__})"
    return f"cannot be loaded ({_reason(e)}); it is damaged or not a checkpoint"


def validate_checkpoint(checkpoint: Any, path: StrPath, sharded: bool = False) -> int:
    """The `global_step` of a loaded Lightning checkpoint; CheckpointError when it lacks what resuming needs.

    `sharded`: `checkpoint` is the metadata of a sharded checkpoint directory (the weights are in the shards).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(path, f"holds a {type(checkpoint).__name__}, not a Lightning checkpoint dict")
    required = ("global_step",) if sharded else REQUIRED_KEYS
    missing = [k for k in required if k not in checkpoint]
    if missing:
        raise CheckpointError(path, f"missing key(s) {', '.join(repr(k) for k in missing)}; not a Lightning "
                                    "training checkpoint")
    if not sharded and not isinstance(checkpoint["state_dict"], Mapping):
        kind = type(checkpoint["state_dict"]).__name__
        raise CheckpointError(path, f"'state_dict' is a {kind}, not a mapping")
    step = checkpoint["global_step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(path, f"'global_step' is {step!r}, not a non-negative integer")
    return step


def check_checkpoint(path: StrPath) -> int:
    """Check that the checkpoint at `path` is complete, undamaged and a Lightning checkpoint; its global step.

    A file is read in full: every record of the archive that `torch.save` writes must match its CRC-32 (which
    finds damage anywhere, not only a torn end); then its structure is loaded (memory-mapped, on the CPU) and
    validated. A sharded checkpoint directory is checked through its metadata file and shard index.
    Raises CheckpointError naming the file and the problem.
    """
    p = Path(path)
    if p.is_dir():
        meta, index = p / SHARDED_META, p / SHARDED_INDEX
        if not meta.is_file() or not index.is_file():
            raise CheckpointError(p, f"a directory without '{SHARDED_META}' and '{SHARDED_INDEX}': not a "
                                     "sharded checkpoint, or one whose save was interrupted")
        check_shard_records(p, read_shard_index(index))
        return validate_checkpoint(_load(meta), meta, sharded=True)
    if not p.is_file():
        raise CheckpointError(p, "does not exist")
    if p.stat().st_size == 0:
        raise CheckpointError(p, "is empty (0 bytes)")
    if not zipfile.is_zipfile(p):  # truncated (no zip directory at its end), garbage, or the legacy format
        return validate_checkpoint(_load(p), p)
    _check_records(p)
    try:
        checkpoint = _load(p, mmap=True)  # the records were just read: only the structure is needed
    except CheckpointError:
        checkpoint = _load(p)  # (a file system without mmap support)
    return validate_checkpoint(checkpoint, p)


def _check_records(path: Path) -> None:
    """Read every record of a zip-format checkpoint, comparing it with its CRC-32."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # saved without CRC-32s (torch.serialization.set_crc32_options(False))
                with zf.open(info) as f:  # zipfile compares the CRC-32 once the record is read to its end
                    while f.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(path, f"damaged archive ({_reason(e)})") from e


def register_safe_globals() -> None:
    """Allow the config classes checkpoints hold (`ModelConfig`, `TimestepSampling`, `TinySpec`) in
    weights-only loading (they register themselves when imported)."""
    import mogao.model.tiny  # noqa: F401


def _load(path: Path, mmap: bool = False) -> Any:
    register_safe_globals()
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(path, _unloadable(path, e)) from e


def load_checkpoint_file(path: StrPath, mmap: bool = False) -> Any:
    """`torch.load` of a checkpoint file (or a sharded checkpoint's `meta.pt`) in the weights-only format only;
    CheckpointError naming the file when it holds anything else or cannot be read."""
    return _load(Path(path), mmap=mmap)


# ---- the shard index of a sharded checkpoint ------------------------------------------------------------

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# what torch's distributed checkpoint writer puts in `.metadata` (torch.distributed.checkpoint.filesystem)
_INDEX_CLASSES = {
    (_DCP_METADATA, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                       "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "StorageMeta",
                                       "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _ShardIndexUnpickler(pickle.Unpickler):
    """Builds only the classes of a distributed checkpoint's index (and torch dtypes); anything else is an
    error, so unpickling cannot call arbitrary functions."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _INDEX_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a shard index never holds")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("holds a persistent reference, which a shard index never holds")


def read_shard_index(path: StrPath) -> Any:
    """The `torch.distributed.checkpoint` index (`Metadata`) in the file `path` (a sharded checkpoint's
    `.metadata`), read without running code: CheckpointError naming the file when it holds anything but the
    index classes torch writes there."""
    from torch.distributed.checkpoint.metadata import Metadata

    p = Path(path)
    try:
        with open(p, "rb") as f:
            index = _ShardIndexUnpickler(f).load()
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(p, f"not a shard index that can be read safely ({_reason(e)}); refusing to load "
                                 "it") from e
    if not isinstance(index, Metadata):
        raise CheckpointError(p, f"holds a {type(index).__name__}, not a distributed checkpoint index")
    return index


def check_shard_records(directory: StrPath, index: Any) -> None:
    """Read every non-tensor record of a sharded checkpoint's shard files weights-only (torch's reader
    unpickles those records without restriction when the optimizer state is loaded); CheckpointError naming
    the shard file when one holds anything else or lies outside the checkpoint."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    d = Path(directory)
    storage = getattr(index, "storage_data", None) or {}
    kinds = getattr(index, "state_dict_metadata", None) or {}
    if not isinstance(storage, dict) or not isinstance(kinds, dict):
        raise CheckpointError(d / SHARDED_INDEX, "a shard index without its storage tables")
    for key, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise CheckpointError(d / SHARDED_INDEX, f"names the shard file {rel!r}, which is not a file of the "
                                                     "checkpoint folder")
        if not isinstance(kinds.get(getattr(key, "fqn", None)), BytesStorageMetadata):
            continue  # tensors: torch reads them weights-only
        shard = d / rel
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(shard, "holds a transformed (e.g. compressed) record, which cannot be checked")
        try:
            with open(shard, "rb") as f:
                f.seek(int(info.offset))
                data = f.read(int(info.length))
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except Exception as e:
            raise CheckpointError(shard, f"record '{key.fqn}' cannot be loaded weights-only ({_reason(e)}); "
                                         "refusing to load it") from e


def check_sharded_checkpoint(directory: StrPath) -> None:
    """Check a sharded checkpoint folder's shard index and non-tensor records (see `read_shard_index` and
    `check_shard_records`) before torch's reader opens it; CheckpointError naming the file otherwise."""
    d = Path(directory)
    index = d / SHARDED_INDEX
    if not index.is_file():
        raise CheckpointError(d, f"a directory without '{SHARDED_INDEX}': not a sharded checkpoint, or one whose "
                                 "save was interrupted")
    check_shard_records(d, read_shard_index(index))
