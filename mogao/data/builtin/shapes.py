"""The shapes world: scenes of coloured shapes on a 2x2 grid, rendered exactly, with tasks built on them.

A `Scene` is either one centred object (`cell=None`, the simplest text-to-image case) or 1-4 objects in
distinct cells of a 2x2 grid. Objects have a colour (6), a shape (4) and a size (2); the background is white or
a light tint that no object colour can be confused with. No two objects of a scene share a (colour, shape) pair,
so "the red circle" always names one object.

Geometry (in units of the region an object sits in: its cell, or the whole image when centred): the object's
bounding box is centred in the region and is 3/4 of it wide (large) or 1/2 (small). Shapes are defined on that
box: a filled square; the inscribed circle; an upward isosceles triangle with its apex at the top middle and its
base on the bottom edge; a plus-shaped cross whose arms are 1/3 of the box wide. A pixel belongs to a shape when
its centre lies inside, so rendering has no anti-aliasing and is exactly reproducible. From 32x32 up, a pixel
judge tells the shapes apart by the object's bounding box: a square fills it, a triangle widens downwards, a
circle fills about 3/4 of it and a cross about half, with empty corners. Objects are inset from their cell, so
the image corners always show the background.

Tasks (each sample is a schema-valid sample dict with PIL images inline; prompts and instructions carry
`"loss": false`, captions and answers to be learnt carry loss):

- `t2i`:     caption -> image (generation target)
- `caption`: image -> "Describe the image." -> caption
- `vqa`:     image -> question -> short answer (colour of a shape, shape of a colour, count, yes/no, position)
- `edit`:    image -> instruction -> edited image (generation target). Six kinds of edit (`EDIT_KINDS`):
             recolour, reshape or resize an object, move it to a free cell, remove it (of two or more), add one
             in a free cell; move, remove and add need cells (max_objects > 1).
- `story`:   "Draw ..." -> image -> instruction -> image ... (2-5 images, or 2 to `max_images`, every one a
             generation target), each instruction one of the six edits of the previous image

Edit instructions come from one grammar in both tasks (`instruction`): "now" or nothing before the body,
capitalised or not, a lone object called "it" or by its name ("Make it blue.", "now turn the circle into a
square."), so whatever an edit teaches, a story turn can use.

Held-out compositions: the (colour, shape) pairs in `HELD_OUT_PAIRS` never appear in the `train` split of any
task - neither in a scene nor named in a text. The `validation` split draws from all 24 pairs and forces about
half of its samples to contain a held-out pair; `meta["held_out"]` flags every sample where a held-out pair is
in a scene or named in a text (as in "Is there a blue circle?"), so compositional generalisation is measured on
the flagged samples. (With `max_objects=1` the space of scenes is small, so validation samples
without a held-out pair may repeat training scenes; that is expected.)
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
CELLS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light grey": (220, 220, 220),
    "light blue": (205, 225, 250),
    "light yellow": (255, 250, 210),
}
CENTRE = "centre"
MAX_STORY_IMAGES = 5

#: (colour, shape) pairs that never occur in a training sample. Every shape and four different colours are held
#: out once, so each held-out pair combines a colour and a shape that are both seen in training (with other
#: partners); yellow and orange are seen with every shape.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "cross"),
    ("blue", "circle"),
    ("purple", "square"),
)
_HELD_OUT = frozenset(HELD_OUT_PAIRS)

ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in _HELD_OUT)

SHAPE_TASKS: tuple[str, ...] = ("t2i", "caption", "vqa", "edit", "story")
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four")
DESCRIBE = "Describe the image."

_SIZE_FRACTION = {"small": 0.5, "large": 0.75}
_CELL_INDEX = {c: i for i, c in enumerate(CELLS)}


def is_held_out(colour: str, shape: str) -> bool:
    """Whether (colour, shape) is one of the `HELD_OUT_PAIRS`."""
    return (colour, shape) in _HELD_OUT


def _check_name(value: Any, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class Obj:
    """One object: `cell` is one of `CELLS`, or None for an object centred in the image."""

    shape: str
    colour: str
    size: str
    cell: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.shape, SHAPES, "shape")
        _check_name(self.colour, tuple(COLOURS), "colour")
        _check_name(self.size, SIZES, "size")
        if self.cell is not None:
            _check_name(self.cell, CELLS, "cell")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def where(self) -> str:
        """The cell name, or "centre"."""
        return self.cell if self.cell is not None else CENTRE

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "cell": self.cell}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Obj:
        return cls(d["shape"], d["colour"], d["size"], d.get("cell"))

    def replace(self, **changes: Any) -> Obj:
        return Obj(**{**self.to_dict(), **changes})


@dataclass(frozen=True)
class Scene:
    """A validated scene. Objects are kept in cell order (top left, top right, bottom left, bottom right), so
    two scenes with the same objects compare equal however they were built."""

    objects: tuple[Obj, ...]
    background: str = "white"

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        if not 1 <= len(objects) <= len(CELLS):
            raise ValueError(f"a scene has 1 to {len(CELLS)} objects, got {len(objects)}")
        if any(o.cell is None for o in objects):
            if len(objects) > 1:
                raise ValueError("a centred object (cell=None) must be the only object of its scene")
        else:
            cells = [o.cell for o in objects]
            if len(set(cells)) != len(cells):
                raise ValueError(f"objects must occupy distinct cells, got {cells}")
            objects = tuple(sorted(objects, key=lambda o: _CELL_INDEX[o.cell]))
        pairs = [o.pair for o in objects]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"no two objects of a scene may share colour and shape, got {pairs}")
        _check_name(self.background, tuple(BACKGROUNDS), "background")
        object.__setattr__(self, "objects", objects)

    @property
    def centred(self) -> bool:
        return self.objects[0].cell is None

    @property
    def free_cells(self) -> tuple[str, ...]:
        """Cells an object could be added to (none while the scene has a centred object)."""
        if self.centred:
            return ()
        used = {o.cell for o in self.objects}
        return tuple(c for c in CELLS if c not in used)

    def to_dict(self) -> dict[str, Any]:
        return {"objects": [o.to_dict() for o in self.objects], "background": self.background}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(tuple(Obj.from_dict(o) for o in d["objects"]), d.get("background", "white"))

    def replace_object(self, old: Obj, new: Obj | None) -> Scene:
        """The scene with `old` replaced by `new` (or removed when `new` is None)."""
        objs = tuple(new if o == old else o for o in self.objects)
        return Scene(tuple(o for o in objs if o is not None), self.background)


# ----------------------------------------------------------------------------------------------------------------
# Rendering and captions


@functools.lru_cache(maxsize=32)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=np.float64) + 0.5
    return c[None, :], c[:, None]


def object_box(obj: Obj, size: int) -> tuple[float, float, float]:
    """(centre x, centre y, side) of the object's bounding box in pixels of a `size` x `size` image."""
    if obj.cell is None:
        x0 = y0 = 0.0
        region = float(size)
    else:
        i = _CELL_INDEX[obj.cell]
        region = size / 2
        x0, y0 = (i % 2) * region, (i // 2) * region
    return x0 + region / 2, y0 + region / 2, _SIZE_FRACTION[obj.size] * region


def object_mask(obj: Obj, size: int = 32) -> np.ndarray:
    """Boolean (size, size) mask of the pixels the object covers (pixel centre inside the shape)."""
    return _object_mask(obj, size).copy()


@functools.lru_cache(maxsize=4096)
def _object_mask(obj: Obj, size: int) -> np.ndarray:
    mask = _draw_mask(obj, size)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=4096)
def _paste_mask(obj: Obj, size: int) -> Image.Image:
    """The mask as a PIL "L" image (255 inside) for `Image.paste`, which is several times faster than numpy
    indexing on small images. Cached and shared: never modified."""
    return Image.fromarray(_object_mask(obj, size).astype(np.uint8) * 255, "L")


def _draw_mask(obj: Obj, size: int) -> np.ndarray:
    """Evaluate the shape's inside test at every pixel centre (see the module docstring for the geometry)."""
    px, py = _pixel_centres(size)
    cx, cy, side = object_box(obj, size)
    half = side / 2
    dx, dy = np.abs(px - cx), np.abs(py - cy)
    if obj.shape == "square":
        return (dx <= half) & (dy <= half)
    if obj.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if obj.shape == "triangle":
        return (py <= cy + half) & (dx <= (py - (cy - half)) / 2)
    arm = side / 6
    return ((dx <= arm) & (dy <= half)) | ((dy <= arm) & (dx <= half))


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw the scene as a `size` x `size` RGB image (exact, no anti-aliasing: same scene, same pixels)."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        image.paste(COLOURS[obj.colour], (0, 0), _paste_mask(obj, size))
    return image


def describe_object(obj: Obj, *, position: bool = True) -> str:
    """The object as a noun phrase, e.g. "a large red circle at the top left" (no position when centred)."""
    text = f"a {obj.size} {obj.colour} {obj.shape}"
    if position and obj.cell is not None:
        text += f" at the {obj.cell}"
    return text


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """E.g. "a large red circle at the top left and a small blue square at the bottom right on a white
    background"; objects in cell order, centred objects without a position."""
    return f"{_join([describe_object(o) for o in scene.objects])} on a {scene.background} background"


def sentence(text: str) -> str:
    """Capitalise the first letter and end with a full stop."""
    return text[:1].upper() + text[1:] + "."


def reference(obj: Obj, scene: Scene) -> str:
    """The shortest unambiguous name of `obj` in `scene`: "circle" when it is the only circle, else
    "red circle" (colour and shape are unique together)."""
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        return obj.shape
    return f"{obj.colour} {obj.shape}"


# ----------------------------------------------------------------------------------------------------------------
# Drawing episodes: texts and scenes first (cheap), pixels last


@dataclass
class Episode:
    """A sample before rendering: segments hold a `Scene` under "scene" where the sample will hold an image."""

    segments: list[dict[str, Any]]
    meta: dict[str, Any]
    pairs: set[tuple[str, str]] = field(default_factory=set)

    @property
    def held_out(self) -> bool:
        return any(p in _HELD_OUT for p in self.pairs)


@dataclass
class _Draw:
    """Random choices constrained by the split (train: never a held-out pair) and the options."""

    rng: random.Random
    pairs: tuple[tuple[str, str], ...]
    max_objects: int
    backgrounds: tuple[str, ...]
    max_images: int = MAX_STORY_IMAGES  # stories: 2 to this many images

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[self.rng.randrange(len(seq))]

    def new_object(self, scene_pairs: set[tuple[str, str]], cell: str | None) -> Obj | None:
        free = [p for p in self.pairs if p not in scene_pairs]
        if not free:
            return None
        colour, shape = self.pick(free)
        return Obj(shape, colour, self.pick(SIZES), cell)

    def scene(self, k: int | None = None) -> Scene:
        """A random scene: k objects (default uniform in 1..max_objects); one object is centred when
        max_objects is 1, otherwise centred or in a cell with equal odds."""
        if k is None:
            k = self.rng.randint(1, self.max_objects)
        background = self.pick(self.backgrounds)
        if k == 1 and (self.max_objects == 1 or self.rng.random() < 0.5):
            cells: list[str | None] = [None]
        else:
            cells = list(self.rng.sample(CELLS, k))
        objs: list[Obj] = []
        for cell in cells:
            obj = self.new_object({o.pair for o in objs}, cell)
            assert obj is not None  # at most 4 objects, at least 20 pairs to draw from
            objs.append(obj)
        return Scene(tuple(objs), background)


# Edit operations: each returns (new scene, op record, instruction body) or None when it does not apply.
_EditResult = tuple[Scene, dict[str, Any], str]


def _op(kind: str, target: Obj | None, result: Obj | None) -> dict[str, Any]:
    return {"op": kind, "target": target.to_dict() if target else None, "result": result.to_dict() if result else None}


def _recolour(d: _Draw, scene: Scene, obj: Obj, name: str) -> _EditResult | None:
    used = {o.pair for o in scene.objects}
    options = [c for c, s in d.pairs if s == obj.shape and c != obj.colour and (c, s) not in used]
    if not options:
        return None
    new = obj.replace(colour=d.pick(options))
    return scene.replace_object(obj, new), _op("recolour", obj, new), f"make {name} {new.colour}"


def _reshape(d: _Draw, scene: Scene, obj: Obj, name: str) -> _EditResult | None:
    used = {o.pair for o in scene.objects}
    options = [s for c, s in d.pairs if c == obj.colour and s != obj.shape and (c, s) not in used]
    if not options:
        return None
    new = obj.replace(shape=d.pick(options))
    return scene.replace_object(obj, new), _op("reshape", obj, new), f"turn {name} into a {new.shape}"


def _resize(d: _Draw, scene: Scene, obj: Obj, name: str) -> _EditResult | None:
    new = obj.replace(size="small" if obj.size == "large" else "large")
    return scene.replace_object(obj, new), _op("resize", obj, new), f"make {name} {new.size}"


def _move(d: _Draw, scene: Scene, obj: Obj, name: str) -> _EditResult | None:
    if d.max_objects == 1:
        return None
    used = {o.cell for o in scene.objects}
    options = [c for c in CELLS if c not in used]
    if not options:
        return None
    new = obj.replace(cell=d.pick(options))
    return scene.replace_object(obj, new), _op("move", obj, new), f"move {name} to the {new.cell}"


def _remove(d: _Draw, scene: Scene, obj: Obj, name: str) -> _EditResult | None:
    if len(scene.objects) < 2:
        return None
    return scene.replace_object(obj, None), _op("remove", obj, None), f"remove {name}"


def _add(d: _Draw, scene: Scene) -> _EditResult | None:
    free = scene.free_cells
    if not free or len(scene.objects) >= d.max_objects:
        return None
    new = d.new_object({o.pair for o in scene.objects}, d.pick(free))
    if new is None:
        return None
    text = f"add {describe_object(new, position=False)} at the {new.cell}"
    return Scene(scene.objects + (new,), scene.background), _op("add", None, new), text


_OBJECT_OPS: tuple[Callable[[_Draw, Scene, Obj, str], _EditResult | None], ...] = (
    _recolour, _reshape, _resize, _move, _remove,
)
EDIT_KINDS: tuple[str, ...] = ("recolour", "reshape", "resize", "move", "remove", "add")


def _random_edit(d: _Draw, scene: Scene) -> _EditResult:
    """One applicable edit, the kind drawn uniformly among the six (`EDIT_KINDS`) and retried until one applies.
    A lone object is called "it" or "the circle" with equal odds; one of several always by its reference."""
    kinds = list(range(len(_OBJECT_OPS) + 1))
    d.rng.shuffle(kinds)
    for kind in kinds:
        if kind == len(_OBJECT_OPS):
            result = _add(d, scene)
        else:
            obj = d.pick(scene.objects)
            lone = len(scene.objects) == 1
            name = "it" if lone and d.rng.random() < 0.5 else "the " + reference(obj, scene)
            result = _OBJECT_OPS[kind](d, scene, obj, name)
        if result is not None:
            return result
    raise AssertionError("resize always applies")  # pragma: no cover


INSTRUCTION_PREFIXES: tuple[str, ...] = ("", "now ")
"""An edit instruction (the edit task's and every story turn's) is drawn from one grammar: a prefix from these,
then the edit's body; the first letter capitalised or not, with equal odds each. Edits and stories thus train
the same surface forms ("Make it blue.", "make the circle blue.", "Now make it blue.", "now make it blue.")."""


def instruction(d: _Draw, body: str) -> str:
    """The text of an edit instruction with body `body` ("make it blue"), drawn from the shared grammar."""
    text = d.pick(INSTRUCTION_PREFIXES) + body + "."
    return text[:1].upper() + text[1:] if d.rng.random() < 0.5 else text


def _scene_pairs(*scenes: Scene) -> set[tuple[str, str]]:
    return {o.pair for s in scenes for o in s.objects}


def _episode_t2i(d: _Draw) -> Episode:
    scene = d.scene()
    text = sentence(caption(scene))
    segs = [{"text": text, "loss": False}, {"scene": scene, "generate": True}]
    return Episode(segs, {"caption": text, "scenes": [scene]}, _scene_pairs(scene))


def _episode_caption(d: _Draw) -> Episode:
    scene = d.scene()
    text = sentence(caption(scene))
    segs = [{"scene": scene}, {"text": DESCRIBE, "loss": False}, {"text": text}]
    return Episode(segs, {"caption": text, "scenes": [scene]}, _scene_pairs(scene))


def _question(d: _Draw, scene: Scene) -> tuple[str, str, str, set[tuple[str, str]]]:
    """(kind, question, answer, pairs the question names) for a random applicable question kind."""
    objs = scene.objects
    unique_shape = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    unique_colour = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
    kinds = ["count", "exists", "where"] + (["colour"] if unique_shape else []) + (["shape"] if unique_colour else [])
    kind = d.pick(kinds)
    if kind == "colour":
        obj = d.pick(unique_shape)
        return kind, f"What colour is the {obj.shape}?", obj.colour, set()
    if kind == "shape":
        obj = d.pick(unique_colour)
        return kind, f"What shape is the {obj.colour} object?", obj.shape, set()
    if kind == "count":
        return kind, "How many objects are there?", NUMBER_WORDS[len(objs) - 1], set()
    if kind == "where":
        obj = d.pick(objs)
        return kind, f"Where is the {reference(obj, scene)}?", obj.where, set()
    present = {o.pair for o in objs}
    if d.rng.random() < 0.5:
        pair = d.pick(objs).pair
    else:
        pair = d.pick([p for p in d.pairs if p not in present])
    return kind, f"Is there a {pair[0]} {pair[1]}?", "yes" if pair in present else "no", {pair}


def _episode_vqa(d: _Draw) -> Episode:
    scene = d.scene()
    kind, question, answer, named = _question(d, scene)
    segs = [{"scene": scene}, {"text": question, "loss": False}, {"text": answer}]
    meta = {"kind": kind, "question": question, "answer": answer, "scenes": [scene]}
    return Episode(segs, meta, _scene_pairs(scene) | named)


def _episode_edit(d: _Draw) -> Episode:
    scene = d.scene()
    new, op, body = _random_edit(d, scene)
    text = instruction(d, body)
    segs = [{"scene": scene}, {"text": text, "loss": False}, {"scene": new, "generate": True}]
    return Episode(segs, {"instruction": text, "op": op, "scenes": [scene, new]}, _scene_pairs(scene, new))


def _episode_story(d: _Draw) -> Episode:
    scene = d.scene(1)
    if d.max_objects > 1 and scene.centred:
        scene = Scene((scene.objects[0].replace(cell=d.pick(CELLS)),), scene.background)
    n_images = d.rng.randint(2, d.max_images)
    texts, ops, scenes = [sentence("draw " + caption(scene))], [], [scene]
    for _ in range(n_images - 1):
        scene, op, body = _random_edit(d, scene)
        texts.append(instruction(d, body))
        ops.append(op)
        scenes.append(scene)
    segs: list[dict[str, Any]] = []
    for text, sc in zip(texts, scenes):
        segs += [{"text": text, "loss": False}, {"scene": sc, "generate": True}]
    return Episode(segs, {"instructions": texts, "ops": ops, "scenes": scenes}, _scene_pairs(*scenes))


_EPISODES: dict[str, Callable[[_Draw], Episode]] = {
    "t2i": _episode_t2i,
    "caption": _episode_caption,
    "vqa": _episode_vqa,
    "edit": _episode_edit,
    "story": _episode_story,
}

#: Fraction of validation samples forced to contain a held-out pair (the rest draw freely from all 24 pairs).
VALIDATION_HELD_OUT_FRACTION = 0.5
_MAX_TRIES = 200


def draw_episode(
    task: str, split: str, rng: random.Random, *, max_objects: int = 4, backgrounds: Sequence[str] = ("white",),
    max_images: int = MAX_STORY_IMAGES,
) -> Episode:
    """One episode of `task` drawn from `rng` (no pixels yet; see `render_episode`); a story has 2 to
    `max_images` images."""
    train = split == "train"
    d = _Draw(rng, TRAIN_PAIRS if train else ALL_PAIRS, max_objects, tuple(backgrounds), max_images)
    build = _EPISODES[task]
    want_held_out = not train and rng.random() < VALIDATION_HELD_OUT_FRACTION
    for _ in range(_MAX_TRIES):
        ep = build(d)
        if not want_held_out or ep.held_out:
            break
    ep.meta["held_out"] = ep.held_out
    return ep


def render_episode(ep: Episode, image_size: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(segments with PIL images, JSON-serialisable meta) of an episode."""
    segs = []
    for seg in ep.segments:
        if "scene" in seg:
            seg = {"image": render(seg["scene"], image_size), **{k: v for k, v in seg.items() if k != "scene"}}
        segs.append(seg)
    meta = {k: ([s.to_dict() for s in v] if k == "scenes" else v) for k, v in ep.meta.items()}
    return segs, meta


def shapes_corpus() -> list[str]:
    """Texts covering every word and phrase form the shapes tasks emit (for training a tiny tokenizer)."""
    texts: list[str] = [DESCRIBE, "How many objects are there?", *NUMBER_WORDS, "yes", "no", CENTRE, *CELLS]
    objects = [Obj(s, c, z, cell) for c in COLOURS for s in SHAPES for z in SIZES for cell in (None, *CELLS)]
    for obj in objects:
        for bg in BACKGROUNDS:
            texts.append(sentence(caption(Scene((obj,), bg))))
        texts.append(sentence("draw " + caption(Scene((obj,)))))
    for colour in COLOURS:
        texts += [colour, f"What shape is the {colour} object?"]
        for shape in SHAPES:
            texts += [f"Is there a {colour} {shape}?", f"Where is the {colour} {shape}?"]
            for prefix, name in (("", f"the {colour} {shape}"), ("now ", "it"), ("now ", f"the {colour} {shape}")):
                texts += [sentence(f"{prefix}make {name} {colour}"), sentence(f"{prefix}turn {name} into a {shape}"),
                          sentence(f"{prefix}remove {name}")]
                texts += [sentence(f"{prefix}make {name} {z}") for z in SIZES]
                texts += [sentence(f"{prefix}move {name} to the {cell}") for cell in CELLS]
                texts += [sentence(f"{prefix}add a {z} {colour} {shape} at the {cell}") for z in SIZES for cell in CELLS]
    # every other surface form of the instruction grammar, once per verb (a few texts: the word statistics the
    # tokenizer learns from stay those of the scenes' vocabulary)
    for prefix in INSTRUCTION_PREFIXES:
        for name in ("it", "the circle"):
            for body in (f"make {name} red", f"turn {name} into a square", f"remove {name}", f"make {name} small",
                         f"move {name} to the top left", "add a small red circle at the top left"):
                text = prefix + body + "."
                texts += [text, text[:1].upper() + text[1:]]
    for shape in SHAPES:
        texts += [shape, f"What colour is the {shape}?", f"Where is the {shape}?"]
    # Whole texts of drawn episodes, for the multi-object phrase forms ("..., ... and ...").
    rng = random.Random(0)
    for task in SHAPE_TASKS:
        for split in ("train", "validation"):
            for max_objects in (1, 4):
                for _ in range(40):
                    ep = draw_episode(task, split, rng, max_objects=max_objects, backgrounds=tuple(BACKGROUNDS))
                    texts += [s["text"] for s in ep.segments if "text" in s]
    return texts
