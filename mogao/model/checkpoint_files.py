"""Training checkpoints read without running code: whole files through `torch.load(weights_only=True)` with the
few classes Lightning puts in them allowed, sharded folders through a shard index read by an unpickler that only
builds torch's own index records. Used by `load_model` and by the training's resume checks."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from mogao.errors import ConfigError, printable

StrPath = str | os.PathLike


# ---- JSON configs of folders from others -------------------------------------------------------------------

MAX_CONFIG_BYTES = 64 * 2**20  # a config or index JSON (a model's are kilobytes, a weight index a few MB)


def read_json_config(path: StrPath, what: str, limit: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON value in `path`, `what` (e.g. "a mogao config") naming it in errors: a regular file of at most
    `limit` bytes, UTF-8, nested no deeper than Python parses. ConfigError naming the file otherwise."""
    p = Path(path)
    try:
        st = os.stat(p)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"'{p}' is not a regular file; expected {what}")
        if st.st_size > limit:
            raise ConfigError(f"'{p}' is {st.st_size} bytes, more than the {limit} bytes {what} may have")
        with open(p, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ConfigError(f"'{p}' grew beyond {limit} bytes while it was read; expected {what}")
        return json.loads(data.decode("utf-8"))
    except ConfigError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"'{p}' is not a valid {what.removeprefix('a ').removeprefix('an ')} "
                          f"({type(e).__name__}: {str(e)[:200]})") from e


# ---- weight indexes of sharded component checkpoints ------------------------------------------------------

# model.safetensors.index.json, diffusion_pytorch_model.safetensors.index.json, ...
WEIGHT_INDEX_SUFFIX = ".index.json"


def indexed_weight_files(index: StrPath) -> list[Path]:
    """The weight files the index `index` (e.g. `model.safetensors.index.json`) names in its `weight_map`,
    each a file of the index's own folder: a relative path without `..` (read as `transformers` and `diffusers`
    read it, joined to that folder). An entry that is absolute, climbs out with `..`, or is not a string is
    refused (ConfigError naming the index and the entry): a folder from elsewhere cannot make us read weights
    outside it."""
    p = Path(index)
    data = read_json_config(p, "a weight index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ConfigError(f"'{p}' is not a weight index: it has no 'weight_map' object")
    files = []
    for key, name in weight_map.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        inside = (parts and not PurePosixPath(name).is_absolute() and not PureWindowsPath(name).drive
                  and "\\" not in name and "\0" not in name and not any(x in ("..", ".") for x in parts))
        if not inside:
            raise ConfigError(f"'{p}' names the weight file {printable(repr(name))} (for {printable(repr(key))}), "
                              "which is not a file of its folder; refusing to read it")
        files.append(p.parent.joinpath(*parts))
    return sorted(set(files))


def check_weight_indexes(directory: StrPath) -> None:
    """Check every weight index in `directory` and in its immediate subfolders (a pipeline's `vae/`, ...) with
    `indexed_weight_files`, before a loader follows one."""
    d = Path(directory)
    for index in sorted([*d.glob("*" + WEIGHT_INDEX_SUFFIX), *d.glob("*/*" + WEIGHT_INDEX_SUFFIX)]):
        indexed_weight_files(index)


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


def refuse_compressed_records(source: Any, path: StrPath, what: str = "the archive") -> None:
    """Refuse (CheckpointError naming `path`) a `torch.save` archive - `source`, a path or a seekable file -
    with a compressed member: `torch.save` never compresses, and `torch.load` inflates such a member into as
    much memory as it claims, far more than the file may hold. Only the zip directory is read; what is not a
    zip archive is left to the loader (which reports it)."""
    try:
        with zipfile.ZipFile(source) as zf:
            packed = [i.filename for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return
    if packed:
        raise CheckpointError(path, f"{what} holds compressed member(s) ({printable(', '.join(packed[:3]))}), "
                                    "which torch.save never writes and which could inflate to far more memory "
                                    "than the file holds; refusing to load it")


def _check_records(path: Path) -> None:
    """Read every record of a zip-format checkpoint, comparing it with its CRC-32 (compressed ones are refused
    unread: `refuse_compressed_records`)."""
    refuse_compressed_records(path, path, "the checkpoint")
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
    refuse_compressed_records(path, path, "the checkpoint")
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


class _Window(io.RawIOBase):
    """Bytes [start, start + length) of the open file `f`, as a seekable file of its own (a record inside a
    shard file, for `zipfile` to read its directory from)."""

    def __init__(self, f: Any, start: int, length: int) -> None:
        super().__init__()
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + offset, 0), self.length)
        return self.pos

    def readinto(self, b: Any) -> int:
        self.f.seek(self.start + self.pos)
        data = self.f.read(min(len(b), self.length - self.pos))
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def check_shard_records(directory: StrPath, index: Any) -> None:
    """Check every record the shard index of a sharded checkpoint names, before torch's reader reads it: it
    lies inside a regular file of the checkpoint folder, is stored as `torch.save` writes it (no transform, no
    compressed member, which would inflate into as much memory as it claims), and - for a non-tensor record,
    which torch's reader unpickles without restriction when the optimizer state is loaded - loads weights-only.
    CheckpointError naming the shard file (or the index) otherwise."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    d = Path(directory)
    storage = getattr(index, "storage_data", None) or {}
    kinds = getattr(index, "state_dict_metadata", None) or {}
    if not isinstance(storage, dict) or not isinstance(kinds, dict):
        raise CheckpointError(d / SHARDED_INDEX, "a shard index without its storage tables")
    sizes: dict[str, int] = {}
    for key, info in storage.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or Path(rel).name != rel or rel in ("", ".", ".."):
            raise CheckpointError(d / SHARDED_INDEX, f"names the shard file {printable(repr(rel))}, which is not "
                                                     "a file of the checkpoint folder")
        shard, fqn = d / rel, printable(getattr(key, "fqn", key))
        if rel not in sizes:
            try:
                st = os.stat(shard)
            except OSError as e:
                raise CheckpointError(shard, f"cannot be read ({_reason(e)})") from e
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError(shard, "is not a regular file")
            sizes[rel] = st.st_size
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (type(offset) is int and type(length) is int and 0 <= offset and 0 <= length
                and offset + length <= sizes[rel]):
            raise CheckpointError(shard, f"record '{fqn}' lies outside the file ({sizes[rel]} bytes)")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(shard, "holds a transformed (e.g. compressed) record, which cannot be checked")
        try:
            with open(shard, "rb") as f:
                record = io.BufferedReader(_Window(f, offset, length))
                refuse_compressed_records(record, shard, f"record '{fqn}'")
                if isinstance(kinds.get(getattr(key, "fqn", None)), BytesStorageMetadata):
                    record.seek(0)
                    torch.load(io.BytesIO(record.read()), map_location="cpu", weights_only=True)
        except (MemoryError, CheckpointError):
            raise
        except Exception as e:
            raise CheckpointError(shard, f"record '{fqn}' cannot be loaded weights-only ({_reason(e)}); "
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
