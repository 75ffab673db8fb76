"""Validation of what a user hands the generation loop: a saved model directory, prompts, image files and
in-memory images.

Everything either works - images of any size and mode are converted to RGB and resized to a token grid exactly
as the data pipeline does (`mogao.data.images`) - or raises `ConfigError` / `DataError` naming the argument
or file and what would fix it.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image

from mogao.data.images import ImageTensors, open_image, prepare_image, to_rgb
from mogao.errors import ConfigError, DataError
from mogao.model.io import load_tokenizer

_ALLOWED_CONTROL = {"\n", "\t", "\r"}


def load_model_dir(directory: str | Path, tokenizer: str | Path | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a directory saved with `MogaoModel.save_pretrained` or of a published
    BAGEL folder (the tokenizer from the same directory unless `tokenizer` names another):
    `mogao.bagel.load.load_any_model` and `load_tokenizer`."""
    from mogao.bagel.folder import is_bagel_folder, load_bagel_tokenizer
    from mogao.bagel.load import load_any_model

    d = Path(directory).expanduser()
    if not d.exists():
        raise ConfigError(f"checkpoint directory not found: '{d}' (give --ckpt a directory saved with "
                          "save_pretrained, e.g. runs/demo/2-t2i/model, or a BAGEL folder)")
    if tokenizer is None and is_bagel_folder(d):
        return load_any_model(d).eval(), load_bagel_tokenizer(d)
    return load_any_model(d).eval(), load_tokenizer(tokenizer if tokenizer is not None else d)


def check_prompt(text: object, what: str = "prompt") -> str:
    """A usable prompt string: not empty, not only whitespace, no control characters but newline and tab,
    encodable as UTF-8 (no unpaired surrogates)."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ConfigError(f"{what} is empty or only whitespace; give some text")
    for i, ch in enumerate(text):
        if unicodedata.category(ch) == "Cc" and ch not in _ALLOWED_CONTROL:
            raise ConfigError(f"{what} has a control character {ch!r} at index {i}; remove it")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} is not valid Unicode text ({e.reason} at index {e.start}); remove the "
                          "unpaired surrogate") from e
    return text


def load_image(image: str | Path | Image.Image, what: str = "image") -> Image.Image:
    """An input image (a path or a PIL image) as RGB; unreadable, missing or unconvertible images raise
    `DataError` naming the file or argument."""
    if isinstance(image, Image.Image):
        img = image
        name = what
    elif isinstance(image, (str, Path)):
        name = str(image)
        if not Path(image).exists():
            raise DataError(f"{what}: image file not found: {image} (give an existing PNG/JPEG/... file)")
        img = open_image(image, field=what)  # (a regular file only: a FIFO or a device is refused, never read)
    else:
        raise ConfigError(f"{what} must be a file path or a PIL image, got {type(image).__name__}")
    try:
        rgb = to_rgb(img)
    except DataError as e:
        raise DataError(f"{what} ({name}): {e.message}") from e
    if rgb.width < 1 or rgb.height < 1:
        raise DataError(f"{what} ({name}) has no pixels ({rgb.width}x{rgb.height})")
    return rgb


def image_tensors(img: Image.Image, max_tokens: int, vit_patch: int, vae_patch: int) -> ImageTensors:
    """Both copies of an image on the token grid the data pipeline would choose for `max_tokens` (the data
    pipeline's own `prepare_image`)."""
    return prepare_image(img, max_tokens=max_tokens, vit_patch=vit_patch, vae_patch=vae_patch)
