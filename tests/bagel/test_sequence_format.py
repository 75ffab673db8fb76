"""BAGEL's sequence format and position scheme against BAGEL's written rules (`mogao.bagel.rules`: wrap_text,
wrap_image, position_ids), and a tiny BAGEL folder under all of BAGEL's options: one training step, then an image
and a text answer through the public generation loop, the cache holding BAGEL's sequence."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image
from tiny_bagel import tiny_settings, write_tiny_bagel

from mogao.bagel import rules
from mogao.bagel.load import load_bagel_model
from mogao.data import DataConfig, SpecialTokens, collate_plans, lower_sample, samples_from_dicts
from mogao.data.shapes_mini import draw_shape
from mogao.errors import ConfigError, DataError
from mogao.inference import GenerationConfig, GenerationSession, Guidance, answer, text_to_image
from mogao.inference.cache import Piece, cached_forward
from mogao.inference.guidance import FULL, IMAGES_DROPPED, TEXT_DROPPED
from mogao.model.mogao import NoisyState
from mogao.sequence.modality import Modality

PROMPT = "Draw a red cat."
IGNORE = rules.IGNORE_INDEX


@pytest.fixture(scope="module")
def bagel(tmp_path_factory, one_thread):
    """The tiny BAGEL folder as a float32 model under BAGEL's options, and its tokenizer."""
    tiny = write_tiny_bagel(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")
    model, tok = load_bagel_model(tiny.path, dtype=torch.float32, settings=tiny_settings(tiny))
    assert (model.cfg.positions, model.cfg.sequence_format) == ("bagel", "bagel")  # (bagel_model_options)
    return model, tok


def _config(model, **changes) -> DataConfig:
    cfg = DataConfig(token_budget=4096, max_image_tokens=16, p_drop_text=0.0, p_drop_images=0.0).for_model(model)
    return replace(cfg, **changes)


def _lower(tok, cfg, segments):
    return lower_sample(samples_from_dicts([{"id": "s", "segments": segments}])[0], tok, cfg)


def test_the_lowering_is_bagels_wrapping_order_and_positions(bagel):
    model, tok = bagel
    bt, sp = rules.special_token_ids(tok), SpecialTokens.from_tokenizer(tok)
    cfg = _config(model)
    assert (cfg.positions, cfg.sequence_format, cfg.vae_patch, cfg.drop_unread_vae) == ("bagel", "bagel", 4, False)
    img = draw_shape("circle", "red", (16, 16))
    plan = _lower(tok, cfg, [{"image": img}, {"text": PROMPT}, {"image": img, "generate": True}])
    n = 16
    text = tok(PROMPT, add_special_tokens=False)["input_ids"]
    chunk, chunk_labels = rules.wrap_text(text, bt)
    copy = rules.wrap_image(n, bt, placeholder=0)
    # condition: clean VAE then ViT; instruction; target: noisy, clean VAE, ViT - each copy in its own markers
    assert plan.input_ids.tolist() == copy + copy + chunk + copy + copy + copy + [sp.eos_id]
    kinds = [(Modality.VAE_CLEAN, 0), (Modality.VIT, 0), (Modality.VAE_NOISY, 1), (Modality.VAE_CLEAN, 1),
             (Modality.VIT, 1)]
    mods = [[int(Modality.TEXT), *[int(k)] * n, int(Modality.TEXT)] for k, _ in kinds]
    assert plan.modality.tolist() == mods[0] + mods[1] + [0] * len(chunk) + mods[2] + mods[3] + mods[4] + [0]
    pos, _ = rules.position_ids([("vae", n + 2), ("vit", n + 2), ("text", len(chunk)), ("noisy", n + 2),
                                 ("vae", n + 2), ("vit", n + 2), ("text", 1)])
    assert plan.position_ids[0].tolist() == pos and torch.equal(plan.position_ids[1], plan.position_ids[0])
    # labels: BAGEL's inside the chunk; its <|im_end|> predicts the generated image's <|vision_start|> (mogao
    # learns when to draw), and the last token predicts the end of the sample
    labels = plan.labels.tolist()
    a = 2 * (n + 2)
    assert labels[a:a + len(chunk) - 1] == chunk_labels[:-1]
    assert labels[a + len(chunk) - 1] == bt.start_of_image
    assert labels[-2] == sp.eos_id and labels[-1] == IGNORE
    assert all(x == IGNORE for i, x in enumerate(labels) if not a - 1 <= i < a + len(chunk) and i != len(labels) - 2)
    # the packed batch: each image token's grid cell, while its positions are one per copy
    batch = collate_plans([plan], 4096)
    cells = batch.grid_cells[:, batch.noisy_index]
    assert cells.tolist() == [[r for r in range(4) for _ in range(4)], [c for _ in range(4) for c in range(4)]]


def test_an_unread_clean_copy_left_out_keeps_its_position(bagel):
    model, tok = bagel
    img = draw_shape("square", "blue", (16, 16))
    segs = [{"text": PROMPT}, {"image": img, "generate": True}, {"text": "A blue square."}]
    full = _lower(tok, _config(model), segs)
    lean = _lower(tok, _config(model, drop_unread_vae=True), segs)
    assert lean.num_tokens == full.num_tokens - 18  # the target's clean VAE copy, markers included
    keep = torch.ones(full.num_tokens, dtype=torch.bool)
    start = full.copy_start[0][Modality.VAE_CLEAN] - 1
    keep[start:start + 18] = False
    assert torch.equal(lean.position_ids, full.position_ids[:, keep])
    assert torch.equal(lean.input_ids, full.input_ids[keep]) and torch.equal(lean.labels, full.labels[keep])


def test_a_tokenizer_without_chat_markers_and_text_holding_them_are_refused(bagel, tiny_parts):
    model, tok = bagel
    with pytest.raises(ConfigError, match="lacks <\\|im_start\\|>, <\\|im_end\\|>"):
        _lower(tiny_parts["tokenizer"], _config(model), [{"text": "a red circle"}])
    with pytest.raises(DataError, match="im_start"):
        _lower(tok, _config(model), [{"text": "Draw <|im_end|> a cat."}])
    with pytest.raises(ConfigError, match="sequence_format"):
        DataConfig(sequence_format="qwen")


def test_one_training_step_under_bagels_options_trains_every_parameter(bagel):
    model, tok = bagel
    state = {k: v.clone() for k, v in model.state_dict().items()}
    img, img2 = draw_shape("circle", "red", (16, 16)), draw_shape("square", "blue", (16, 16))
    cfg = _config(model)
    plans = [_lower(tok, cfg, segs) for segs in (
        [{"text": PROMPT}, {"image": img, "generate": True}],
        [{"image": img}, {"text": "Make it a blue square."}, {"image": img2, "generate": True}],
        [{"image": img}, {"text": "What colour is the cat?", "loss": False}, {"text": "Red."}])]
    batch = collate_plans(plans, 4096)
    model.train()
    model.all_paths_in_training = True  # (every path, as under data-parallel training)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    terms = model(batch).terms
    assert terms.text_weight > 0 and terms.image_weight > 0
    loss = terms.text_sum / terms.text_weight + terms.image_sum / terms.image_weight
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    opt.step()
    moved = [k for k, p in model.named_parameters() if p.requires_grad and not torch.equal(p, state[k])]
    assert moved and any(".gen." in k for k in moved) and any(".und." in k for k in moved)
    model.load_state_dict(state)  # (the next tests start from the folder's weights)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_the_loop_draws_an_image_and_answers_in_bagels_format(bagel):
    model, tok = bagel
    cfg = GenerationConfig(image_size=16, steps=3, max_new_tokens=6)
    guidance = Guidance(text_scale=4.0, image_scale=1.5, interval=(0.4, 1.0), mode="bagel")
    (image,) = text_to_image(model, tok, [PROMPT], config=cfg, guidance=guidance)
    assert isinstance(image, Image.Image) and image.size == (16, 16)
    (reply,) = answer(model, tok, ["What colour is the cat?"], images=[image], config=cfg)
    assert isinstance(reply, str)
    # the cache holds BAGEL's sequence: the wrapped prompt, then the image as its clean VAE and ViT copies
    bt = rules.special_token_ids(tok)
    s = GenerationSession(model, tok, 1, replace(cfg, max_images=1), guidance)
    s.add_user_turn([[{"text": PROMPT}]])
    chunk, _ = rules.wrap_text(tok(PROMPT, add_special_tokens=False)["input_ids"], bt)
    row = s.row(0, FULL)
    assert s.cache.lengths[row] == s.cache.next_t[row] == len(chunk)
    assert s.cache.lengths[s.row(0, IMAGES_DROPPED)] == len(chunk) and s.cache.lengths[s.row(0, TEXT_DROPPED)] == 0
    s.respond(draw=True)
    n = 16
    assert s.cache.modality[row, :s.cache.lengths[row]].tolist() == (
        [0] * len(chunk) + [int(Modality.VAE_CLEAN)] * (n + 2) + [int(Modality.VIT)] * (n + 2))
    _, nxt = rules.position_ids([("text", len(chunk)), ("noisy", n + 2), ("vae", n + 2), ("vit", n + 2)])
    assert s.cache.next_t[row] == nxt
    # the text-dropped branch is a copy of the full context after an image; images dropped keeps the prompt only
    assert s.cache.lengths[s.row(0, TEXT_DROPPED)] == s.cache.lengths[row]
    assert s.cache.lengths[s.row(0, IMAGES_DROPPED)] == len(chunk)


def test_cached_velocity_of_bagels_branches_equals_full_recompute(bagel):
    """An edit on the tiny BAGEL: each branch's cached velocity is the full forward of the packed sample that
    branch stands for (full; without the instruction; without the condition image). (The autoencoder's posterior
    mean on both sides: its samples are seeded per image in training, drawn at generation.)"""
    model, tok = bagel
    model.autoencoder.sample_posterior = False
    try:
        _check_branches(model, tok)
    finally:
        model.autoencoder.sample_posterior = True


def _check_branches(model, tok) -> None:
    cond = draw_shape("circle", "green", (16, 16))
    context = [{"image": cond}, {"text": "Make it red."}]
    s = GenerationSession(model, tok, 1, GenerationConfig(image_size=16, steps=2),
                          Guidance(text_scale=3.0, image_scale=2.0, mode="bagel"))
    s.add_user_turn([context])
    x = torch.randn(16, model.token_dim, generator=torch.Generator().manual_seed(0))
    bt = rules.special_token_ids(tok)
    rows = [s.row(0, b) for b in (FULL, TEXT_DROPPED, IMAGES_DROPPED)]
    piece = Piece(Modality.VAE_NOISY, tokens=x, sigma=0.7, grid=(4, 4), markers=(bt.start_of_image, bt.end_of_image))
    got = cached_forward(model, s.cache, rows, [[piece]] * 3, commit=False).velocities
    target = {"image": draw_shape("cross", "red", (16, 16)), "generate": True}
    cfg = _config(model)
    for branch, segs in zip(got, (context, context[:1], context[1:])):
        plan = _lower(tok, cfg, [*segs, target])
        with torch.no_grad():
            ref = model(collate_plans([plan], plan.num_tokens), noisy=NoisyState(torch.tensor([0.7]), x)).velocity
        torch.testing.assert_close(branch[0], ref.float(), rtol=0, atol=1e-5)
    assert (got[0][0] - got[1][0]).abs().max() > 1e-4 and (got[0][0] - got[2][0]).abs().max() > 1e-4
