"""Evaluation suites and `mogao eval` end to end: a tiny random model saved to disk and loaded like a real
checkpoint, a perfect generator (reference renders, answers read off the image) that must score >= 0.99 through
the same suite code, and a noise generator that must score low."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mogao.data.builtin.digits import load_digit_images, render_digit, split_indices
from mogao.data.builtin.shapes import NUMBER_WORDS, render
from mogao.errors import ConfigError
from mogao.eval import SUITES, run_suite
from mogao.eval.cli import main as eval_main
from mogao.eval.models import load_checkpoint
from mogao.eval.shapes_judge import parse_image
from mogao.eval.suites import shapes_prompts, story_items

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_N = {"shapes": 2, "digits": 4, "vqa": 4, "interleaved": 2}
FAST = {"steps": 2, "image_size": 32}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """Shared across test files of the session, so the digits judge's network trains once."""
    return str(tmp_path_factory.getbasetemp() / "mogao-digits-cache")


@pytest.fixture(scope="module")
def saved_model(parts, tmp_path_factory):
    """A random model built from the tiny components, saved with its tokenizer like a trained stage's model."""
    from transformers import AutoTokenizer

    from mogao.model.config import ModelConfig
    from mogao.model.io import load_model

    torch.manual_seed(0)
    model = load_model(ModelConfig(llm=str(parts["llm"]), vit=str(parts["vit"]), autoencoder="pixel",
                                   latent_patch=4))
    d = tmp_path_factory.mktemp("eval_model") / "model"
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(parts["tokenizer"]).save_pretrained(d)
    return d


def _check_structure(result: dict, suite: str, n: int) -> None:
    assert result["suite"] == suite and result["n"] == n and result["seed"] == 0
    assert result["judge"] and all(isinstance(v, str) and v for v in result["judge"].values())
    for category, s in result["scores"].items():
        assert set(s) == {"all", "held_out", "seen", "n", "n_held_out", "n_seen"}
        assert s["n_held_out"] + s["n_seen"] in (0, s["n"])
        for group in ("all", "held_out", "seen"):
            v = s[group]
            if v is None:
                continue
            assert np.isfinite(v)
            assert v >= 0 if category.startswith("fid") else 0 <= v <= 1, (category, group, v)
        assert s["all"] is not None


# ---- a model through the real generation path ---------------------------------------------------------------


def test_run_suite_on_a_saved_tiny_model(saved_model, cache_dir):
    model, tok = load_checkpoint(saved_model)
    seen = []
    for suite in SUITES:
        result = run_suite(model, tok, suite, SMALL_N[suite], 0, cache_dir=cache_dir,
                           progress=lambda done, total: seen.append((done, total)), **FAST)
        _check_structure(result, suite, SMALL_N[suite])
        assert result["details"]
    assert seen[-1][0] == seen[-1][1]  # the progress reached the end of the last suite
    shapes = run_suite(model, tok, "shapes", 2, 0, **FAST)
    assert set(shapes["scores"]) == {"overall", "single_object", "colour", "two_objects", "position",
                                     "attribute_binding", "counting"}
    assert len(shapes["details"]) == 3 * 2


def test_run_suite_rejects_bad_arguments(saved_model):
    with pytest.raises(ConfigError, match="unknown suite 'geneval'"):
        run_suite(None, None, "geneval", 2, 0)
    with pytest.raises(ConfigError, match="n=0"):
        run_suite(None, None, "vqa", 0, 0)
    with pytest.raises(ConfigError, match="a model and its tokenizer, or a generator"):
        run_suite(None, None, "vqa", 2, 0)


# ---- a perfect and a noise generator through the same suite code --------------------------------------------


def _texts(context: list[dict]) -> tuple[str, ...]:
    return tuple(seg["text"] for seg in context if "text" in seg)


def _read_answer(image: Image.Image, question: str) -> str:
    """Answer a shapes-world question from what the shapes judge sees in the image."""
    objects = parse_image(image).objects
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return next(o.colour for o in objects if o.shape == m[1])
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        return next(o.shape for o in objects if o.colour == m[1])
    if question == "How many objects are there?":
        return NUMBER_WORDS[len(objects) - 1]
    if m := re.fullmatch(r"Where is the (?:(\w+) )?(\w+)\?", question):
        return next(o.where for o in objects if o.shape == m[2] and m[1] in (None, o.colour))
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objects) else "no"
    raise AssertionError(f"unexpected question {question!r}")


class PerfectGenerator:
    """Draws the reference image of every prompt and reads answers off the image."""

    def __init__(self, n: dict[str, int], seed: int = 0) -> None:
        self.images_by_texts: dict[tuple[str, ...], Image.Image] = {}
        for items in shapes_prompts(n["shapes"], seed).values():
            for it in items:
                self.images_by_texts[(it["caption"],)] = render(it["scene"], 32)
        for story in story_items(n["interleaved"], seed):
            for k, scene in enumerate(story["scenes"]):
                self.images_by_texts[tuple(story["texts"][:k + 1])] = render(scene, 32)
        labels = load_digit_images()[1]
        idx = split_indices("validation")
        self.digits = {d: [int(i) for i in idx[labels[idx] == d]] for d in range(10)}
        self.drawn = 0

    def images(self, contexts, *, seed, cfg):
        out = []
        for ctx in contexts:
            texts = _texts(ctx)
            if m := re.fullmatch(r"Draw the digit (\d)\.", texts[-1]):
                out.append(render_digit(self.digits[int(m[1])][self.drawn % 20], 32))
                self.drawn += 1
            else:
                out.append(self.images_by_texts[texts])
        return out

    def texts(self, contexts):
        return [_read_answer(ctx[0]["image"], ctx[1]["text"]) for ctx in contexts]


class NoiseGenerator:
    """Uniform noise for every image and the same answer to every question."""

    def images(self, contexts, *, seed, cfg):
        rng = np.random.default_rng(seed)
        return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in contexts]

    def texts(self, contexts):
        return ["yes"] * len(contexts)


def test_perfect_generator_scores_at_least_099_and_noise_scores_low(cache_dir):
    n = {"shapes": 6, "digits": 20, "vqa": 40, "interleaved": 8}
    perfect, noise = PerfectGenerator(n), NoiseGenerator()
    for suite in SUITES:
        good = run_suite(None, None, suite, n[suite], 0, generator=perfect, cache_dir=cache_dir)
        bad = run_suite(None, None, suite, n[suite], 0, generator=noise, cache_dir=cache_dir)
        _check_structure(good, suite, n[suite])
        _check_structure(bad, suite, n[suite])
        headline = "accuracy" if suite == "digits" else "overall"
        assert good["scores"][headline]["all"] >= 0.99, (suite, good["scores"])
        assert bad["scores"][headline]["all"] <= 0.5, (suite, bad["scores"])
        if suite != "digits":
            assert good["scores"][headline]["held_out"] >= 0.99 and good["scores"][headline]["seen"] >= 0.99
        else:
            assert good["scores"]["fid"]["all"] < 0.2 * bad["scores"]["fid"]["all"]
            assert good["scores"]["fid_real_reference"]["all"] == bad["scores"]["fid_real_reference"]["all"]


# ---- the command line ---------------------------------------------------------------------------------------


def test_cli_writes_results_and_prints_tables(saved_model, cache_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    code = eval_main(["--ckpt", str(saved_model), "--suite", "shapes", "--suite", "vqa,digits", "--n", "4",
                      "--steps", "2", "--cache-dir", cache_dir, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for word in ("shapes", "vqa", "digits", "attribute_binding", "fid", "held-out"):
        assert word in printed
    results = json.loads(out.read_text())
    assert results["checkpoint"] == str(saved_model) and results["n"] == 4 and results["seed"] == 0
    assert list(results["suites"]) == ["shapes", "digits", "vqa"]
    assert {"shapes", "vqa", "accuracy", "fid"} <= set(results["judges"])
    assert "64-d" in results["judges"]["fid"]
    for name, res in results["suites"].items():
        _check_structure(res, name, 4)
        assert res["wall_s"] > 0 and res["settings"]["batch_size"] == 16


def test_cli_errors_exit_2_with_a_message(saved_model, tmp_path, capsys):
    from mogao.cli import main as mogao_main

    cases = [
        (["eval", "--ckpt", str(saved_model), "--suite", "geneval"], "--suite 'geneval' is unknown"),
        (["eval", "--ckpt", str(tmp_path / "nowhere")], "checkpoint directory not found"),
        (["eval", "--ckpt", str(saved_model), "--suite", "vqa", "--n", "0"], "n=0 is invalid"),
        (["eval", "--suite", "vqa"], "give --ckpt MODEL_DIR"),
    ]
    for argv, message in cases:
        assert mogao_main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert mogao_main(["eval", "--ckpt", str(tmp_path)]) == 2  # a directory without a model
    assert "not a saved mogao model" in capsys.readouterr().err
    no_tokenizer = tmp_path / "model"
    no_tokenizer.mkdir()
    for f in saved_model.iterdir():
        if not f.name.startswith("tokenizer"):
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    assert mogao_main(["eval", "--ckpt", str(no_tokenizer)]) == 2
    assert "no tokenizer in" in capsys.readouterr().err
    (no_tokenizer / "tokenizer.json").write_text("{}")  # a broken tokenizer
    assert mogao_main(["eval", "--ckpt", str(no_tokenizer)]) == 2
    assert "could not load the tokenizer" in capsys.readouterr().err


def test_cli_untrained_needs_a_tokenizer_then_evaluates(parts, tmp_path, monkeypatch, capsys):
    from mogao.cli import main as mogao_main

    monkeypatch.chdir(tmp_path)  # the tiny recipe's parts live under runs/tiny/components, relative to here
    monkeypatch.setattr("mogao.model.tiny.pretrain_tiny_vit", lambda *a, **k: {})  # (its own test: 40 s saved)
    assert mogao_main(["eval", "--untrained", "--suite", "vqa"]) == 2
    assert "no tokenizer at 'runs/tiny/components/tokenizer'" in capsys.readouterr().err
    out = tmp_path / "untrained.json"
    code = mogao_main(["eval", "--untrained", "--tokenizer", str(parts["tokenizer"]), "--suite", "vqa",
                       "--n", "3", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["checkpoint"] == "untrained:tiny/t2i"
    _check_structure(results["suites"]["vqa"], "vqa", 3)
    assert (tmp_path / "runs/tiny/components/llm").is_dir()  # built from the recipe's tiny spec


def test_eval_samples_on_the_models_training_shift_unless_told(monkeypatch):
    """`mogao eval` draws with the σ schedule users get from `mogao generate` (the model's training shift) by
    default; `--shift` overrides it."""
    from types import SimpleNamespace

    from mogao.eval import generation
    from mogao.eval.cli import build_parser

    seen = []

    def fake_generate(model, tokenizer, turns, *, draw, config, guidance, noise=None):
        seen.append(config.shift)
        return [SimpleNamespace(images=[None]) for _ in turns]

    monkeypatch.setattr("mogao.inference.tasks.generate", fake_generate)
    gen = generation.ModelGenerator(model=None, tokenizer=None)
    gen.images([[generation.prompt("A red circle.")]], seed=0, cfg=3.0)
    generation.ModelGenerator(model=None, tokenizer=None, shift=1.0).images([[generation.prompt("x")]], seed=0, cfg=3.0)
    assert seen == [None, 1.0]
    assert build_parser().parse_args(["--ckpt", "m"]).shift is None
    assert build_parser().parse_args(["--ckpt", "m", "--shift", "2"]).shift == 2.0


def test_vqa_images_get_the_token_grid_of_the_suite_image_size(saved_model, monkeypatch):
    """A question's image is lowered on the grid of the suite's image size, as the condition images of edits
    are (not the model's default generation grid): a model trained on 4x4 grids is asked on 4x4 grids."""
    import mogao.inference.session as session

    seen, real = [], session.image_tensors

    def recording(img, max_tokens, vit_patch, vae_patch):
        seen.append(max_tokens)
        return real(img, max_tokens, vit_patch, vae_patch)

    monkeypatch.setattr(session, "image_tensors", recording)
    model, tok = load_checkpoint(str(saved_model))
    for size, tokens in ((16, 16), (32, 64)):  # the saved model's latent patch: 4 pixels
        seen.clear()
        run_suite(model, tok, "vqa", n=2, seed=0, image_size=size)
        assert seen and set(seen) == {tokens}
