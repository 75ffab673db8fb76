"""Regenerate `tests/data/lora/`: the small data sets of the tiny LoRA recipes, made with the shapes world.

They teach a colour the shapes palette does not have, teal, so a fine-tune has something new to learn:

    t2i.jsonl            teal shapes and ordinary shapes from captions (generation targets)
    understanding.jsonl  teal shapes described and asked about (image -> text)
    interleaved.jsonl    recolouring edits to and from teal (image -> instruction -> image)

Deterministic: run `python tests/data/make_lora_data.py` and the files come out byte-identical.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from mogao.data.builtin.shapes import BACKGROUNDS, COLOURS, SHAPES, Obj, Scene, object_mask, render

NEW_COLOUR = "teal"
NEW_RGB = (0, 128, 128)
SIZE = 32
OUT = Path(__file__).resolve().parent / "lora"


def draw(shape: str, colour: str, size: str = "large") -> Image.Image:
    """One centred object on white; `colour` may be the new colour."""
    if colour in COLOURS:
        return render(Scene((Obj(shape, colour, size),)), SIZE)
    a = np.full((SIZE, SIZE, 3), BACKGROUNDS["white"], dtype=np.uint8)
    a[object_mask(Obj(shape, "red", size), SIZE)] = NEW_RGB
    return Image.fromarray(a, "RGB")


def caption(shape: str, colour: str, size: str = "large") -> str:
    return f"A {size} {colour} {shape} on a white background."


class _Images:
    """Writes each distinct image once, as img/<name>.png; returns the path relative to the JSONL files."""

    def __init__(self) -> None:
        (OUT / "img").mkdir(parents=True, exist_ok=True)

    def __call__(self, shape: str, colour: str, size: str = "large") -> str:
        name = f"img/{size}_{colour}_{shape}.png"
        if not (OUT / name).is_file():
            draw(shape, colour, size).save(OUT / name, optimize=True)
        return name


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    img = _Images()
    rng = random.Random(0)
    sizes = ("large", "small")
    old = list(COLOURS)

    t2i = []
    for i in range(40):  # 2 of 3 teal, the rest other colours so the word, not the task, decides the colour
        colour = NEW_COLOUR if i % 3 != 2 else rng.choice(old)
        shape, size = rng.choice(SHAPES), rng.choice(sizes)
        t2i.append({"id": f"t2i-{i}", "segments": [{"text": caption(shape, colour, size), "loss": False},
                                                   {"image": img(shape, colour, size), "generate": True}]})
    und = []
    for i in range(24):
        colour = NEW_COLOUR if i % 3 != 2 else rng.choice(old)
        shape, size = rng.choice(SHAPES), rng.choice(sizes)
        if i % 2:
            q, a = f"What colour is the {shape}?", colour
        else:
            q, a = "Describe the image.", f"A {size} {colour} {shape}."
        und.append({"id": f"und-{i}", "segments": [{"image": img(shape, colour, size)},
                                                   {"text": q, "loss": False}, {"text": a}]})
    inter = []
    for i in range(16):
        shape, size, other = rng.choice(SHAPES), rng.choice(sizes), rng.choice(old)
        src, dst = (other, NEW_COLOUR) if i % 2 == 0 else (NEW_COLOUR, other)
        inter.append({"id": f"edit-{i}", "segments": [
            {"text": f"Draw {caption(shape, src, size)[0].lower()}{caption(shape, src, size)[1:]}", "loss": False},
            {"image": img(shape, src, size), "generate": True},
            {"text": f"Now make it {dst}.", "loss": False},
            {"image": img(shape, dst, size), "generate": True}]})
    for name, rows in (("t2i", t2i), ("understanding", und), ("interleaved", inter)):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT}: {len(t2i)} + {len(und)} + {len(inter)} samples, {total / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
