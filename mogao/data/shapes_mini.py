"""A handful of procedural interleaved samples (coloured shapes, drawn with PIL) for tests, benchmarks and
smoke runs - in memory, deterministic by seed, no files needed."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from mogao.data.builtin.shapes import COLOURS as BUILTIN_COLOURS

COLOURS = {c: BUILTIN_COLOURS[c] for c in ("red", "green", "blue", "yellow")}  # the built-in palette's first four
SHAPES = ("square", "circle", "triangle")


def draw_shape(shape: str, colour: str, size: tuple[int, int] = (32, 32), background=(255, 255, 255)) -> Image.Image:
    """One shape of one colour, centred."""
    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    w, h = size
    box = (w * 0.2, h * 0.2, w * 0.8, h * 0.8)
    fill = COLOURS[colour]
    if shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "circle":
        d.ellipse(box, fill=fill)
    else:
        d.polygon([(w * 0.5, h * 0.15), (w * 0.85, h * 0.8), (w * 0.15, h * 0.8)], fill=fill)
    return img


def interleaved_samples(n: int, seed: int = 0, max_targets: int = 2, size: tuple[int, int] = (32, 32)) -> list[dict]:
    """`n` sample dicts (in-memory images) mixing captions, condition images and generation targets."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        segs: list[dict] = [{"text": f"Draw a {colour} {shape}."},
                            {"image": draw_shape(shape, colour, size), "generate": True}]
        for _ in range(rng.randint(0, max_targets - 1)):
            colour = rng.choice([c for c in COLOURS if c != colour])
            segs += [{"text": f"Now make it {colour}.", "loss": rng.random() < 0.5},
                     {"image": draw_shape(shape, colour, size), "generate": True}]
        if rng.random() < 0.5:
            segs += [{"image": draw_shape(shape, colour, size)}, {"text": f"It is a {colour} {shape}."}]
        out.append({"id": f"shapes-{seed}-{i}", "segments": segs})
    return out


def caption_corpus() -> list[str]:
    """Texts to train a tiny tokenizer that covers the samples above."""
    texts = []
    for c in COLOURS:
        for s in SHAPES:
            texts += [f"Draw a {c} {s}.", f"Now make it {c}.", f"It is a {c} {s}."]
    return texts * 4
