"""The built-in procedural data sets: schema, determinism, held-out pairs, pixels, edits, stories, digits and
the tokenizer corpus."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mogao.data import samples_from_dicts, train_tokenizer
from mogao.data.builtin import (
    BACKGROUNDS,
    CELLS,
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SIZES,
    TASKS,
    Obj,
    Scene,
    builtin_corpus,
    caption,
    make_builtin,
    object_mask,
    render,
    render_digit,
)
from mogao.data.builtin.digits import VALIDATION_EVERY, load_digit_images
from mogao.data.builtin.shapes import EDIT_KINDS, NUMBER_WORDS, SHAPE_TASKS
from mogao.errors import ConfigError

ALL_BACKGROUNDS = tuple(BACKGROUNDS)
GENERATES = {"t2i", "edit", "story", "digits_t2i", "digits_next"}


def _texts(sample: dict) -> list[str]:
    return [s["text"] for s in sample["segments"] if "text" in s]


def _images(sample: dict) -> list:
    return [s for s in sample["segments"] if "image" in s]


def _fingerprint(data) -> list:
    return [(s["id"], _texts(s), [img["image"].tobytes() for img in _images(s)]) for s in data.samples]


def _scenes(meta: dict) -> list[Scene]:
    return [Scene.from_dict(d) for d in meta["scenes"]]


# ------------------------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("max_objects", [1, 2, 4])
def test_every_task_yields_valid_samples(task, max_objects):
    data = make_builtin(task, n=30, seed=3, max_objects=max_objects, backgrounds=ALL_BACKGROUNDS)
    assert len(data) == len(data.meta) == 30
    samples = samples_from_dicts(data.samples)
    assert [s.id for s in samples] == [f"{task}-train-3-{i}" for i in range(30)]
    json.dumps(data.meta)  # ground truth is JSON-serialisable
    for raw, meta in zip(data.samples, data.meta):
        assert meta["task"] == task and meta["split"] == "train" and meta["id"] == raw["id"]
        for seg in _images(raw):
            assert seg["image"].mode == "RGB" and seg["image"].size == (32, 32)
        assert any(seg.get("generate") for seg in _images(raw)) == (task in GENERATES)
        # Prompts and instructions are context only; learnt answers end the sample and carry loss.
        texts = [seg for seg in raw["segments"] if "text" in seg]
        if task in ("caption", "vqa", "digits_classify"):
            assert [t.get("loss", True) for t in texts] == [False, True]
            assert raw["segments"][-1] is texts[-1]
        else:
            assert all(t["loss"] is False for t in texts)
        if task in SHAPE_TASKS:
            assert all(len(s.objects) <= max_objects for s in _scenes(meta))
            if max_objects == 1:
                assert all(s.centred for s in _scenes(meta))


def test_image_size_changes_pixels_not_content():
    small, big = (make_builtin("edit", n=20, seed=1, image_size=size) for size in (16, 48))
    assert small.meta == big.meta
    assert {img["image"].size for s in big.samples for img in _images(s)} == {(48, 48)}


# ------------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_by_seed(task):
    a = make_builtin(task, n=25, seed=7, backgrounds=ALL_BACKGROUNDS)
    b = make_builtin(task, n=25, seed=7, backgrounds=ALL_BACKGROUNDS)
    assert _fingerprint(a) == _fingerprint(b) and a.meta == b.meta
    other = make_builtin(task, n=25, seed=8, backgrounds=ALL_BACKGROUNDS)
    assert [f[1:] for f in _fingerprint(other)] != [f[1:] for f in _fingerprint(a)]
    valid = make_builtin(task, n=25, split="validation", seed=7, backgrounds=ALL_BACKGROUNDS)
    assert [f[1:] for f in _fingerprint(valid)] != [f[1:] for f in _fingerprint(a)]
    # Each sample has its own stream: a shorter set is a prefix of a longer one.
    assert _fingerprint(make_builtin(task, n=10, seed=7, backgrounds=ALL_BACKGROUNDS)) == _fingerprint(a)[:10]


# ------------------------------------------------------------------------------------------------ held-out pairs


def _named_pairs(text: str) -> set[tuple[str, str]]:
    pattern = rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b"
    return {(c, s) for c, s in re.findall(pattern, text.lower())}


@pytest.mark.parametrize("task", SHAPE_TASKS)
def test_train_never_contains_a_held_out_pair(task):
    held = set(HELD_OUT_PAIRS)
    data = make_builtin(task, n=500, seed=11, image_size=8, backgrounds=ALL_BACKGROUNDS)
    seen = set()
    for raw, meta in zip(data.samples, data.meta):
        assert meta["held_out"] is False
        pairs = {o.pair for s in _scenes(meta) for o in s.objects}
        assert not pairs & held
        assert not set().union(*(_named_pairs(t) for t in _texts(raw))) & held
        seen |= pairs
    if task != "vqa":  # every training pair shows up somewhere
        assert len(seen) == 24 - len(held)


@pytest.mark.parametrize("task", SHAPE_TASKS)
def test_validation_contains_held_out_and_seen_pairs(task):
    held = set(HELD_OUT_PAIRS)
    data = make_builtin(task, n=200, split="validation", seed=11, image_size=8)
    flagged = [m for m in data.meta if m["held_out"]]
    assert 0.4 * len(data) < len(flagged) < 0.9 * len(data)
    in_scenes = 0
    for raw, meta in zip(data.samples, data.meta):
        pairs = {o.pair for s in _scenes(meta) for o in s.objects}
        pairs |= set().union(*(_named_pairs(t) for t in _texts(raw)))
        assert meta["held_out"] == bool(pairs & held)
        in_scenes += any(o.pair in held for s in _scenes(meta) for o in s.objects)
    assert in_scenes > 0.3 * len(data)
    assert any(not m["held_out"] for m in data.meta)


# ------------------------------------------------------------------------------------------------ scenes and pixels


def test_caption_and_scene_round_trip():
    scene = Scene((Obj("square", "blue", "small", "bottom right"), Obj("circle", "red", "large", "top left")))
    assert caption(scene) == ("a large red circle at the top left and a small blue square at the bottom right "
                              "on a white background")
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert scene.objects[0].cell == "top left"  # kept in cell order
    centred = Scene((Obj("cross", "orange", "large"),), "light blue")
    assert caption(centred) == "a large orange cross on a light blue background"
    assert Scene.from_dict(centred.to_dict()) == centred


@pytest.mark.parametrize("objects, message", [
    ((Obj("square", "red", "large", "top left"), Obj("circle", "blue", "small", "top left")), "distinct cells"),
    ((Obj("square", "red", "large"), Obj("circle", "blue", "small", "top left")), "centred"),
    ((Obj("square", "red", "large", "top left"), Obj("square", "red", "small", "top right")), "colour and shape"),
    ((), "1 to 4 objects"),
])
def test_invalid_scenes_are_rejected(objects, message):
    with pytest.raises(ValueError, match=message):
        Scene(objects)
    with pytest.raises(ValueError, match="unknown colour"):
        Obj("square", "pink", "large")


def _cell_slice(cell: str | None, size: int) -> tuple[slice, slice]:
    if cell is None:
        return slice(0, size), slice(0, size)
    i, half = CELLS.index(cell), size // 2
    return slice((i // 2) * half, (i // 2 + 1) * half), slice((i % 2) * half, (i % 2 + 1) * half)


@pytest.mark.parametrize("size", [32, 64])
def test_rendered_scenes_match_their_description(size):
    data = make_builtin("t2i", n=60, seed=5, image_size=size, backgrounds=ALL_BACKGROUNDS)
    for raw, meta in zip(data.samples, data.meta):
        (scene,) = _scenes(meta)
        pixels = np.asarray(raw["segments"][1]["image"])
        assert np.array_equal(pixels, np.asarray(render(scene, size)))
        background = np.array(BACKGROUNDS[scene.background])
        for y, x in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
            assert (pixels[y, x] == background).all()
        for obj in scene.objects:
            region = pixels[_cell_slice(obj.cell, size)].reshape(-1, 3)
            ink = region[(region != background).any(axis=1)]
            assert len(ink) >= 0.1 * len(region)  # the object is clearly visible in its cell ...
            assert (ink == np.array(COLOURS[obj.colour])).all()  # ... and is the only colour there
        empty = set(CELLS) - {o.cell for o in scene.objects}
        if not scene.centred:
            for cell in empty:
                assert (pixels[_cell_slice(cell, size)] == background).all()


def _judge_shape(mask: np.ndarray) -> str:
    """A pixel judge: the shape from the object's bounding box."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill = box.mean()
    if fill > 0.95:
        return "square"
    if box[0].sum() < box[-1].sum():
        return "triangle"
    return "cross" if fill < 0.65 else "circle"


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_are_told_apart_by_a_pixel_judge(size):
    for shape in SHAPES:
        for obj_size in SIZES:
            for cell in (None, *CELLS):
                obj = Obj(shape, "red", obj_size, cell)
                assert _judge_shape(object_mask(obj, size)) == shape, obj
    small = object_mask(Obj("square", "red", "small", "top left"), size).sum()
    large = object_mask(Obj("square", "red", "large", "top left"), size).sum()
    assert large >= 2 * small


# ------------------------------------------------------------------------------------------------ tasks


def test_vqa_answers_follow_from_the_scene():
    data = make_builtin("vqa", n=300, seed=2)
    kinds = set()
    for meta in data.meta:
        (scene,) = _scenes(meta)
        q, a, kinds = meta["question"], meta["answer"], kinds | {meta["kind"]}
        if m := re.fullmatch(r"What colour is the (\w+)\?", q):
            assert [o.colour for o in scene.objects if o.shape == m[1]] == [a]
        elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
            assert [o.shape for o in scene.objects if o.colour == m[1]] == [a]
        elif q == "How many objects are there?":
            assert a == NUMBER_WORDS[len(scene.objects) - 1]
        elif m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
            assert a == ("yes" if (m[1], m[2]) in {o.pair for o in scene.objects} else "no")
        else:
            m = re.fullmatch(r"Where is the (?:(\w+) )?(\w+)\?", q)
            found = [o for o in scene.objects if o.shape == m[2] and m[1] in (None, o.colour)]
            assert len(found) == 1 and found[0].where == a
    assert kinds == {"colour", "shape", "count", "exists", "where"}


@pytest.mark.parametrize("max_objects", [1, 4])
def test_edit_meta_describes_the_edited_image(max_objects):
    data = make_builtin("edit", n=200, seed=4, max_objects=max_objects, backgrounds=ALL_BACKGROUNDS)
    ops = set()
    for raw, meta in zip(data.samples, data.meta):
        before, after = _scenes(meta)
        source, instruction, target = raw["segments"]
        assert instruction["text"] == meta["instruction"]
        assert source["image"].tobytes() == render(before).tobytes() and not source.get("generate")
        assert target["image"].tobytes() == render(after).tobytes() and target["generate"]
        assert before != after and before.background == after.background
        op = meta["op"]
        ops.add(op["op"])
        old = Obj.from_dict(op["target"]) if op["target"] else None
        new = Obj.from_dict(op["result"]) if op["result"] else None
        if op["op"] == "add":
            assert after == Scene(before.objects + (new,), before.background)
            assert meta["instruction"].lower().removeprefix("now ") == (
                f"add a {new.size} {new.colour} {new.shape} at the {new.cell}.")
        else:
            assert old in before.objects and before.replace_object(old, new) == after
            changed = {"recolour": "colour", "reshape": "shape", "resize": "size", "move": "cell"}.get(op["op"])
            if changed:
                assert {k for k in ("shape", "colour", "size", "cell") if getattr(old, k) != getattr(new, k)} == {
                    changed}
                assert str(getattr(new, changed)) in meta["instruction"]
            lone = len(before.objects) == 1
            assert old.shape in meta["instruction"] or (lone and " it" in meta["instruction"])
    expected = {"recolour", "reshape", "resize"} | ({"move", "remove", "add"} if max_objects > 1 else set())
    assert ops == expected


@pytest.mark.parametrize("max_objects", [1, 4])
def test_story_turns_are_generation_targets(max_objects):
    data = make_builtin("story", n=120, seed=6, max_objects=max_objects)
    lengths = set()
    for raw, meta in zip(data.samples, data.meta):
        images, scenes = _images(raw), _scenes(meta)
        lengths.add(len(images))
        assert 2 <= len(images) <= 5 and all(img["generate"] for img in images)
        assert len(scenes) == len(images) == len(meta["instructions"]) == len(meta["ops"]) + 1
        assert meta["instructions"][0] == f"Draw {caption(scenes[0])}."
        assert all(t.endswith(".") and t[:1].lower() in "nmtra" for t in meta["instructions"][1:])
        assert [seg.get("text") for seg in raw["segments"][0::2]] == meta["instructions"]
        for img, scene in zip(images, scenes):
            assert img["image"].tobytes() == render(scene).tobytes()
        assert all(a != b for a, b in zip(scenes, scenes[1:]))
        assert all(len(s.objects) <= max_objects for s in scenes)
    assert lengths == {2, 3, 4, 5}


def test_edits_and_story_turns_share_one_instruction_grammar():
    """Every surface form - prefix "now" or none, capitalised or not, a lone object "it" or named - occurs in the
    edit task and in story turns alike, with the same kinds of edit, so that the edit task's targets teach the
    instructions stories give."""
    def forms(texts):
        out = set()
        for t in texts:
            body = t.lower().removeprefix("now ")
            out.add((t.lower().startswith("now "), t[:1].isupper(), " it " in f" {body[:-1]} ", body.split()[0]))
        return out

    edits = make_builtin("edit", n=600, seed=1, max_objects=2)
    stories = make_builtin("story", n=300, seed=1, max_objects=2)
    edit_forms = forms(m["instruction"] for m in edits.meta)
    story_forms = forms(t for m in stories.meta for t in m["instructions"][1:])
    assert {f[:3] for f in edit_forms} == {f[:3] for f in story_forms} == {
        (now, cap, it) for now in (False, True) for cap in (False, True) for it in (False, True)}
    verbs = {"make", "turn", "move", "remove", "add"}
    assert {f[3] for f in edit_forms} == {f[3] for f in story_forms} == verbs
    assert {m["op"]["op"] for m in edits.meta} == {op["op"] for m in stories.meta for op in m["ops"]} == set(EDIT_KINDS)


def test_max_images_caps_story_length():
    for cap in (2, 3):
        short = make_builtin("story", n=40, seed=6, max_objects=2, max_images=cap)
        assert {len(_images(raw)) for raw in short.samples} == set(range(2, cap + 1))
        for raw, meta in zip(short.samples, short.meta):
            assert len(meta["instructions"]) == len(meta["scenes"]) == len(_images(raw))


# ------------------------------------------------------------------------------------------------ digits


def test_digits_match_scikit_learn():
    from sklearn.datasets import load_digits

    images, labels = load_digit_images()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)


def test_digits_tasks_and_split():
    images, labels = load_digit_images()
    used = {}
    for split in ("train", "validation"):
        used[split] = set()
        for task in ("digits_t2i", "digits_classify", "digits_next"):
            data = make_builtin(task, n=300, split=split, seed=1)
            for raw, meta in zip(data.samples, data.meta):
                assert [int(labels[i]) for i in meta["indices"]] == meta["labels"]
                for img, index in zip(_images(raw), meta["indices"]):
                    assert img["image"].tobytes() == render_digit(index).tobytes()
                used[split] |= set(meta["indices"])
                if task == "digits_next":
                    assert meta["labels"][1] == (meta["labels"][0] + 1) % 10
                if task == "digits_classify":
                    assert _texts(raw) == ["What digit is this?", str(meta["labels"][0])] == [
                        meta["question"], meta["answer"]]
                if task == "digits_t2i":
                    assert _texts(raw) == [f"Draw the digit {meta['labels'][0]}."]
    assert not used["train"] & used["validation"]
    assert all(i % VALIDATION_EVERY == VALIDATION_EVERY - 1 for i in used["validation"])
    # Dark ink on white: blank pixels (value 0) are white, full ink (16) is black.
    index = int(np.argmax((images == 16).sum(axis=(1, 2))))
    big = np.asarray(render_digit(index, 8))
    assert (big[images[index] == 0] == 255).all() and (big[images[index] == 16] == 0).all()


# ------------------------------------------------------------------------------------------------ tokenizer corpus


def test_tokenizer_from_the_corpus_covers_every_task():
    corpus = builtin_corpus()
    tok = train_tokenizer(corpus, vocab_size=400)
    words = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")
    vocabulary = {w for text in corpus for w in words.findall(text)}
    texts = set()
    for task in TASKS:
        for split in ("train", "validation"):
            for max_objects in (1, 4):
                data = make_builtin(task, n=60, split=split, max_objects=max_objects, image_size=8,
                                    backgrounds=ALL_BACKGROUNDS)
                texts |= {t for s in data.samples for t in _texts(s)}
    for text in texts:
        ids = tok.encode(text)
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text
        assert set(words.findall(text)) <= vocabulary, text
    # Trained on the corpus, the tokenizer spends about one token per word.
    sample = "A large red circle at the top left and a small blue square at the bottom right on a white background."
    assert len(tok.encode(sample)) <= len(sample.split()) + 2


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs, name", [
    ({"task": "segmentation"}, "task"),
    ({"split": "test"}, "split"),
    ({"n": 0}, "n="),
    ({"max_objects": 5}, "max_objects"),
    ({"max_objects": 0}, "max_objects"),
    ({"image_size": 4}, "image_size"),
    ({"seed": "x"}, "seed"),
    ({"backgrounds": ("black",)}, "backgrounds"),
    ({"max_images": 1}, "max_images"),
    ({"max_images": 6}, "max_images"),
    ({"max_images": "2"}, "max_images"),
    ({"colours": 3}, "colours"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    kwargs = {"task": "t2i", **kwargs}
    with pytest.raises(ConfigError, match=name):
        make_builtin(kwargs.pop("task"), **kwargs)


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        make_builtin("segmentation")
    assert all(task in str(err.value) for task in TASKS)
