"""Shared helpers of the data tests: a tiny tokenizer, small images, JSONL files and a small data config."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from mogao.data import DataConfig, train_tokenizer

WORDS = "a red blue green cat dog square circle draw the now make it sleep big small left right of and".split()


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """One byte-level BPE per test process (training takes a few milliseconds, but once is enough)."""
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    return train_tokenizer(texts, vocab_size=400)


def small_config(**overrides: Any) -> DataConfig:
    """Tiny patches so image tensors stay a few hundred pixels; no dropout unless asked for."""
    base = dict(token_budget=256, max_image_tokens=16, vit_patch=2, vae_patch=4, p_drop_text=0.0,
                p_drop_images=0.0, seed=0, lookahead=4)
    base.update(overrides)
    return DataConfig(**base)


def make_image(path: Path | None = None, size: tuple[int, int] = (16, 12), mode: str = "RGB",
               color: Any = (200, 30, 30)) -> Image.Image:
    """A solid image of `size` (width, height); saved as PNG when `path` is given."""
    img = Image.new(mode, size, color)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    return img


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    """Write samples (dicts are JSON-encoded, strings written verbatim) one a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path
