"""Image reading and resizing: any PIL image -> RGB -> a token grid -> the ViT copy and the VAE copy.

Both copies are resized from the same RGB image to the same (gh, gw) token grid, so token (r, c) covers the
same spatial cell in the ViT copy (vit_patch pixels a side) and in the VAE copy (vae_patch pixels a side).
That is what lets IL-RoPE give the two copies the same (H, W) positions.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from mogao.errors import ConfigError, DataError

_WHITE = (255, 255, 255)

# what PIL raises for an image it cannot convert: an unsupported mode (ValueError), malformed transparency
# (TypeError), broken EXIF data (struct.error, KeyError, SyntaxError, OSError)
_PIL_CONVERSION_ERRORS = (ValueError, TypeError, OSError, LookupError, struct.error, SyntaxError)


MAX_IMAGE_BYTES = 256 * 2**20
"""The largest image file read (`mogao data prepare/check --max-image-bytes`, `data.max_image_bytes` in training):
far above any image a sample needs, far below what would exhaust memory."""


def _limit_error(path: str | Path, size: int, max_bytes: int, flag: str, where: dict[str, Any]) -> DataError:
    return DataError(f"image file {path} is {size} bytes, more than the limit of {max_bytes} bytes; if it is an "
                     f"image you mean to use, raise the limit ({flag})", **where)


def open_image_file(path: str | Path, *, max_bytes: int = MAX_IMAGE_BYTES, flag: str = "--max-image-bytes",
                    file: str | None = None, line: int | None = None, field: str | None = None) -> BinaryIO:
    """The image file `path` opened for reading: a regular file (a FIFO would block, a device such as /dev/zero
    never ends, so neither is ever opened) of at most `max_bytes` bytes (`flag` raises the limit); DataError
    naming it otherwise. Checked before opening and again on the open file (in case it was swapped)."""
    where = {"file": file, "line": line, "field": field}

    def check(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"image {path} is not a regular file (a FIFO, device or folder could block or never "
                            "end); give an image file", **where)
        if st.st_size > max_bytes:
            raise _limit_error(path, st.st_size, max_bytes, flag, where)

    try:
        check(os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}", **where) from None
    except (OSError, ValueError) as e:  # permissions, a name too long, a NUL character
        raise DataError(f"cannot read image file {path}: {getattr(e, 'strerror', None) or e}", **where) from None
    try:
        check(os.fstat(fd))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_image_file(path: str | Path, *, max_bytes: int = MAX_IMAGE_BYTES, flag: str = "--max-image-bytes",
                    file: str | None = None, line: int | None = None, field: str | None = None) -> bytes:
    """The bytes of the image file `path`, checked as `open_image_file` checks it (and never more than
    `max_bytes` of them, should the file grow while it is read)."""
    where = {"file": file, "line": line, "field": field}
    with open_image_file(path, max_bytes=max_bytes, flag=flag, **where) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise DataError(f"cannot read image file {path}: {e.strerror or e}", **where) from None
    if len(data) > max_bytes:
        raise _limit_error(path, len(data), max_bytes, flag, where)
    return data


def open_image(path: str | Path | BinaryIO, *, file: str | None = None, line: int | None = None,
               field: str | None = None, max_bytes: int = MAX_IMAGE_BYTES,
               flag: str = "--max-image-bytes") -> Image.Image:
    """Read an image fully, EXIF orientation applied (truncated or corrupt files raise `DataError` here).

    `path` is a file path (opened by `open_image_file`: a regular file of at most `max_bytes` bytes, `flag`
    naming the setting that raises the limit) or a file-like object of encoded bytes. Images over PIL's
    decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`; PIL itself only warns below twice that) are
    refused before their pixels are decoded.
    """
    where = {"file": file, "line": line, "field": field}
    fp = open_image_file(path, max_bytes=max_bytes, flag=flag, **where) if isinstance(path, (str, Path)) else None
    try:
        with Image.open(path if fp is None else fp) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and img.width * img.height > limit:
                raise DataError(f"image {path} is {img.width}x{img.height} pixels, more than the limit of "
                                f"{limit} (PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); "
                                "downscale it", **where)
            img.load()
            return ImageOps.exif_transpose(img)  # a copy detached from the file
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"image file not found: {path}", **where) from e
    except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError, struct.error, ...
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}", **where) from e
    finally:
        if fp is not None:
            fp.close()


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    # PIL's own I;16 / I / F -> L conversion clips at 255 instead of rescaling, which turns most 16-bit images white
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or img.mode == "I":
        hi = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        a = a / hi
    a = np.clip(np.nan_to_num(a), 0.0, 1.0)
    return Image.fromarray((a * 255.0 + 0.5).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> RGB with EXIF orientation applied; transparency is composited on white.

    An image PIL cannot convert (an unsupported mode, broken EXIF data) raises `DataError`.
    """
    try:
        return _to_rgb(img)
    except DataError:  # (a ValueError too)
        raise
    except _PIL_CONVERSION_ERRORS as e:
        raise DataError(f"cannot convert a {img.mode} image to RGB: {type(e).__name__}: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("P", "L", "RGB") and "transparency" in img.info:  # a palette entry or colour key is transparent
        img = img.convert("RGBA")
    elif mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "La":  # premultiplied: PIL converts it only to LA
        img = img.convert("LA")
    elif mode.startswith("I;16") or mode in ("I", "F"):
        img = _high_bit_depth_to_l(img)
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, _WHITE + (255,))
        background.alpha_composite(img.convert("RGBA"))
        return background.convert("RGB")
    return img.convert("RGB")


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def choose_grid(height: int, width: int, max_tokens: int, min_grid: int = 1, max_grid: int | None = None,
                ) -> tuple[int, int]:
    """Token grid (gh, gw) for an image: as many tokens as fit in `max_tokens`, aspect ratio kept as well as possible.

    The ideal real-valued grid is gh* x gw* with gh*/gw* = height/width and gh*·gw* = max_tokens (clamped to
    [min_grid, max_grid] per side, the other side then following the aspect ratio within the budget). The
    result is the integer grid (floor or ceil per side) within the budget that is closest to it in
    |log gh/gh*| + |log gw/gw*|; ties go to more tokens.
    """
    hi = max_tokens if max_grid is None else max_grid
    if height < 1 or width < 1:
        raise DataError(f"image has no pixels ({width}x{height})")
    if min_grid < 1 or hi < min_grid or min_grid * min_grid > max_tokens:
        raise ConfigError(f"no token grid fits: min_grid={min_grid}, max_grid={max_grid}, "
                          f"max_image_tokens={max_tokens}; need 1 <= min_grid <= max_grid and min_grid² <= max_image_tokens")
    aspect = width / height
    gh, gw = math.sqrt(max_tokens / aspect), math.sqrt(max_tokens * aspect)
    if not min_grid <= gh <= hi:
        gh = _clamp(gh, min_grid, hi)
        gw = _clamp(aspect * gh, min_grid, min(hi, max_tokens / gh))
    elif not min_grid <= gw <= hi:
        gw = _clamp(gw, min_grid, hi)
        gh = _clamp(gw / aspect, min_grid, min(hi, max_tokens / gw))
    best: tuple[float, int, int, int] | None = None
    for h in {math.floor(gh), math.ceil(gh)}:
        for w in {math.floor(gw), math.ceil(gw)}:
            if not (min_grid <= h <= hi and min_grid <= w <= hi and h * w <= max_tokens):
                continue
            cost = abs(math.log(h / gh)) + abs(math.log(w / gw))
            key = (round(cost, 12), -h * w, h, w)
            if best is None or key < best:
                best = key
    assert best is not None  # floor/floor is always within the budget
    return best[2], best[3]


@dataclass
class ImageTensors:
    """One image ready for both encoders. vit: (3, gh*vit_patch, gw*vit_patch), vae: (3, gh*vae_patch, gw*vae_patch),
    float32 in [0, 1]."""

    vit: torch.Tensor
    vae: torch.Tensor
    grid: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    a = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_to_grid(img: Image.Image, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Resize an RGB image to exactly grid*patch pixels (PIL bicubic, which antialiases when shrinking)."""
    gh, gw = grid
    if min(gh, gw, patch) < 1:
        raise ConfigError(f"cannot resize to a {gh}x{gw} grid of {patch}-pixel patches: all must be >= 1")
    if img.mode != "RGB":
        raise DataError(f"resize_to_grid needs an RGB image, got mode {img.mode}; convert it with to_rgb")
    if img.width < 1 or img.height < 1:
        raise DataError(f"image has no pixels ({img.width}x{img.height})")
    return _to_tensor(img.resize((gw * patch, gh * patch), Image.Resampling.BICUBIC, reducing_gap=None))


def prepare_image(img: Image.Image, *, max_tokens: int, vit_patch: int, vae_patch: int, min_grid: int = 1,
                  max_grid: int | None = None) -> ImageTensors:
    """Convert, choose the grid and make both copies of one image: how an image becomes model input, for the
    lowering of samples (`mogao.data.plan`) and for the generation loop (`mogao.inference`) alike."""
    rgb = to_rgb(img)
    grid = choose_grid(rgb.height, rgb.width, max_tokens, min_grid, max_grid)
    return ImageTensors(resize_to_grid(rgb, grid, vit_patch), resize_to_grid(rgb, grid, vae_patch), grid)
