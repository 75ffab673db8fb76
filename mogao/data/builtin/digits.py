"""Real handwritten digits (`sklearn.datasets.load_digits`: 1,797 images of 8x8 pixels, values 0-16, shipped
with scikit-learn, no download) as built-in tasks.

Images are drawn as a dark digit on a white ground (ink 16 -> black, 0 -> white), upscaled bilinearly to
`image_size` and converted to RGB, the same polarity as the shapes world (dark-ish figures on a light ground).

Split by image index: every 5th image (index % 5 == 4) is in `validation`, the others in `train`, so the two
splits share no real image. Within a split a sample first draws its label uniformly, then one image of it.

Tasks:
- `digits_t2i`:      "Draw the digit 3." -> image (generation target)
- `digits_classify`: image -> "What digit is this?" -> "3"
- `digits_next`:     image of N -> "Draw the next number." -> an image of (N + 1) % 10 (generation target),
                     drawn independently from the real images of that digit (the data set has no writer ids,
                     so the two images are two independent real samples, not one writer's pair)
"""

from __future__ import annotations

import functools
import importlib.util
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DIGIT_TASKS: tuple[str, ...] = ("digits_t2i", "digits_classify", "digits_next")
VALIDATION_EVERY = 5
CLASSIFY_QUESTION = "What digit is this?"
NEXT_INSTRUCTION = "Draw the next number."


def draw_prompt(label: int) -> str:
    return f"Draw the digit {label}."


def _digits_file() -> Path | None:
    """The CSV that `load_digits` reads, located without importing scikit-learn (which takes seconds)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (1797, 8, 8) with values 0-16, labels int64 (1797,)) - loaded once per process.

    Reads scikit-learn's bundled CSV directly, the same data and order as `load_digits()`; falls back to
    `load_digits()` if the file has moved.
    """
    path = _digits_file()
    if path is not None:
        table = np.loadtxt(path, delimiter=",")
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        data = load_digits()
        images, labels = data.images, data.target
    return images.astype(np.uint8), labels.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices of the real images in `split` ("train" or "validation")."""
    n = len(load_digit_images()[1])
    idx = np.arange(n)
    in_validation = idx % VALIDATION_EVERY == VALIDATION_EVERY - 1
    return idx[in_validation] if split == "validation" else idx[~in_validation]


@functools.lru_cache(maxsize=2)
def _by_label(split: str) -> tuple[tuple[int, ...], ...]:
    labels = load_digit_images()[1]
    idx = split_indices(split)
    return tuple(tuple(int(i) for i in idx[labels[idx] == d]) for d in range(10))


def render_digit(index: int, size: int = 32) -> Image.Image:
    """Real image `index` as a dark digit on white, `size` x `size`, RGB."""
    images = load_digit_images()[0]
    grey = np.rint(255.0 - images[index].astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
    small = Image.fromarray(grey, "L")
    return small.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def draw_digits_sample(task: str, split: str, rng: random.Random, image_size: int) -> tuple[list[dict], dict]:
    """(segments with PIL images, JSON-serialisable meta) of one digits sample."""
    by_label = _by_label(split)
    label = rng.randrange(10)
    index = by_label[label][rng.randrange(len(by_label[label]))]
    image = render_digit(index, image_size)
    meta: dict[str, Any] = {"held_out": False}
    if task == "digits_t2i":
        prompt = draw_prompt(label)
        segs = [{"text": prompt, "loss": False}, {"image": image, "generate": True}]
        meta.update(prompt=prompt, labels=[label], indices=[index])
    elif task == "digits_classify":
        answer = str(label)
        segs = [{"image": image}, {"text": CLASSIFY_QUESTION, "loss": False}, {"text": answer}]
        meta.update(question=CLASSIFY_QUESTION, answer=answer, labels=[label], indices=[index])
    elif task == "digits_next":
        nxt = (label + 1) % 10
        target = by_label[nxt][rng.randrange(len(by_label[nxt]))]
        segs = [{"image": image}, {"text": NEXT_INSTRUCTION, "loss": False},
                {"image": render_digit(target, image_size), "generate": True}]
        meta.update(instruction=NEXT_INSTRUCTION, labels=[label, nxt], indices=[index, target])
    else:
        raise ValueError(f"unknown digits task {task!r}; expected one of: {', '.join(DIGIT_TASKS)}")
    return segs, meta


def digits_corpus() -> list[str]:
    """Every text the digits tasks emit."""
    return [CLASSIFY_QUESTION, NEXT_INSTRUCTION] + [t for d in range(10) for t in (draw_prompt(d), str(d))]
