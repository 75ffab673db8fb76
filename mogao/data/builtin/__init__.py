"""Built-in procedural data sets: the shapes world and real handwritten digits, generated in memory.

    from mogao.data.builtin import make_builtin
    data = make_builtin("edit", split="train", n=1000, seed=0)
    samples = samples_from_dicts(data.samples)   # schema-valid; data.meta[i] is sample i's ground truth

Every set is deterministic: the same (task, split, n, seed, options) gives the same ids, texts and pixels, in any
process. Sample i is drawn from its own random stream, seeded by a stable hash of (task, split, seed, i), so
train and validation are disjoint streams and `n=10` gives the first ten samples of `n=1000`. The image size
only changes the pixels, never what is drawn.

See `shapes` (the tasks t2i, caption, vqa, edit, story and the held-out colour-shape pairs) and `digits`
(digits_t2i, digits_classify, digits_next) for the content; `builtin_corpus()` trains a tokenizer for them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mogao.data.builtin.digits import DIGIT_TASKS, digits_corpus, draw_digits_sample, render_digit
from mogao.data.builtin.shapes import (
    BACKGROUNDS,
    CELLS,
    COLOURS,
    HELD_OUT_PAIRS,
    MAX_STORY_IMAGES,
    SHAPE_TASKS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    caption,
    draw_episode,
    is_held_out,
    object_mask,
    render,
    render_episode,
    shapes_corpus,
)
from mogao.data.plan import stable_seed
from mogao.errors import ConfigError

TASKS: tuple[str, ...] = SHAPE_TASKS + DIGIT_TASKS
SPLITS: tuple[str, ...] = ("train", "validation")
MAX_OBJECTS = len(CELLS)
MIN_IMAGE_SIZE = 8
_SHAPE_OPTIONS = ("backgrounds", "max_images")


@dataclass
class BuiltinSet:
    """Generated samples and, in the same order, their ground truth.

    samples: schema-valid sample dicts (PIL images inline); ids are f"{task}-{split}-{seed}-{i}".
    meta:    JSON-serialisable dicts. Always "task", "split", "held_out"; shapes tasks add "scenes" (one
             `Scene.to_dict()` per image, in sample order) and per task "caption" (t2i, caption), "kind" /
             "question" / "answer" (vqa), "instruction" / "op" (edit), "instructions" / "ops" (story); digits
             tasks add "labels" and "indices" (one per image: the digit and its index in `load_digits`) and
             "prompt", "question" / "answer" or "instruction".
    """

    samples: list[dict[str, Any]]
    meta: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.samples)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_args(task: Any, split: Any, n: Any, seed: Any, image_size: Any, max_objects: Any,
                options: dict[str, Any]) -> tuple[tuple[str, ...], int]:
    """Validate the arguments of `make_builtin`; returns the backgrounds to draw from and the most images a
    story has."""
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is unknown; valid tasks: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is invalid; use 'train' or 'validation'")
    if not _is_int(n) or n < 1:
        raise ConfigError(f"n={n!r} is invalid; the number of samples must be an integer >= 1")
    if not _is_int(seed):
        raise ConfigError(f"seed={seed!r} is invalid; it must be an integer")
    if not _is_int(image_size) or image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size={image_size!r} is invalid; it must be an integer >= {MIN_IMAGE_SIZE}")
    if not _is_int(max_objects) or not 1 <= max_objects <= MAX_OBJECTS:
        raise ConfigError(f"max_objects={max_objects!r} is invalid; it must be an integer from 1 to {MAX_OBJECTS}")
    unknown = [k for k in options if k not in _SHAPE_OPTIONS]
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(_SHAPE_OPTIONS)}")
    backgrounds = options.get("backgrounds", ("white",))
    if isinstance(backgrounds, str):
        backgrounds = (backgrounds,)
    if not isinstance(backgrounds, Sequence) or not backgrounds or any(b not in BACKGROUNDS for b in backgrounds):
        raise ConfigError(f"backgrounds={backgrounds!r} is invalid; give a non-empty list of: "
                          f"{', '.join(BACKGROUNDS)}")
    max_images = options.get("max_images", MAX_STORY_IMAGES)
    if not _is_int(max_images) or not 2 <= max_images <= MAX_STORY_IMAGES:
        raise ConfigError(f"max_images={max_images!r} is invalid; give an integer from 2 to {MAX_STORY_IMAGES}")
    return tuple(backgrounds), max_images


def make_builtin(task: str, *, split: str = "train", n: int = 100, seed: int = 0, image_size: int = 32,
                 max_objects: int = 4, **options: Any) -> BuiltinSet:
    """Generate `n` samples of a built-in task.

    task:        one of `TASKS`
    split:       "train" or "validation" (shapes: held-out colour-shape pairs only in validation; digits:
                 disjoint real images)
    image_size:  side of the square RGB images, >= 8
    max_objects: shapes tasks: at most this many objects per scene, 1-4 (1: one centred object; edits and
                 stories then only recolour, reshape and resize)
    options:     shapes tasks: `backgrounds`, the background names to draw from (default ("white",); see
                 `BACKGROUNDS`); `max_images`, the most images a story has, 2-5 (default 5; each story draws
                 from 2 to that many; the other tasks ignore it)

    The digits tasks check but ignore the shapes-only arguments, so one set of arguments serves a mixture.

    Raises `ConfigError` naming the bad argument.
    """
    backgrounds, max_images = _check_args(task, split, n, seed, image_size, max_objects, options)
    samples, meta = [], []
    for i in range(n):
        rng = random.Random(stable_seed("mogao.builtin", task, split, seed, i))
        if task in DIGIT_TASKS:
            segments, info = draw_digits_sample(task, split, rng, image_size)
        else:
            episode = draw_episode(task, split, rng, max_objects=max_objects, backgrounds=backgrounds,
                                   max_images=max_images)
            segments, info = render_episode(episode, image_size)
        sid = f"{task}-{split}-{seed}-{i}"
        samples.append({"id": sid, "segments": segments})
        meta.append({"task": task, "split": split, "id": sid, **info})
    return BuiltinSet(samples, meta)


def builtin_corpus() -> list[str]:
    """Texts covering every word any built-in task can emit (captions, questions, answers, instructions, digit
    prompts), to train a tiny tokenizer: `train_tokenizer(builtin_corpus(), vocab_size=400)`."""
    return shapes_corpus() + digits_corpus()


__all__ = [
    "BACKGROUNDS", "CELLS", "COLOURS", "HELD_OUT_PAIRS", "SHAPES", "SIZES", "TASKS", "BuiltinSet", "Obj", "Scene",
    "builtin_corpus", "caption", "is_held_out", "make_builtin", "object_mask", "render", "render_digit",
]
