"""The generation loop under BAGEL's options (position scheme, sequence format, guidance) against full
recomputation, BAGEL's guidance against `mogao.bagel.rules`, the loop's grammar in BAGEL's format, and given
starting noise (Python API and `mogao generate --noise`)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from oracle_sampler import _with_text, _without_last_token
from PIL import Image
from transformers import AutoTokenizer

from mogao.bagel import rules
from mogao.data import DataConfig, SpecialTokens, collate_plans, lower_sample, samples_from_dicts
from mogao.data.shapes_mini import draw_shape
from mogao.errors import ConfigError
from mogao.inference import GenerationConfig, GenerationSession, Guidance, text_to_image
from mogao.inference.cache import cached_forward, text_piece
from mogao.inference.cli import generate_main, load_noise
from mogao.inference.guidance import FULL, IMAGE_ONLY, IMAGES_DROPPED, NONE, TEXT_DROPPED
from mogao.model.autoencoder import patchify
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel, NoisyState
from mogao.sequence.layout import Span
from mogao.sequence.modality import Modality
from mogao.sequence.positions import positions_from

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Draw a red circle."
GRID = (8, 8)  # 32 x 32 pixels with the pixel autoencoder and latent patch 4
NO_CFG = Guidance(text_scale=1.0, image_scale=1.0)


@pytest.fixture(scope="module")
def tok(tiny_parts):
    """The tiny tokenizer with BAGEL's text-chunk markers added."""
    t = AutoTokenizer.from_pretrained(tiny_parts["root"] / "tokenizer")
    t.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return t


_MODELS: dict = {}


def _model(parts, tok, **cfg) -> MogaoModel:
    """A tiny pixel-space model (embeddings grown to the tokenizer) whose zero-initialised parts are random."""
    key = tuple(sorted(cfg.items()))
    if key not in _MODELS:
        torch.manual_seed(0)
        m = load_model(ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder="pixel", latent_patch=4,
                                   vocab_size=len(tok), **cfg))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in m.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        _MODELS[key] = m.eval()
    return _MODELS[key]


def _data(model) -> DataConfig:
    return DataConfig(token_budget=1 << 20, max_image_tokens=GRID[0] * GRID[1], p_drop_text=0.0,
                      p_drop_images=0.0).for_model(model)


def _plan(model, tok, segments):
    return lower_sample(samples_from_dicts([{"segments": segments}])[0], tok, _data(model))


def _concat(model, a, b):
    """Plan a followed by plan b, b's positions continuing after a's (a ends in text)."""
    t0 = int(a.position_ids[0].max()) + 1
    pos = b.position_ids.clone()
    if model.cfg.positions == "bagel":
        pos += t0
    elif model.cfg.positions == "mrope_aligned":  # b's first image a whole number of strides after a's last
        spans = [Span(p.kind, p.length, p.image, markers=bool(p.markers)) for p in b.spans]
        a_images = a.position_ids[0][a.modality != Modality.TEXT]
        pos = positions_from("mrope_aligned", spans, [im.grid for im in b.images], t0,
                             int(a_images[-1]) if len(a_images) else None)[0]
    else:  # IL-RoPE: T of every token, (H, W) of text tokens and markers
        pos[0] += t0
        pos[1:, b.modality == Modality.TEXT] += t0
    n_img = len(a.images)
    spans = list(a.spans) + [replace(s, image=s.image + n_img) if s.image >= 0 else s for s in b.spans]
    starts = [dict(d) for d in a.copy_start] + [{k: v + a.num_tokens for k, v in d.items()} for d in b.copy_start]
    return replace(a, spans=spans, images=a.images + b.images, input_ids=torch.cat((a.input_ids, b.input_ids)),
                   labels=torch.cat((a.labels, b.labels)), position_ids=torch.cat((a.position_ids, pos), 1),
                   modality=torch.cat((a.modality, b.modality)), copy_start=starts)


def _logits(model, plan, k: int) -> torch.Tensor:
    """Full-forward text logits of the last k + 1 tokens of `plan`."""
    batch = collate_plans([plan], plan.num_tokens)
    with torch.no_grad():
        logits = model(batch, return_logits=True).text_logits
    return logits[batch.layout.physical_of_logical[plan.num_tokens - 1 - k:]]


def _decode(model, s, n):
    logits, ids = [s.pending[0]], []
    for _ in range(n):
        ids.append(int(logits[-1].argmax()))
        logits.append(cached_forward(model, s.cache, [s.row(0, FULL)], [[text_piece(ids[-1:])]], commit=True).logits[0])
    return ids, torch.stack(logits)


@pytest.mark.parametrize("positions, fmt", [("bagel", "bagel"), ("bagel", "mogao"), ("il_rope", "bagel"),
                                           ("mrope_aligned", "mogao")])
@pytest.mark.parametrize("text_sees_vae", [False, True])
def test_cached_decoding_equals_full_recompute_before_and_after_a_generated_image(tiny_parts, tok, positions, fmt,
                                                                                   text_sees_vae):
    model = _model(tiny_parts, tok, positions=positions, sequence_format=fmt, text_sees_vae=text_sees_vae)
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=32, steps=2, max_images=1), NO_CFG)
    s.add_user_turn([[{"text": PROMPT}]])
    ids0, got0 = _decode(model, s, 3)
    head = _with_text(_without_last_token(_plan(model, tok, [{"text": PROMPT}])), ids0)
    torch.testing.assert_close(got0, _logits(model, head, 3), rtol=0, atol=1e-5)
    img = s.respond(draw=True)[0].images[0]  # (drawn, then back in the cache as a condition image)
    s.add_user_turn([[{"text": "Now make it blue."}]])
    ids1, got1 = _decode(model, s, 3)
    tail = _without_last_token(_plan(model, tok, [{"image": img}, {"text": "Now make it blue."}]))
    full = _concat(model, head, _with_text(tail, ids1))
    ref1 = _logits(model, full, 3)
    torch.testing.assert_close(got1, ref1, rtol=0, atol=1e-5)
    assert ref1.abs().max() > 0.1
    # positions advance as the scheme says: text by its tokens; the image (its noisy copy took none) by 1 under
    # IL-RoPE, by 1 per copy under BAGEL's scheme, plus its two markers in Mogao's format
    if positions == "mrope_aligned":  # the cache goes on where the full sequence's positions do
        image_t = full.position_ids[0][full.modality != Modality.TEXT]
        assert s.cache.next_t[s.row(0, FULL)] == int(full.position_ids[0, -1]) + 1
        assert s.cache.image_t[s.row(0, FULL)] == int(image_t[0]) == int(image_t[-1])
        return
    markers = 4 if fmt == "bagel" else 2
    text = s.cache.lengths[s.row(0, FULL)] - 2 * GRID[0] * GRID[1] - markers
    image = {("bagel", "bagel"): 2, ("bagel", "mogao"): 4, ("il_rope", "bagel"): 1}[positions, fmt]
    assert s.cache.next_t[s.row(0, FULL)] == text + image


@pytest.mark.parametrize("positions", ["il_rope", "bagel"])
def test_two_images_in_a_row_are_two_images_in_the_cache(tiny_parts, tok, positions):
    """BAGEL's format puts no text between two images: the cache still tells their copies apart (their own T
    under IL-RoPE, their own grids), as the lowering does."""
    model = _model(tiny_parts, tok, positions=positions, sequence_format="bagel", text_sees_vae=True)
    turn = [{"image": draw_shape("circle", "red")}, {"image": draw_shape("square", "blue", (64, 32))},
            {"text": "Which is red?"}]
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=32, steps=2), NO_CFG)
    s.add_user_turn([turn])
    ids, got = _decode(model, s, 2)
    plan = _with_text(_without_last_token(_plan(model, tok, turn)), ids)
    assert plan.images[0].grid != plan.images[1].grid
    torch.testing.assert_close(got, _logits(model, plan, 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["mogao", "bagel"])
@pytest.mark.parametrize("mode", ["mogao", "bagel"])
def test_cached_branch_velocities_equal_full_recompute(tiny_parts, tok, fmt, mode):
    """An edit under BAGEL's positions: every guidance branch's cached velocity is the full forward of the sample
    it stands for, and the guided velocity is the mode's formula of them."""
    model = _model(tiny_parts, tok, positions="bagel", sequence_format=fmt)
    guidance = Guidance(text_scale=3.0, image_scale=2.0, mode=mode, renorm_type="channel")
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=32, steps=2), guidance)
    context = [{"image": draw_shape("circle", "green")}, {"text": "Make it red."}]
    s.add_user_turn([context])
    s.begin_image([0])
    x = torch.randn(64, model.token_dim, generator=torch.Generator().manual_seed(4))
    target = {"image": draw_shape("cross", "red"), "generate": True}
    stands_for = ({FULL: context, TEXT_DROPPED: context[:1], IMAGES_DROPPED: context[1:]} if mode == "bagel" else
                  {FULL: context, IMAGE_ONLY: context[:1], NONE: []})
    ref = {}
    for b, segs in stands_for.items():
        plan = _plan(model, tok, [*segs, target])
        with torch.no_grad():
            ref[b] = model(collate_plans([plan], plan.num_tokens), noisy=NoisyState(torch.tensor([0.6]), x)).velocity
    got = s.velocity([0], [x], 0.6, GRID)[0]
    if mode == "bagel":
        want = rules.combine_cfg(ref[FULL], ref[TEXT_DROPPED], ref[IMAGES_DROPPED], 3.0, 2.0, "channel")
    else:
        want = guidance.combine(ref)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)
    assert min((ref[FULL] - v).abs().max() for b, v in ref.items() if b != FULL) > 1e-4


# ---- BAGEL's guidance against its written rules -------------------------------------------------------------


def test_bagels_guidance_is_rules_combine_cfg_with_its_interval_and_branches():
    g = torch.Generator().manual_seed(0)
    v = {b: torch.randn(6, 4, generator=g) for b in (FULL, TEXT_DROPPED, IMAGES_DROPPED)}
    for renorm_type in rules.RENORM_TYPES:
        for ts, im in ((4.0, 1.5), (4.0, 1.0), (1.0, 2.0), (0.5, 2.0)):
            for floor in (0.0, 0.9):
                gd = Guidance(text_scale=ts, image_scale=im, mode="bagel", renorm_type=renorm_type, renorm_min=floor)
                want = rules.combine_cfg(v[FULL], v[TEXT_DROPPED], v[IMAGES_DROPPED], ts, im, renorm_type, floor)
                torch.testing.assert_close(gd.combine(v), want, rtol=0, atol=0)
    # without renorm: the nested formula itself
    plain = Guidance(text_scale=4.0, image_scale=1.5, mode="bagel", renorm=False).combine(v)
    g_text = v[TEXT_DROPPED] + 4.0 * (v[FULL] - v[TEXT_DROPPED])
    torch.testing.assert_close(plain, v[IMAGES_DROPPED] + 1.5 * (g_text - v[IMAGES_DROPPED]), rtol=0, atol=1e-6)
    # the interval: lo < σ <= hi (Mogao's: lo <= σ <= hi); no guidance at all unless γ > 1
    gd = Guidance(text_scale=4.0, image_scale=1.5, interval=(0.4, 1.0), mode="bagel")
    assert [gd.active_at(t) for t in (0.4, 0.41, 1.0)] == [False, True, True]
    assert Guidance(interval=(0.4, 1.0)).active_at(0.4)
    assert not Guidance(text_scale=1.0, image_scale=3.0, mode="bagel").active_at(0.5)
    assert gd.branches(False) == (FULL, TEXT_DROPPED, IMAGES_DROPPED) == gd.branches(True)
    assert replace(gd, image_scale=1.0).branches(True) == (FULL, TEXT_DROPPED)
    # Mogao's formula keeps its default (no renorm) and takes the per-token renorm
    v3 = {FULL: v[FULL], IMAGE_ONLY: v[TEXT_DROPPED], NONE: v[IMAGES_DROPPED]}
    base = v3[NONE] + 1.5 * (v3[IMAGE_ONLY] - v3[NONE]) + 7.5 * (v3[FULL] - v3[IMAGE_ONLY])
    assert torch.equal(Guidance().combine(v3), base)
    ratio = (v[FULL].norm(dim=-1, keepdim=True) / base.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    torch.testing.assert_close(Guidance(renorm=True, renorm_type="channel").combine(v3), base * ratio)
    with pytest.raises(ConfigError, match="text_channel"):
        Guidance(renorm_type="text_channel")
    with pytest.raises(ConfigError, match="mode"):
        Guidance(mode="cfg++")


def test_bagels_branches_follow_its_inferencer_turn_by_turn(tiny_parts, tok):
    """Text dropped = the full context before the last user text (or after the last image); images dropped =
    the user's text only; a drawn image enters the full context, which text dropped then copies."""
    model = _model(tiny_parts, tok, positions="bagel", sequence_format="bagel")
    red, blue = draw_shape("circle", "red"), draw_shape("square", "blue")

    def session(turn):
        s = GenerationSession(model, tok, 1, GenerationConfig(image_size=32, steps=2, max_images=1),
                              Guidance(mode="bagel"))
        s.add_user_turn([turn])
        return s

    def same(s, row, t, t_row):
        n = s.cache.lengths[row]
        assert n == t.cache.lengths[t_row] and s.cache.next_t[row] == t.cache.next_t[t_row]
        for a, b in zip(s.cache.k, t.cache.k):
            torch.testing.assert_close(a[row, :, :n], b[t_row, :, :n], rtol=0, atol=1e-5)

    s = session([{"text": "one"}, {"image": red}, {"text": "two"}])
    same(s, s.row(0, TEXT_DROPPED), session([{"text": "one"}, {"image": red}]), FULL)
    same(s, s.row(0, IMAGES_DROPPED), session([{"text": "one"}, {"text": "two"}]), FULL)
    t = session([{"text": "one"}, {"image": blue}])
    same(t, t.row(0, TEXT_DROPPED), t, t.row(0, FULL))
    before = s.cache.lengths[s.row(0, IMAGES_DROPPED)]
    s.respond(draw=True)
    same(s, s.row(0, TEXT_DROPPED), s, s.row(0, FULL))
    assert s.cache.lengths[s.row(0, IMAGES_DROPPED)] == before


def test_the_loop_in_bagels_format_opens_and_closes_text_chunks(tiny_parts, tok, monkeypatch):
    model = _model(tiny_parts, tok, positions="bagel", sequence_format="bagel")
    sp = SpecialTokens.from_tokenizer(tok)
    ims, ime = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    a, b = tok("red", add_special_tokens=False)["input_ids"][0], tok("blue", add_special_tokens=False)["input_ids"][0]

    def run(script, **cfg):
        s = GenerationSession(model, tok, 1, GenerationConfig(image_size=32, steps=2, **cfg), NO_CFG)
        s.add_user_turn([[{"text": PROMPT}]])
        start = s.cache.lengths[s.row(0, FULL)]
        tokens = iter(script)
        monkeypatch.setattr(s, "_next_token", lambda c: next(tokens))
        r = s.respond()[0]
        row = s.row(0, FULL)
        return r, s.cache.modality[row, start:s.cache.lengths[row]].tolist(), s, start

    # a text answer opens with <|im_start|> (not asked of the model), ends its chunk at <|im_end|>; then the end
    r, mods, s, start = run([a, b, ime, sp.eos_id])
    assert r.stop_reason == "eos" and r.text == tok.decode([a, b]) and len(mods) == 4
    row = s.row(0, FULL)
    assert s.cache.next_t[row] == start + 4
    # after a chunk <|vision_start|> draws (the noisy copy's markers are never committed), then the chunk again
    r, mods, _, _ = run([a, ime, sp.vision_start_id, ims, b, ime, sp.eos_id], max_images=2)
    assert [type(x.image) for x in r.segments][1] is Image.Image and len(r.segments) == 3
    clean, vit = [int(Modality.VAE_CLEAN)] * 66, [int(Modality.VIT)] * 66
    assert mods == [0, 0, 0] + clean + vit + [0, 0, 0]
    # max_new_tokens counts the chunk markers too; a <|vision_start|> inside a chunk only closes it
    r, mods, _, _ = run([a, sp.vision_start_id, sp.eos_id], max_images=1)
    assert r.stop_reason == "eos" and mods == [0, 0, 0]
    r, _, _, _ = run([a, b, b, b], max_new_tokens=3)
    assert r.stop_reason == "max_tokens" and r.text == tok.decode([a, b])


# ---- given starting noise ---------------------------------------------------------------------------------


def test_given_noise_reproduces_a_sample_as_tokens_or_as_a_latent(tiny_parts, tok):
    model = _model(tiny_parts, tok)
    cfg = GenerationConfig(image_size=32, steps=3, seed=1)
    g = Guidance(text_scale=3.0, image_scale=1.5, interval=(0.4, 1.0), mode="bagel")
    latent = torch.randn(model.autoencoder.latent_channels, 32, 32, generator=torch.Generator().manual_seed(9))
    tokens = patchify(latent, model.cfg.latent_patch)
    a = text_to_image(model, tok, [PROMPT], config=cfg, guidance=g, noise=[latent])[0]
    b = text_to_image(model, tok, [PROMPT], config=replace(cfg, seed=7), guidance=g, noise=[tokens])[0]
    seeded = text_to_image(model, tok, [PROMPT], config=cfg, guidance=g)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(seeded))
    s = GenerationSession(model, tok, 1, cfg, g)
    s.add_user_turn([[{"text": PROMPT}]])
    with pytest.raises(ConfigError, match="token grid"):
        s.respond(draw=True, noise=[latent[:, :16]])
    with pytest.raises(ConfigError, match="noise for 2 prompts"):
        text_to_image(model, tok, [PROMPT], config=cfg, noise=[None, None])


def test_generate_takes_bagels_guidance_and_noise_from_the_command_line(tiny_parts, tok, tmp_path, capsys):
    torch.manual_seed(0)
    m = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder="pixel", latent_patch=4))
    d = tmp_path / "model"
    m.save_pretrained(d)
    tiny_parts["tokenizer"].save_pretrained(d)
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).standard_normal((64, m.token_dim)).astype(np.float32))
    pages = []
    for seed in ("1", "2"):  # the given noise, not the seed, decides the image
        out = tmp_path / f"out{seed}"
        rc = generate_main(["--ckpt", str(d), "--prompt", PROMPT, "--draw", "--max-images", "1", "--steps", "2",
                            "--image-size", "32", "--seed", seed, "--cfg-mode", "bagel", "--cfg-text", "3",
                            "--cfg-interval", "0.4", "1.0", "--cfg-renorm-type", "channel", "--noise", str(noise),
                            "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        record = json.loads((out / "conversation.json").read_text())
        assert record["settings"]["cfg_mode"] == "bagel"
        pages.append(np.asarray(Image.open(out / record["conversation"][-1]["image"])))
    assert np.array_equal(*pages)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ConfigError, match="objects.npy"):
        load_noise(str(tmp_path / "objects.npy"))
    rc = generate_main(["--ckpt", str(d), "--prompt", PROMPT, "--noise", str(tmp_path / "missing.npy"),
                        "--out", str(tmp_path / "x")])
    assert rc == 2 and "missing.npy" in capsys.readouterr().err
