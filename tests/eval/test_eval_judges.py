"""The evaluation judges on ground truth (renders of the shapes world, real digits, reference answers) and on
corrupted versions of it: ground truth must score >= 0.99, every corruption clearly lower."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mogao.data.builtin import make_builtin
from mogao.data.builtin.shapes import BACKGROUNDS, CELLS, COLOURS, SHAPES, SIZES, Obj, Scene, render
from mogao.eval import digits_judge, edit_judge, text_judge
from mogao.eval.shapes_judge import CATEGORIES, parse_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _validation_scenes(n: int, max_objects: int = 4) -> list[Scene]:
    data = make_builtin("t2i", split="validation", n=n, seed=5, image_size=8, max_objects=max_objects,
                        backgrounds=tuple(BACKGROUNDS))
    return [Scene.from_dict(m["scenes"][0]) for m in data.meta]


def _exact_rate(images: list[Image.Image], scenes: list[Scene]) -> float:
    return float(np.mean([parse_image(img).matches(s) for img, s in zip(images, scenes)]))


# ---- shapes judge -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_every_single_object_parses_back_exactly(size):
    scenes = [Scene((Obj(shape, colour, z, cell),), bg)
              for colour, shape, z, cell in itertools.product(COLOURS, SHAPES, SIZES, (None, *CELLS))
              for bg in ("white", "light blue")]
    for scene in scenes:
        parsed = parse_image(render(scene, size))
        assert parsed.matches(scene), (scene, parsed)
        assert parsed.background == scene.background
        assert parsed.objects[0].iou == 1.0


def test_ground_truth_multi_object_scenes_score_at_least_099():
    scenes = _validation_scenes(300)
    assert _exact_rate([render(s, 32) for s in scenes], scenes) >= 0.99
    for category, (_, check) in CATEGORIES.items():
        multi = [s for s in scenes if len(s.objects) >= 2] if category != "single_object" else scenes
        assert np.mean([check(parse_image(render(s, 32)), s) for s in multi]) >= 0.99, category


def _recoloured(scene: Scene, rng: random.Random) -> Scene:
    obj = rng.choice(scene.objects)
    used = {o.pair for o in scene.objects}
    colour = rng.choice([c for c in COLOURS if c != obj.colour and (c, obj.shape) not in used])
    return scene.replace_object(obj, obj.replace(colour=colour))


def _reshaped(scene: Scene, rng: random.Random) -> Scene:
    obj = rng.choice(scene.objects)
    used = {o.pair for o in scene.objects}
    shape = rng.choice([s for s in SHAPES if s != obj.shape and (obj.colour, s) not in used])
    return scene.replace_object(obj, obj.replace(shape=shape))


def _shifted(img: Image.Image, dx: int) -> Image.Image:
    a = np.asarray(img).copy()
    bg = a[0, 0].copy()
    out = np.empty_like(a)
    out[:] = bg
    out[:, dx:] = a[:, :-dx]
    return Image.fromarray(out)


def _noisy(img: Image.Image, std: float, seed: int) -> Image.Image:
    a = np.asarray(img, dtype=np.float64) + np.random.default_rng(seed).normal(0, std, (img.height, img.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_corrupted_renders_score_clearly_lower():
    rng = random.Random(0)
    scenes = _validation_scenes(120)
    multi = [s for s in scenes if len(s.objects) >= 2]
    truth = _exact_rate([render(s, 32) for s in scenes], scenes)
    corrupted = {
        "wrong colour": _exact_rate([render(_recoloured(s, rng), 32) for s in scenes], scenes),
        "wrong shape": _exact_rate([render(_reshaped(s, rng), 32) for s in scenes], scenes),
        "missing object": _exact_rate([render(Scene(s.objects[1:], s.background), 32) for s in multi], multi),
        "noise": _exact_rate([_noisy(render(s, 32), 90, i) for i, s in enumerate(scenes)], scenes),
        "shifted object": _exact_rate([_shifted(render(s, 32), 9) for s in scenes], scenes),
    }
    for name, score in corrupted.items():
        assert score <= truth - 0.5, (name, score)


def test_category_checks_fail_on_the_corruption_they_target():
    rng = random.Random(1)
    two = [s for s in _validation_scenes(200, max_objects=2) if len(s.objects) == 2][:40]
    checks = dict((k, c) for k, (_, c) in CATEGORIES.items())

    def rate(check, images, scenes):
        return np.mean([check(parse_image(img), s) for img, s in zip(images, scenes)])

    assert rate(checks["colour"], [render(_recoloured(s, rng), 32) for s in two], two) <= 0.6
    assert rate(checks["attribute_binding"], [render(_recoloured(s, rng), 32) for s in two], two) == 0.0
    assert rate(checks["two_objects"], [render(_reshaped(s, rng), 32) for s in two], two) <= 0.6
    missing = [render(Scene(s.objects[1:], s.background), 32) for s in two]
    assert rate(checks["counting"], missing, two) == 0.0
    moved = []
    for s in two:  # one object to a free cell
        obj = s.objects[0]
        free = [c for c in CELLS if c not in {o.cell for o in s.objects}]
        moved.append(render(s.replace_object(obj, obj.replace(cell=free[0])), 32))
    assert rate(checks["position"], moved, two) == 0.0
    assert rate(checks["two_objects"], moved, two) == 1.0  # moving changes nothing else


def test_mild_noise_still_parses():
    scenes = _validation_scenes(60)
    assert _exact_rate([_noisy(render(s, 32), 8, i) for i, s in enumerate(scenes)], scenes) >= 0.95


# ---- digits judge -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    return digits_judge.load_digits_net(seed=0, cache_dir=tmp_path_factory.mktemp("digits_cache"))


def test_digit_classifier_on_real_validation_digits():
    images, labels = digits_judge.real_digits("validation")
    assert digits_judge.digit_accuracy(images, labels.tolist()) >= 0.99
    swapped = [(int(d) + 1 + int(d) % 3) % 10 for d in labels]  # the image shows another digit than asked
    assert digits_judge.digit_accuracy(images, swapped) <= 0.05
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0))  # what an untrained model draws
    assert digits_judge.digit_accuracy(noise, labels.tolist()) <= 0.3
    blank = torch.ones_like(images)
    assert digits_judge.digit_accuracy(blank, labels.tolist()) <= 0.3
    shifted = torch.roll(images, shifts=(0, 12), dims=(-2, -1))  # the digit pushed to the side
    assert digits_judge.digit_accuracy(shifted, labels.tolist()) <= 0.6


def test_digit_classifier_takes_pil_images_of_other_sizes():
    from mogao.data.builtin.digits import load_digit_images, render_digit, split_indices

    idx = split_indices("validation")[:40]
    labels = load_digit_images()[1][idx]
    big = [render_digit(int(i), 64) for i in idx]
    assert digits_judge.digit_accuracy(big, labels.tolist()) >= 0.95


def test_digits_fid_ranks_real_below_corruptions(digits_net):
    real, labels = digits_judge.real_digits("validation")
    train, train_labels = digits_judge.real_digits("train")
    g = torch.Generator().manual_seed(0)
    sample = train[torch.randperm(len(train), generator=g)[:60]]
    fid_real = digits_judge.digits_fid(digits_net, sample, real)
    one_digit = train[train_labels == 3][:60]
    noise = (sample + torch.randn(sample.shape, generator=g) * 0.5).clamp(0, 1)
    shifted = torch.roll(sample, shifts=(8, 8), dims=(-2, -1))
    for name, images in (("one digit only", one_digit), ("noise", noise), ("shifted", shifted)):
        assert digits_judge.digits_fid(digits_net, images, real) > 3 * fid_real, name


def test_digits_net_is_deterministic_and_cached(tmp_path, digits_net):
    path_net = digits_judge.load_digits_net(seed=0, cache_dir=tmp_path)
    files = list(tmp_path.glob("digits-judge-*.pt"))
    assert len(files) == 1
    for a, b in zip(path_net.state_dict().values(), digits_net.state_dict().values()):
        assert torch.equal(a, b)
    again = digits_judge.load_digits_net(seed=0, cache_dir=tmp_path)  # from the cache file
    x = digits_judge.real_digits("validation")[0][:8]
    assert torch.equal(again(x), path_net(x))
    assert again(x).shape == (8, digits_judge.DigitsNet.num_features)


# ---- vqa judge ----------------------------------------------------------------------------------------------


def test_vqa_exact_match_normalises_like_training():
    from mogao.training.exact_match import normalise_answer

    assert text_judge.normalise_answer is normalise_answer  # one rule for the eval judge and the validation
    assert [normalise_answer(t) for t in ("  Red.", "top  LEFT", "two", "Yes.")] == ["red", "top left", "two", "yes"]
    data = make_builtin("vqa", split="validation", n=50, seed=0, max_objects=2)
    refs = [m["answer"] for m in data.meta]
    assert text_judge.exact_match_rate([r.upper() + "." for r in refs], refs) == 1.0
    wrong = refs[1:] + refs[:1]
    assert text_judge.exact_match_rate(wrong, refs) <= 0.5
    assert not text_judge.exact_match("red circle", "red")


# ---- interleaved (edit) judge -------------------------------------------------------------------------------


def _story_turns(n: int = 40):
    data = make_builtin("story", split="validation", n=n, seed=2, image_size=8, max_objects=2)
    for meta in data.meta:
        scenes = [Scene.from_dict(s) for s in meta["scenes"]]
        for k, op in enumerate(meta["ops"]):
            yield scenes[k], scenes[k + 1], op


def _verdicts(pairs):
    return [edit_judge.judge_edit(parse_image(before), parse_image(after), op, pronoun=pron)
            for before, after, op, pron in pairs]


def test_edit_judge_on_reference_stories():
    turns = list(_story_turns())
    verdicts = _verdicts([(render(a, 32), render(b, 32), op, len(a.objects) == 1) for a, b, op in turns])
    assert np.mean([v.correct for v in verdicts]) >= 0.99
    assert all(v.target_found for v in verdicts)


def test_edit_judge_on_corrupted_turns():
    rng = random.Random(3)
    turns = list(_story_turns())
    unchanged = _verdicts([(render(a, 32), render(a, 32), op, len(a.objects) == 1) for a, b, op in turns])
    assert np.mean([v.changed for v in unchanged]) == 0.0
    assert np.mean([v.kept for v in unchanged]) >= 0.99  # doing nothing keeps everything else

    def spoil(scene: Scene, op: dict) -> Scene:
        """Also change an attribute the instruction did not touch."""
        obj = rng.choice(scene.objects)
        size = "small" if obj.size == "large" else "large"
        return scene.replace_object(obj, obj.replace(size=size))

    spoiled = [(render(a, 32), render(spoil(b, op), 32), op, len(a.objects) == 1) for a, b, op in turns
               if op["op"] != "resize"]
    verdicts = _verdicts(spoiled)
    assert np.mean([v.correct for v in verdicts]) <= 0.2
    noisy = _verdicts([(render(a, 32), _noisy(render(b, 32), 90, i), op, len(a.objects) == 1)
                       for i, (a, b, op) in enumerate(turns)])
    assert np.mean([v.correct for v in noisy]) <= 0.2
    vanished = [(render(a, 32), render(Scene(tuple(o for o in b.objects if o != Obj.from_dict(op["result"])),
                                             b.background), 32), op, False)
                for a, b, op in turns if op["op"] in ("recolour", "reshape") and len(b.objects) > 1]
    assert vanished and not any(v.kept or v.changed for v in _verdicts(vanished))  # the target just disappeared
    blank = Image.new("RGB", (32, 32), "white")  # nothing drawn before and after: no free "kept"
    for v in _verdicts([(blank, blank, op, len(a.objects) == 1) for a, b, op in turns]):
        assert not (v.target_found or v.changed or v.kept)
