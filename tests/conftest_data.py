"""Shared helpers of the data tests: a tiny tokenizer, small images, JSONL files and a small data config."""

from __future__ import annotations

import json
import os
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
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


TIME_LIMIT = 5.0  # seconds a read may take before it counts as hung


def run_with_time_limit(fn, fifos: tuple[Path, ...] = ()):
    """`fn()`'s result (or its exception, raised here); fails when it is still running after TIME_LIMIT - a
    reader blocked on one of `fifos` is then released by opening the FIFO's other end, so no thread is left."""
    out: dict = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(TIME_LIMIT)
    if t.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader sees end of file
            except OSError:
                pass
        t.join(TIME_LIMIT)
        pytest.fail(f"the read was still running after {TIME_LIMIT} s (blocked on a FIFO?)")
    if "error" in out:
        raise out["error"]
    return out.get("value")
