"""Reading files someone else published, without trusting them: JSON with limits, safetensors headers read
before any tensor is allocated, file names kept inside their folder, and `BagelFormatError`, which names the
file and the keys at fault."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from mogao.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20  # a config JSON (BAGEL's are about 1 KB)
MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json of Qwen2.5 is about 7 MB
_SHOWN = 8  # keys named in a message before "(+N more)"


def _few(xs: list[str]) -> str:
    return ", ".join(xs[:_SHOWN]) + (f" (+{len(xs) - _SHOWN} more)" if len(xs) > _SHOWN else "")


class BagelFormatError(ConfigError):
    """A file that is not what a BAGEL folder (or a FLUX autoencoder file) must hold. The message names the
    file and the keys or fields at fault; `missing`, `unexpected` and `wrong_shapes` list the tensor keys."""

    def __init__(self, file: str | os.PathLike, message: str, *, missing: Iterable[str] = (),
                 unexpected: Iterable[str] = (), wrong_shapes: Iterable[str] = ()) -> None:
        self.file = str(file)
        self.missing, self.unexpected, self.wrong_shapes = sorted(missing), sorted(unexpected), list(wrong_shapes)
        super().__init__(f"{self.file}: {message}")


def file_inside(folder: str | os.PathLike, name: str) -> Path:
    """The regular file `name` of `folder`, resolved. Refused (BagelFormatError) when missing, when it is not a
    regular file, or when it - through a symlink or `..` - lies outside the folder: nothing a folder holds can
    make us read elsewhere."""
    base = Path(folder).resolve(strict=True)
    path = Path(folder) / name
    try:
        real = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise BagelFormatError(path, "missing (or a broken link)") from e
    if not real.is_relative_to(base):
        raise BagelFormatError(path, f"points outside the folder (to '{real}'); refusing to follow it")
    if not stat.S_ISREG(real.stat().st_mode):
        raise BagelFormatError(path, "is not a regular file")
    return real


def read_bytes(path: Path, limit: int) -> bytes:
    """The bytes of `path`, refused above `limit` bytes (checked before and while reading)."""
    size = path.stat().st_size
    if size > limit:
        raise BagelFormatError(path, f"is {size} bytes, more than the {limit} a file of this kind may hold")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise BagelFormatError(path, f"grew beyond {limit} bytes while being read")
    return data


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate key(s) {', '.join(dup)}")
    return dict(pairs)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes, where: str | os.PathLike) -> dict:
    """A JSON object from `data`: strict UTF-8, no NaN/Infinity, no duplicate keys, bounded nesting."""
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BagelFormatError(where, f"is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(obj, dict):
        raise BagelFormatError(where, f"must hold a JSON object, holds a {type(obj).__name__}")
    return obj


def read_json(path: Path, limit: int = MAX_CONFIG_BYTES) -> dict:
    """`parse_json` of a file of at most `limit` bytes."""
    return parse_json(read_bytes(path, limit), path)


# ---- safetensors headers ----------------------------------------------------------------------------------

# safetensors' dtype names -> torch dtypes (the floating ones a checkpoint may hold)
FLOAT_DTYPES: dict[str, torch.dtype] = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                                        "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says of one tensor: its shape and dtype name ("BF16", "F32", ...)."""

    shape: tuple[int, ...]
    dtype: str


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str] | None]:
    """(tensor name -> TensorInfo, the file's metadata) from a safetensors header; no tensor is read.

    The safetensors library checks that the header's offsets cover the file exactly, so a shape here is
    backed by bytes on disk (a hostile header cannot announce a tensor the file does not hold)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            infos = {}
            for k in f.keys():
                s = f.get_slice(k)
                infos[k] = TensorInfo(tuple(int(d) for d in s.get_shape()), str(s.get_dtype()))
    except (SafetensorError, OSError, ValueError) as e:
        raise BagelFormatError(path, f"is not a readable safetensors file ({str(e)[:200]}): truncated, or not "
                                     "safetensors? (only safetensors weights are read)") from e
    return infos, (dict(meta) if meta else None)


def check_tensors(path: Path, found: Mapping[str, TensorInfo], expected: Mapping[str, tuple[int, ...]],
                  hint: str = "") -> None:
    """Every expected tensor present with its shape and a floating dtype, and nothing else; BagelFormatError
    naming the missing, unexpected and wrongly shaped keys otherwise (`hint` says what could fix it)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {found[k].shape} (expected {tuple(expected[k])})" for k in expected
             if k in found and found[k].shape != tuple(expected[k])]
    bad_dtype = [f"{k} ({found[k].dtype})" for k in expected if k in found and found[k].dtype not in FLOAT_DTYPES]
    if missing or unexpected or wrong or bad_dtype:
        why = [f"missing {len(missing)} tensor(s): {_few(sorted(missing))}" if missing else "",
               f"{len(unexpected)} unexpected tensor(s): {_few(sorted(unexpected))}" if unexpected else "",
               f"{len(wrong)} tensor(s) of the wrong shape: {_few(wrong)}" if wrong else "",
               f"non-floating tensor(s): {_few(bad_dtype)}" if bad_dtype else ""]
        raise BagelFormatError(path, "; ".join(w for w in why if w) + (f" - {hint}" if hint else ""),
                               missing=missing, unexpected=unexpected, wrong_shapes=wrong + bad_dtype)


def load_tensors(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a safetensors file (call `check_tensors` on its header first)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}
