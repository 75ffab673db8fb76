"""The KV-cached generation loop against full recomputation: decoding, image velocities, CFG, re-entry, seeds."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from oracle_sampler import (
    _with_text,
    _without_last_token,
    build_generation_batch,
    generate_text,
    last_token_rows,
    sample_image_tokens,
)

from mogao.data import DataConfig, SpecialTokens, collate_plans, lower_sample, samples_from_dicts
from mogao.data.shapes_mini import draw_shape
from mogao.inference import GenerationConfig, GenerationSession, Guidance
from mogao.inference.cache import cached_forward, text_piece
from mogao.inference.guidance import FULL, IMAGE_ONLY, NONE
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel, NoisyState

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Draw a red circle."
GRID = (8, 8)  # 32 x 32 pixels with the pixel autoencoder and latent patch 4
NO_CFG = Guidance(text_scale=1.0, image_scale=1.0)


def _random_model(parts, **cfg) -> MogaoModel:
    """A tiny pixel-space model whose zero-initialised parts are made random (so everything matters)."""
    torch.manual_seed(0)
    m = load_model(ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder="pixel", latent_patch=4,
                               **cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def model(tiny_parts) -> MogaoModel:
    return _random_model(tiny_parts)


@pytest.fixture(scope="module")
def tok(tiny_parts):
    return tiny_parts["tokenizer"]


def _session(model, tok, n=1, guidance=NO_CFG, **cfg) -> GenerationSession:
    config = GenerationConfig(image_size=32, steps=3, **cfg)
    return GenerationSession(model, tok, n, config, guidance)


def _full_forward_logits(model, tok, segments, generated: list[int]) -> torch.Tensor:
    """Text logits of the last prompt token and of each generated token, by a full forward of the packed
    sample `segments` (condition images as the data pipeline lowers them) followed by `generated`."""
    cfg = DataConfig(token_budget=1 << 20, max_image_tokens=GRID[0] * GRID[1], vit_patch=model.vit_patch,
                     vae_patch=model.vae_patch, p_drop_text=0.0, p_drop_images=0.0)
    plan = _without_last_token(lower_sample(samples_from_dicts([{"segments": segments}])[0], tok, cfg))
    plan = _with_text(plan, generated)
    batch = collate_plans([plan], plan.num_tokens)
    with torch.no_grad():
        logits = model(batch, return_logits=True).text_logits
    last = int(last_token_rows(batch)[0])
    k = len(generated)
    # the last k+1 logical tokens are text: their physical rows are the last k+1 of the sample's text rows
    rows = batch.layout.physical_of_logical[plan.num_tokens - 1 - k: plan.num_tokens]
    assert int(rows[-1]) == last
    return logits[rows]


def _decode_manually(model, session, c: int, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding of n tokens through the cache, returning the tokens and every step's logits."""
    logits = [session.pending[c]]
    ids = []
    for _ in range(n):
        ids.append(int(logits[-1].argmax()))
        out = cached_forward(model, session.cache, [session.row(c, FULL)], [[text_piece(ids[-1:])]], commit=True)
        logits.append(out.logits[0])
    return ids, logits


@pytest.mark.parametrize("text_sees_vae", [False, True])
def test_cached_decoding_equals_full_recompute_before_and_after_a_generated_image(model, tok, text_sees_vae):
    m = model if not text_sees_vae else _with_cfg(model, text_sees_vae=True)
    s = _session(m, tok, max_images=1)
    s.add_user_turn([[{"text": PROMPT}]])
    ids0, logits0 = _decode_manually(m, s, 0, 3)
    ref0 = _full_forward_logits(m, tok, [{"text": PROMPT}], ids0)
    torch.testing.assert_close(torch.stack(logits0), ref0, rtol=0, atol=1e-5)

    # draw an image (it re-enters the cache as a condition), then a new user turn and more decoding
    resp = s.respond(draw=True)
    assert resp[0].stop_reason == "max_images" and len(resp[0].images) == 1
    img = resp[0].images[0]
    s.add_user_turn([[{"text": "Now make it blue."}]])
    ids1, logits1 = _decode_manually(m, s, 0, 3)
    # the reference sample: the same token ids as the cache holds (prompt + generated text, image, new turn)
    ref1 = _reference_after_image(m, tok, ids0, img, "Now make it blue.", ids1)
    torch.testing.assert_close(torch.stack(logits1), ref1, rtol=0, atol=1e-5)
    assert ref1.abs().max() > 0.1  # a real comparison, not of zeros


def _with_cfg(model: MogaoModel, **changes) -> MogaoModel:
    """The same weights under another model config (a shallow copy sharing every parameter)."""
    import copy

    m = copy.copy(model)
    m.cfg = replace(model.cfg, **changes)
    return m


def _reference_after_image(model, tok, ids0, img, turn, ids1) -> torch.Tensor:
    """Full-forward logits of the packed sample PROMPT ids0 <vs> image <ve> turn ids1 (the image a condition,
    lowered by the data pipeline): the sequence the session's cache holds, token for token."""
    cfg = DataConfig(token_budget=1 << 20, max_image_tokens=GRID[0] * GRID[1], vit_patch=model.vit_patch,
                     vae_patch=model.vae_patch, p_drop_text=0.0, p_drop_images=0.0)
    prompt = _without_last_token(lower_sample(samples_from_dicts([{"segments": [{"text": PROMPT}]}])[0], tok, cfg))
    head = _with_text(prompt, ids0)
    tail = lower_sample(samples_from_dicts([{"segments": [{"image": img}, {"text": turn}]}])[0], tok, cfg)
    tail = _with_text(_without_last_token(tail), ids1)
    plan = _concat_plans(head, tail)
    batch = collate_plans([plan], plan.num_tokens)
    with torch.no_grad():
        logits = model(batch, return_logits=True).text_logits
    k = len(ids1)
    rows = batch.layout.physical_of_logical[plan.num_tokens - 1 - k: plan.num_tokens]
    return logits[rows]


def _concat_plans(a, b):
    """Plan a followed by plan b (b's positions shifted to continue after a)."""
    from mogao.sequence.modality import Modality

    t0 = int(a.position_ids[0].max()) + 1
    pos = b.position_ids.clone()
    is_text = b.modality == Modality.TEXT
    pos[0] += t0
    pos[1:, is_text] += t0
    n_img = len(a.images)
    spans = list(a.spans) + [replace(s, image=s.image + n_img) if s.image >= 0 else s for s in b.spans]
    starts = [dict(d) for d in a.copy_start] + [{k: v + a.num_tokens for k, v in d.items()} for d in b.copy_start]
    return replace(a, spans=spans, images=a.images + b.images, input_ids=torch.cat((a.input_ids, b.input_ids)),
                   labels=torch.cat((a.labels, b.labels)), position_ids=torch.cat((a.position_ids, pos), 1),
                   modality=torch.cat((a.modality, b.modality)), copy_start=starts)


def test_respond_text_equals_the_full_recompute_decoder(model, tok):
    img = draw_shape("square", "blue")
    context = [{"image": img}, {"text": "What colour is it?"}]
    ref = generate_text(model, tok, [context], max_new_tokens=6, max_image_tokens=GRID[0] * GRID[1])
    s = _session(model, tok, max_new_tokens=6, max_images=0)
    s.add_user_turn([context])
    out = s.respond()[0]
    assert out.text.strip() == ref[0]
    assert out.stop_reason in ("eos", "max_images", "max_tokens")


# ---- image velocities against the full-recompute sampler ---------------------------------------------------


def _velocity_ref(model, batch, x: torch.Tensor, sigma: float, n_targets: int) -> torch.Tensor:
    with torch.no_grad():
        v = model(batch, noisy=NoisyState(torch.full((n_targets,), sigma), torch.cat([x] * n_targets))).velocity
    return v.float()


def _branch_velocities(model, s, x, sigma):
    rows = [s.row(0, b) for b in (FULL, IMAGE_ONLY, NONE)]
    from mogao.inference.cache import Piece
    from mogao.sequence.modality import Modality

    out = cached_forward(model, s.cache, rows, [[Piece(Modality.VAE_NOISY, tokens=x, sigma=sigma, grid=GRID)]] * 3,
                         commit=False)
    return {b: v[0] for b, v in zip((FULL, IMAGE_ONLY, NONE), out.velocities)}


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_cached_image_velocities_equal_full_recompute(model, tok, task):
    _check_cached_velocities(model, tok, task)


def test_cached_velocities_equal_full_recompute_with_x0_prediction(tiny_parts, tok):
    """The x0 head (v̂ = (x − x̂₀)/σ) gives the same velocities on both paths, also below the σ clamp."""
    model = _random_model(tiny_parts, prediction="x0", min_sigma_x0=0.5)
    _check_cached_velocities(model, tok, "edit")


def _check_cached_velocities(model, tok, task) -> None:
    cond = draw_shape("circle", "green")
    context = [{"text": PROMPT}] if task == "t2i" else [{"image": cond}, {"text": "Make it red."}]
    s = _session(model, tok)
    s.add_user_turn([context])
    s.begin_image([0])
    x = torch.randn(GRID[0] * GRID[1], model.token_dim, generator=torch.Generator().manual_seed(4))
    ref_batch, grid = build_generation_batch(model, tok, [context], image_size=32, unconditional=True)
    assert grid == GRID
    for sigma in (1.0, 0.37):
        got = _branch_velocities(model, s, x, sigma)
        ref = _velocity_ref(model, ref_batch, x, sigma, 2)
        n = x.shape[0]
        torch.testing.assert_close(got[FULL], ref[:n], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[NONE], ref[n:], rtol=0, atol=1e-5)
        assert (ref[:n] - ref[n:]).abs().max() > 1e-3  # the context matters
        # image-only branch: the sample with its text dropped and its condition images kept
        cfg = DataConfig(token_budget=1 << 20, max_image_tokens=n, vit_patch=model.vit_patch,
                         vae_patch=model.vae_patch, p_drop_text=1.0, p_drop_images=0.0)
        target = {"image": draw_shape("cross", "red"), "generate": True}
        plan = lower_sample(samples_from_dicts([{"segments": [*context, target]}])[0], tok, cfg)
        img_ref = _velocity_ref(model, collate_plans([plan], plan.num_tokens), x, sigma, 1)
        torch.testing.assert_close(got[IMAGE_ONLY], img_ref, rtol=0, atol=1e-5)


def test_sampled_image_equals_full_recompute_sampler_with_text_cfg(model, tok, monkeypatch):
    """2-way CFG (no condition image) along a whole Euler trajectory equals `sample_image_tokens`' CFG."""
    steps, seed, scale = 4, 7, 3.0
    ref, _ = sample_image_tokens(model, tok, [[{"text": PROMPT}]], image_size=32, steps=steps, cfg_scale=scale,
                                 seed=seed)
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=32, steps=steps, shift=1.0),
                          Guidance(text_scale=scale, image_scale=1.0))
    noise = torch.randn(64, model.token_dim, generator=torch.Generator().manual_seed(seed))
    monkeypatch.setattr(s, "image_noise", lambda c, grid: noise)
    s.add_user_turn([[{"text": PROMPT}]])
    s.begin_image([0])
    got = s.sample_tokens([0], GRID)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-5)


# ---- CFG ---------------------------------------------------------------------------------------------------


def test_batched_three_way_cfg_equals_separate_forwards(model, tok):
    g = Guidance(text_scale=7.5, image_scale=1.5)
    s = _session(model, tok, guidance=g)
    s.add_user_turn([[{"image": draw_shape("square", "red")}, {"text": "Make it blue."}]])
    s.begin_image([0])
    x = torch.randn(64, model.token_dim, generator=torch.Generator().manual_seed(2))
    got = s.velocity([0], [x], 0.6, GRID)[0]
    sep = {}
    from mogao.inference.cache import Piece
    from mogao.sequence.modality import Modality

    for b in (FULL, IMAGE_ONLY, NONE):  # one forward per branch
        out = cached_forward(model, s.cache, [s.row(0, b)], [[Piece(Modality.VAE_NOISY, tokens=x, sigma=0.6,
                                                                     grid=GRID)]], commit=False)
        sep[b] = out.velocities[0][0]
    want = sep[NONE] + 1.5 * (sep[IMAGE_ONLY] - sep[NONE]) + 7.5 * (sep[FULL] - sep[IMAGE_ONLY])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (sep[FULL] - sep[IMAGE_ONLY]).abs().max() > 1e-3 and (sep[IMAGE_ONLY] - sep[NONE]).abs().max() > 1e-3
    # renorm never makes the guided velocity longer than the full branch's; min bounds the rescale
    renorm = replace(g, renorm=True)
    v = renorm.combine(sep)
    assert float(v.norm()) <= float(sep[FULL].norm()) * (1 + 1e-6) and float(v.norm()) < float(want.norm())
    ratio = float(sep[FULL].norm() / want.norm())
    assert ratio < 1
    torch.testing.assert_close(v, want * ratio, rtol=1e-5, atol=1e-6)
    floor = (ratio + 1) / 2  # a lower bound above the ratio is what gets applied
    torch.testing.assert_close(replace(g, renorm=True, renorm_min=floor).combine(sep), want * floor,
                               rtol=1e-5, atol=1e-6)


def test_two_way_cfg_without_condition_image_and_the_interval(model, tok):
    g = Guidance(text_scale=4.0, image_scale=1.5, interval=(0.0, 0.5))
    s = _session(model, tok, guidance=g)
    s.add_user_turn([[{"text": PROMPT}]])
    s.begin_image([0])
    x = torch.randn(64, model.token_dim, generator=torch.Generator().manual_seed(3))
    sep = _branch_velocities(model, s, x, 0.4)
    got = s.velocity([0], [x], 0.4, GRID)[0]
    torch.testing.assert_close(got, sep[NONE] + 4.0 * (sep[FULL] - sep[NONE]), rtol=0, atol=1e-5)
    # outside the interval only the full branch runs
    sep_hi = _branch_velocities(model, s, x, 0.8)
    torch.testing.assert_close(s.velocity([0], [x], 0.8, GRID)[0], sep_hi[FULL], rtol=0, atol=1e-5)


# ---- re-entry, seeds, batching, multi-turn -------------------------------------------------------------------


def test_generated_image_reenters_like_a_condition_image(model, tok, tmp_path):
    """A drawn image leaves the cache exactly as the same image given by the user as a condition would."""
    s = _session(model, tok, max_images=1)
    s.add_user_turn([[{"text": PROMPT}]])
    img = s.respond(draw=True)[0].images[0]
    img.save(tmp_path / "drawn.png")
    s.add_user_turn([[{"text": "Now make it blue."}]])
    # the same conversation with the image handed in by the user (through a PNG file, as the CLI would)
    t = _session(model, tok)
    t.add_user_turn([[{"text": PROMPT}, {"image": str(tmp_path / "drawn.png")}, {"text": "Now make it blue."}]])
    torch.testing.assert_close(s.pending[0], t.pending[0], rtol=0, atol=1e-5)
    full_s, full_t = s.row(0, FULL), t.row(0, FULL)
    n = s.cache.lengths[full_s]
    assert n == t.cache.lengths[full_t] and s.cache.next_t[full_s] == t.cache.next_t[full_t]
    for layer in range(len(model.backbone.layers)):
        torch.testing.assert_close(s.cache.k[layer][full_s, :, :n], t.cache.k[layer][full_t, :, :n],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(s.cache.v[layer][full_s, :, :n], t.cache.v[layer][full_t, :, :n],
                                   rtol=0, atol=1e-5)


def _run(model, tok, prompts, seed, guidance=None):
    s = GenerationSession(model, tok, len(prompts), GenerationConfig(image_size=32, steps=3, seed=seed,
                                                                     max_new_tokens=3, max_images=2),
                          guidance or Guidance(text_scale=3.0))
    s.add_user_turn([[{"text": p}] for p in prompts])
    return s.respond(draw=True)


def test_seeded_runs_are_identical_and_seeds_differ(model, tok):
    a, b, c = (_run(model, tok, [PROMPT], seed)[0] for seed in (5, 5, 6))
    assert a.text == b.text and a.stop_reason == b.stop_reason
    assert [np.asarray(i).tobytes() for i in a.images] == [np.asarray(i).tobytes() for i in b.images]
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_batched_prompts_match_single_runs(model, tok):
    prompts = [PROMPT, "A blue square on a white background."]
    both = _run(model, tok, prompts, seed=5)
    alone = _run(model, tok, prompts[1:], seed=6)[0]  # conversation i draws from seed + i
    assert both[1].text == alone.text and len(both[1].images) == len(alone.images)
    for x, y in zip(both[1].images, alone.images):
        assert np.abs(np.asarray(x).astype(int) - np.asarray(y).astype(int)).max() <= 1
    assert not np.array_equal(np.asarray(both[0].images[0]), np.asarray(both[1].images[0]))


def test_multi_turn_keeps_earlier_turns_in_the_cache(model, tok):
    s = _session(model, tok, max_images=1, guidance=Guidance(text_scale=2.0))
    s.add_user_turn([[{"text": PROMPT}]])
    first = s.respond(draw=True)[0]
    lengths = list(s.cache.lengths)
    s.add_user_turn([[{"text": "Now make it blue."}]])
    second = s.respond(draw=True)[0]
    assert len(first.images) == len(second.images) == 1
    # every branch grew: the earlier image stays in all three, the text only in the full branch
    special = SpecialTokens.from_tokenizer(tok)
    assert all(s.cache.lengths[r] > lengths[r] for r in range(3))
    assert s.cache.lengths[s.row(0, NONE)] == 2 * (2 * 64 + 2)
    assert special.vision_start_id != special.vision_end_id
    assert [seg.role for seg in s.history[0]] == ["user", "model", "user", "model"]
    # the second image depends on the first turn: a fresh session with only the second turn draws another
    fresh = _session(model, tok, max_images=1, guidance=Guidance(text_scale=2.0))
    fresh.add_user_turn([[{"text": "Now make it blue."}]])
    other = fresh.respond(draw=True)[0]
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(second.images[0]))


def test_stops_on_max_tokens_and_on_eos(model, tok, monkeypatch):
    s = _session(model, tok, max_new_tokens=4, max_images=0)
    s.add_user_turn([[{"text": PROMPT}]])
    r = s.respond()[0]
    assert r.stop_reason in ("max_tokens", "eos", "max_images")
    eos = SpecialTokens.from_tokenizer(tok).eos_id
    t = _session(model, tok, max_new_tokens=50)
    t.add_user_turn([[{"text": PROMPT}]])
    t.pending[0] = torch.full_like(t.pending[0], -1e9)
    t.pending[0][eos] = 0.0
    r = t.respond()[0]
    assert r.stop_reason == "eos" and r.text == "" and r.images == []


def test_lockstep_runs_max_new_tokens_text_steps(model, tok, monkeypatch):
    """With lockstep every `respond` runs exactly max_new_tokens text forwards, however early the answers end
    (the ranks of a sharded model must run as many); the answers and the caches are those without it."""
    import mogao.inference.session as session_mod
    from mogao.errors import ConfigError

    with pytest.raises(ConfigError, match="lockstep"):
        GenerationConfig(lockstep=True)  # (images: max_images must be 0)
    eos = SpecialTokens.from_tokenizer(tok).eos_id
    real, calls, seen = session_mod.cached_forward, [], {}

    def counting(*args, **kwargs):
        calls.append(kwargs.get("commit"))
        return real(*args, **kwargs)

    for lockstep in (False, True):
        s = _session(model, tok, 2, max_new_tokens=5, max_images=0, lockstep=lockstep)
        s.add_user_turn([[{"text": PROMPT}], [{"text": "A blue square."}]])
        for c in (0, 1):  # every answer ends at once
            s.pending[c] = torch.full_like(s.pending[c], -1e9)
            s.pending[c][eos] = 0.0
        calls.clear()
        monkeypatch.setattr(session_mod, "cached_forward", counting)
        out = s.respond()
        monkeypatch.setattr(session_mod, "cached_forward", real)
        seen[lockstep] = ([r.text for r in out], [r.stop_reason for r in out], list(calls), list(s.cache.lengths))
    texts, reasons, plain_calls, lengths = seen[False]
    assert seen[True][:2] == (texts, reasons) and seen[True][3] == lengths
    assert texts == ["", ""] and reasons == ["eos", "eos"] and plain_calls == []
    assert seen[True][2] == [False] * 5  # five idle steps, none committing anything


@pytest.mark.parametrize("patch, side", [(2, 16), (4, 32), (8, 32), (16, 32), (32, 32)])
def test_tiny_models_draw_the_built_in_worlds_size_by_default(patch, side):
    """A pixel-autoencoder model draws (and reads conditions) at 8x8 tokens up to the built-in world's 32 pixels:
    the tiny recipes at latent patch 8 train on 4x4 tokens, and an 8x8 grid (64 pixels) is a size they never saw."""
    from types import SimpleNamespace

    from mogao.inference import default_image_size
    from mogao.model.autoencoder import PixelAutoencoder

    model = SimpleNamespace(autoencoder=PixelAutoencoder(), vae_patch=patch)
    assert default_image_size(model) == (side, side)
