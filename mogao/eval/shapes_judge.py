"""A programmatic judge of shapes-world images: parse an image into objects, then check what a prompt asked for.

Parsing (`parse_image`), for an image of any square size:

1. Background: the median colour of the four corners (the shapes world always leaves them empty), named after
   the nearest of `BACKGROUNDS` when it is within `colour_tolerance`.
2. Ink: a pixel is ink of palette colour c when c is its nearest `COLOURS` entry, within `colour_tolerance`
   (Euclidean RGB distance) and nearer to c than to the background.
3. Objects: 8-connected components of each colour's ink; components smaller than `min_area` of the image
   (noise specks) are dropped.
4. Shape: the component's bounding box gives a centre and a side; each of `SHAPES` is drawn on that box with the
   world's geometry (filled square, inscribed circle, upward triangle, plus-shaped cross) and the shape whose
   template has the highest intersection-over-union with the component wins; below `min_iou` the shape is
   unknown (None).
5. Position and size: a box centred within 1/8 of the image side of the middle is "centre", otherwise the
   quadrant ("top left", ...) holding its centre; the size is "large" when the side is more than 5/8 of its
   region (the whole image when centred, else a cell), the midpoint between the world's 1/2 and 3/4.

Ground-truth renders parse back exactly into their scene (tested for every colour, shape, size and cell).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from mogao.data.builtin.shapes import BACKGROUNDS, CELLS, CENTRE, COLOURS, SHAPES, Scene

COLOUR_TOLERANCE = 80.0
"""Largest RGB distance from a palette colour that still counts as that colour (the closest two palette
colours, orange and yellow, are 80 apart; a pixel is always named after its nearest colour)."""
MIN_AREA = 0.006
"""Smallest object, as a fraction of the image area (the smallest object of the world, a small cross in a cell,
covers about 3% of the image)."""
MIN_IOU = 0.5
"""Smallest template IoU for a shape to be named."""

_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float64)  # (6, 3)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_PALETTE = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float64)
_EIGHT = np.ones((3, 3), dtype=bool)

JUDGE_DESCRIPTION = (
    "shapes judge: corners give the background; pixels within RGB distance "
    f"{COLOUR_TOLERANCE:g} of their nearest palette colour are ink; 8-connected components per colour of at "
    f"least {MIN_AREA:.1%} of the image are objects; shape = best IoU (>= {MIN_IOU}) of square/circle/triangle/"
    "cross templates on the bounding box; centre or 2x2 cell from the box centre; large when the side is > 5/8 "
    "of its region"
)


@dataclass(frozen=True)
class Detected:
    """One object found in an image. `shape` is None when no template fits; `iou` is the best template's IoU."""

    colour: str
    shape: str | None
    size: str
    where: str
    area: int
    iou: float

    @property
    def key(self) -> tuple[str, str | None, str, str]:
        """(colour, shape, size, where): what a caption says about the object."""
        return (self.colour, self.shape, self.size, self.where)


@dataclass(frozen=True)
class Parsed:
    """An image parsed into objects (largest first) and its background name (None: not a world background)."""

    objects: tuple[Detected, ...]
    background: str | None

    def keys(self) -> Counter:
        """Multiset of the objects' (colour, shape, size, where)."""
        return Counter(o.key for o in self.objects)

    def matches(self, scene: Scene) -> bool:
        """Whether the image shows exactly the scene's objects (colour, shape, size, position); the background
        is not compared."""
        return self.keys() == scene_keys(scene)


def scene_keys(scene: Scene) -> Counter:
    """Multiset of the scene's objects as (colour, shape, size, where)."""
    return Counter((o.colour, o.shape, o.size, o.where) for o in scene.objects)


def shape_template(shape: str, cx: float, cy: float, side: float, height: int, width: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` on a square box of `side` pixels centred at (cx, cy): the pixels
    whose centre lies inside, with the shapes world's geometry."""
    px = np.arange(width, dtype=np.float64)[None, :] + 0.5
    py = np.arange(height, dtype=np.float64)[:, None] + 0.5
    half = side / 2
    dx, dy = np.abs(px - cx), np.abs(py - cy)
    if shape == "square":
        return (dx <= half) & (dy <= half)
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "triangle":
        return (py <= cy + half) & (dx <= (py - (cy - half)) / 2)
    if shape == "cross":
        arm = side / 6
        return ((dx <= arm) & (dy <= half)) | ((dy <= arm) & (dx <= half))
    raise ValueError(f"unknown shape {shape!r}; expected one of: {', '.join(SHAPES)}")


def _background(a: np.ndarray, tolerance: float) -> tuple[np.ndarray, str | None]:
    h, w, _ = a.shape
    k = max(1, min(h, w) // 16)
    corners = np.concatenate([a[:k, :k], a[:k, -k:], a[-k:, :k], a[-k:, -k:]]).reshape(-1, 3)
    colour = np.median(corners, axis=0)
    d = np.linalg.norm(_BG_PALETTE - colour, axis=1)
    return colour, (_BG_NAMES[int(d.argmin())] if d.min() <= tolerance else None)


def _classify(mask: np.ndarray, box: tuple[slice, slice]) -> tuple[str | None, float, float, float, float]:
    """(shape or None, best IoU, centre x, centre y, side) of one component."""
    ys, xs = box
    y0, y1, x0, x1 = ys.start, ys.stop, xs.start, xs.stop
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = float(max(y1 - y0, x1 - x0))
    h, w = mask.shape
    # Templates only differ from the component near its box: compare on the box grown by one pixel.
    win = (slice(max(0, y0 - 1), min(h, y1 + 1)), slice(max(0, x0 - 1), min(w, x1 + 1)))
    local = mask[win]
    best, best_iou = None, 0.0
    for shape in SHAPES:
        # A triangle's box is anchored at its base (its apex row may hold no pixel centre).
        ty = y1 - side / 2 if shape == "triangle" else cy
        t = shape_template(shape, cx - win[1].start, ty - win[0].start, side, *local.shape)
        union = np.logical_or(t, local).sum()
        iou = float(np.logical_and(t, local).sum() / union) if union else 0.0
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou, cx, cy, side


def _place(cx: float, cy: float, side: float, height: int, width: int) -> tuple[str, str]:
    """(where, size) of a box."""
    if abs(cx - width / 2) < width / 8 and abs(cy - height / 2) < height / 8:
        where, region = CENTRE, float(min(height, width))
    else:
        where = CELLS[(2 if cy >= height / 2 else 0) + (1 if cx >= width / 2 else 0)]
        region = min(height, width) / 2
    return where, ("large" if side > 0.625 * region else "small")


def parse_image(
    image: Image.Image,
    *,
    colour_tolerance: float = COLOUR_TOLERANCE,
    min_area: float = MIN_AREA,
    min_iou: float = MIN_IOU,
) -> Parsed:
    """Parse a shapes-world image into objects (see the module docstring for the method)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w, _ = a.shape
    bg_colour, bg_name = _background(a, colour_tolerance)
    d = np.linalg.norm(a[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 6)
    nearest, dist = d.argmin(-1), d.min(-1)
    ink = (dist <= colour_tolerance) & (dist < np.linalg.norm(a - bg_colour, axis=-1))
    smallest = max(1, int(round(min_area * h * w)))
    found: list[Detected] = []
    for ci, colour in enumerate(_NAMES):
        labels, count = ndimage.label(ink & (nearest == ci), structure=_EIGHT)
        if not count:
            continue
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        for idx, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None or areas[idx] < smallest:
                continue
            shape, iou, cx, cy, side = _classify(labels == idx, box)
            if iou < min_iou:
                shape = None
            where, size = _place(cx, cy, side, h, w)
            found.append(Detected(colour, shape, size, where, int(areas[idx]), round(iou, 4)))
    found.sort(key=lambda o: -o.area)
    return Parsed(tuple(found), bg_name)


# ---- GenEval-style checks: what each category asks of an image given the scene its prompt describes ----------


def _has(parsed: Parsed, **want: str) -> int:
    return sum(all(getattr(o, k) == v for k, v in want.items()) for o in parsed.objects)


def _covers(parsed: Parsed, scene: Scene, fields: Iterable[str]) -> bool:
    """Every object of the scene has its own parsed object agreeing on `fields` (counted with multiplicity)."""
    fields = tuple(fields)
    need = Counter(tuple(getattr(o, f) for f in fields) for o in scene.objects)
    have = Counter(tuple(getattr(o, f) for f in fields) for o in parsed.objects)
    return all(have[k] >= n for k, n in need.items())


def check_single_object(parsed: Parsed, scene: Scene) -> bool:
    """The prompted shape is drawn (any colour, size or place)."""
    return _covers(parsed, scene, ("shape",))


def check_colour(parsed: Parsed, scene: Scene) -> bool:
    """The prompted shape is drawn in the prompted colour."""
    return _covers(parsed, scene, ("colour", "shape"))


def check_two_objects(parsed: Parsed, scene: Scene) -> bool:
    """Both prompted shapes are drawn (as many of each as prompted)."""
    return _covers(parsed, scene, ("shape",))


def check_position(parsed: Parsed, scene: Scene) -> bool:
    """Each prompted shape is drawn in its prompted cell."""
    return _covers(parsed, scene, ("shape", "where"))


def check_attribute_binding(parsed: Parsed, scene: Scene) -> bool:
    """Each prompted shape carries its own prompted colour (no swapped or merged attributes)."""
    return _covers(parsed, scene, ("colour", "shape"))


def check_counting(parsed: Parsed, scene: Scene) -> bool:
    """Exactly as many objects as prompted."""
    return len(parsed.objects) == len(scene.objects)


def check_exact(parsed: Parsed, scene: Scene) -> bool:
    """Every object right in colour, shape, size and position, and nothing else drawn."""
    return parsed.matches(scene)


CATEGORIES: dict[str, tuple[str, Callable[[Parsed, Scene], bool]]] = {
    # category: (prompt set it is judged on, check)
    "single_object": ("one", check_single_object),
    "colour": ("one", check_colour),
    "two_objects": ("two", check_two_objects),
    "position": ("two", check_position),
    "attribute_binding": ("two", check_attribute_binding),
    "counting": ("many", check_counting),
}
"""The GenEval-style categories, each judged on one of the prompt sets: "one" (one centred object), "two" (two
objects in cells), "many" (two to four objects in cells). `overall` is the mean of the categories."""
