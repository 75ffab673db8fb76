"""Shift invariance of the position schemes: a whole sample started k positions later computes the same logits and
velocities under a scheme whose every angle is relative ("mrope", "mrope_aligned", "bagel"), through the training forward and the
KV-cached generation loop, for text, condition images, generation targets and multi-image stories. IL-RoPE counts
an image's (H, W) from 0 whatever its depth, so it does not - the test says by how much. Saved models without the
`positions` / `rope_axes` keys load as IL-RoPE with the interleaved split and generate exactly as before."""

from __future__ import annotations

import json

import pytest
import torch

from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts
from mogao.data.builtin.shapes import Obj, Scene, render
from mogao.inference.guidance import Guidance
from mogao.inference.session import GenerationConfig, GenerationSession
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.rope import frequency_axes
from mogao.sequence.positions import IMAGE_STRIDE

SHIFTS = (1, 17, 100)
SCHEMES = {"il_rope": {}, "mrope": {}, "mrope_hw_high": {"rope_axes": "hw_high"}, "mrope_aligned": {},
           "bagel": {"latent_position_table": 8, "latent_position_embedding": False}}


def _scheme(name: str) -> dict:
    return {"positions": name.split("_hw")[0], **SCHEMES[name]}


def _build(parts, name: str, fill: bool):
    torch.manual_seed(0)
    m = load_model(ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder=parts["vae"], latent_patch=2,
                               **_scheme(name))).eval()
    if fill:  # zero-initialised paths (AdaLN gates, heads, biases) would hide a difference
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad and not p.abs().sum():
                    p.normal_(0, 0.05)
    return m


@pytest.fixture(scope="module")
def models(tiny_parts, one_thread):
    return {name: _build(tiny_parts, name, fill=True) for name in SCHEMES}


def _image(shape: str, colour: str, cell: str | None = None):
    return render(Scene((Obj(shape, colour, "large", cell),)), 16)


def _samples() -> list[dict]:
    red, blue, green = _image("circle", "red"), _image("square", "blue", "top left"), _image("cross", "green")
    return [
        {"segments": [{"text": "A red circle on a white background."}, {"text": "It is round."}]},
        {"segments": [{"text": "Draw a red circle."}, {"image": red, "generate": True}]},
        {"segments": [{"image": red}, {"text": "What shape is it?", "loss": False}, {"text": "circle"}]},
        {"segments": [{"image": red}, {"text": "Make it blue.", "loss": False}, {"image": blue, "generate": True}]},
        {"segments": [{"text": "Draw a red circle.", "loss": False}, {"image": red, "generate": True},
                      {"text": "Now make it a blue square.", "loss": False}, {"image": blue, "generate": True},
                      {"text": "Now make it a green cross.", "loss": False}, {"image": green, "generate": True}]},
    ]


def _forward(model, tokenizer, offset: int):
    cfg = DataConfig(token_budget=4096, max_image_tokens=16, p_drop_text=0.0, p_drop_images=0.0,
                     position_offset=offset).for_model(model)
    batch = collate_plans([lower_sample(s, tokenizer, cfg) for s in samples_from_dicts(_samples())],
                          cfg.token_budget)
    n_targets = int(batch.image_is_target.sum())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        from mogao.model.mogao import NoisyState

        n_noisy = int(batch.layout.noisy_index.numel()) if hasattr(batch.layout, "noisy_index") else None
        seeded = model(batch, return_logits=True)
        tokens = torch.randn(seeded.velocity.shape, generator=g)
        sigmas = torch.linspace(0.3, 0.95, n_targets)
        given = model(batch, return_logits=True, noisy=NoisyState(sigmas, tokens))
    assert n_noisy is None or n_noisy == tokens.shape[0]
    return batch, seeded, given


@pytest.mark.parametrize("name", list(SCHEMES))
def test_shifting_a_whole_sample_changes_nothing_under_a_relative_scheme(models, tiny_parts, name):
    model, tok = models[name], tiny_parts["tokenizer"]
    batch0, seeded0, given0 = _forward(model, tok, 0)
    assert int(batch0.image_is_target.sum()) == 5 and batch0.num_images >= 6  # targets, conditions, a story
    worst = 0.0
    for k in SHIFTS:
        batch, seeded, given = _forward(model, tok, k)
        assert torch.equal(batch.input_ids, batch0.input_ids)
        assert torch.equal(batch.position_ids[0], batch0.position_ids[0] + k)  # every T moved by k
        for a, b in ((seeded.text_logits, seeded0.text_logits), (seeded.velocity, seeded0.velocity),
                     (given.text_logits, given0.text_logits), (given.velocity, given0.velocity)):
            worst = max(worst, float((a - b).abs().max()))
    if name == "il_rope":
        assert worst > 1e-3, f"IL-RoPE's image H/W count from 0 at any depth, yet a shift changed at most {worst:.1e}"
    else:
        assert worst < 2e-4, f"{name}: shifting a sample changed an output by {worst:.1e}"


def _session_outputs(model, tokenizer, offset: int):
    """Text logits after a story's context and the image drawn for its next turn, through the cached loop."""
    red, blue = _image("circle", "red"), _image("square", "blue", "top left")
    config = GenerationConfig(image_size=16, steps=3, seed=5, max_new_tokens=3, position_offset=offset)
    session = GenerationSession(model, tokenizer, 2, config, Guidance(text_scale=2.0, image_scale=1.5))
    session.add_user_turn([[{"text": "Draw a red circle."}, {"image": red}, {"text": "Now make it a blue square."}],
                           [{"image": blue}, {"text": "What shape is it?"}]])
    logits = [session.pending[c].clone() for c in range(2)]
    replies = session.respond(draw=[True, False])
    return logits, replies


@pytest.mark.parametrize("name", ["il_rope", "mrope", "mrope_aligned", "bagel"])
def test_the_cached_loop_is_shift_invariant_under_a_relative_scheme(models, tiny_parts, name):
    model, tok = models[name], tiny_parts["tokenizer"]
    logits0, replies0 = _session_outputs(model, tok, 0)
    worst = 0.0
    for k in (17, 100):
        logits, replies = _session_outputs(model, tok, k)
        worst = max(worst, *(float((a - b).abs().max()) for a, b in zip(logits, logits0)))
        img = torch.tensor(list(replies[0].images[0].getdata()), dtype=torch.float)
        img0 = torch.tensor(list(replies0[0].images[0].getdata()), dtype=torch.float)
        worst = max(worst, float((img - img0).abs().max()) / 255)
    if name == "il_rope":
        assert worst > 1e-3
    else:
        assert worst < 1e-3, f"{name}: the cached loop at a later start changed an output by {worst:.1e}"


def test_aligned_story_images_are_whole_strides_apart(models, tiny_parts):
    """Under "mrope_aligned" every image after a sample's first is a whole number of strides after the image before
    it (the story's turns exactly one: their instructions are short), at any start."""
    model, tok = models["mrope_aligned"], tiny_parts["tokenizer"]
    for offset in (0, 17):
        batch, _, _ = _forward(model, tok, offset)
        lay = batch.layout
        for sample in range(int(lay.sample.max()) + 1):
            image = (lay.sample == sample) & (lay.modality != 0)
            order, t = lay.order[image], batch.position_ids[0][image]
            starts = t[order.argsort()].unique_consecutive().tolist()
            assert all(b - a == IMAGE_STRIDE for a, b in zip(starts, starts[1:])), (sample, starts)
        assert batch.num_images >= 6


def test_text_alone_is_the_llms_rope_under_every_scheme(tiny_parts, one_thread):
    """Text-only samples: every scheme gives the same logits (each text token is (t, t, t), and both frequency
    splits then see t on every frequency) - the parity with the source LLM that the backbone tests check."""
    from transformers import AutoModelForCausalLM

    tok = tiny_parts["tokenizer"]
    llm = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"]).eval()
    for name in SCHEMES:
        model = _build(tiny_parts, name, fill=False)
        cfg = DataConfig(token_budget=256, max_image_tokens=16).for_model(model)
        batch = collate_plans([lower_sample(s, tok, cfg) for s in samples_from_dicts(_samples()[:1])], 256)
        assert batch.num_images == 0
        with torch.no_grad():
            ref = llm(batch.input_ids[None], position_ids=batch.position_ids[0][None]).logits[0]
            logits = model(batch, return_logits=True).text_logits
        assert torch.allclose(logits, ref, atol=1e-4), name


def test_frequency_splits_give_h_and_w_the_same_number_of_frequencies():
    for f in (8, 16, 64):
        for split in ("interleaved", "hw_high"):
            axes = frequency_axes(f, split).tolist()
            assert axes.count(1) == axes.count(2) == f // 4 and axes.count(0) == f - 2 * (f // 4)
    assert frequency_axes(16, "hw_high")[:8].tolist() == [1, 2] * 4  # the highest frequencies
    assert frequency_axes(16, "interleaved")[:6].tolist() == [0, 1, 2] * 2


def test_a_model_saved_without_the_new_keys_loads_as_il_rope_and_generates_as_before(models, tiny_parts, tmp_path):
    model, tok = models["il_rope"], tiny_parts["tokenizer"]
    model.save_pretrained(tmp_path / "m")
    cfg_file = next(p for p in (tmp_path / "m").glob("*.json") if "positions" in p.read_text())
    saved = json.loads(cfg_file.read_text())

    def drop(d):
        if isinstance(d, dict):
            for key in ("positions", "rope_axes"):
                d.pop(key, None)
            for v in d.values():
                drop(v)
    drop(saved)
    cfg_file.write_text(json.dumps(saved))
    old = load_model(tmp_path / "m").eval()
    assert old.cfg.positions == "il_rope" and old.cfg.rope_axes == "interleaved"
    assert torch.equal(old.backbone.rope.axes, frequency_axes(old.backbone.rope.axes.numel()))
    logits0, replies0 = _session_outputs(model, tok, 0)
    logits, replies = _session_outputs(old, tok, 0)
    assert all(torch.equal(a, b) for a, b in zip(logits, logits0))
    assert list(replies[0].images[0].getdata()) == list(replies0[0].images[0].getdata())
    assert replies[1].text == replies0[1].text
