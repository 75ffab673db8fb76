"""The test oracle (tests/oracle_sampler.py): the model's sampling hook, flow-sampling conventions, CFG, greedy
text decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_batch
from oracle_sampler import (
    build_generation_batch,
    generate_text,
    last_token_rows,
    sample_image_tokens,
    sample_images,
)
from PIL import Image

from mogao.data import DataConfig, SpecialTokens, collate_plans, lower_sample, samples_from_dicts
from mogao.data.images import resize_to_grid
from mogao.data.shapes_mini import draw_shape
from mogao.diffusion import FlowMatchingLoss, add_noise, draw_sigmas_and_noise, sampling_sigmas
from mogao.inference import image_grid
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import ModelOutput, MogaoModel, NoisyState
from mogao.sequence.modality import Modality
from mogao.training.objectives import combine_losses

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[{"text": "Draw a red circle."}], [{"text": "Draw a blue square."}]]



def _pixel_model(parts) -> MogaoModel:
    torch.manual_seed(0)
    return load_model(
        ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder="pixel", latent_patch=4)
    )


@pytest.fixture(scope="module")
def model(tiny_parts) -> MogaoModel:
    """A tiny pixel-space model whose zero-initialised parts (velocity out-projection, AdaLN) are made random,
    so the velocity depends on the tokens, on σ and on the context."""
    m = _pixel_model(tiny_parts)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def _targets_draw(model: MogaoModel, batch):
    """The seeded σ and noisy tokens the default forward draws for the batch's targets, their x0 and noise."""
    ids = batch.image_is_target.nonzero().flatten().tolist()
    x0 = [model.image_tokens(batch.vae_pixels)[i] for i in ids]
    sigmas, noise = draw_sigmas_and_noise(
        batch.image_seed[ids],
        [tuple(t.shape) for t in x0],
        [t.shape[0] for t in x0],
        model.cfg.timestep_sampling,
        "cpu",
        torch.float32,
    )
    counts = torch.tensor([t.shape[0] for t in x0])
    x0, noise = torch.cat(x0), torch.cat(noise)
    return sigmas, add_noise(x0, noise, sigmas.repeat_interleave(counts)[:, None]), x0, noise, counts


# ---- the model's sampling hook -----------------------------------------------------------------------------


def test_noisy_state_reproduces_the_seeded_draw(model, tiny_parts, shapes_dicts):
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts, vae_patch=model.vae_patch)
    with torch.no_grad():
        ref = model(batch)
        sigmas, tokens, x0, noise, counts = _targets_draw(model, batch)
        out = model(batch, noisy=NoisyState(sigmas=sigmas, tokens=tokens))
        other_sigma = model(batch, noisy=NoisyState(sigmas=sigmas * 0.5, tokens=tokens)).velocity
        other_tokens = model(batch, noisy=NoisyState(sigmas=sigmas, tokens=tokens + 0.1)).velocity
    assert ref.velocity.abs().max() > 0
    assert torch.equal(out.velocity, ref.velocity)
    # the default forward's flow loss is the MSE against v = eps - x0 of exactly that draw
    weights = batch.image_loss_weight[batch.image_is_target].repeat_interleave(counts)
    s, w = FlowMatchingLoss()(ref.velocity, noise - x0, weights)
    torch.testing.assert_close(ref.terms.image_sum, s, rtol=1e-6, atol=0)
    assert float(ref.terms.image_weight) == float(w) > 0
    # sampling mode: same text terms, no flow loss; the velocity really depends on sigma and on the tokens
    assert torch.equal(out.terms.text_sum, ref.terms.text_sum)
    assert float(out.terms.image_sum) == 0 and float(out.terms.image_weight) == 0
    assert (other_sigma - ref.velocity).abs().max() > 1e-4
    assert (other_tokens - ref.velocity).abs().max() > 1e-4


def test_default_forward_is_deterministic_and_trains(tiny_parts, shapes_dicts):
    """The default path still draws from the images' seeds alone and still back-propagates."""
    model = _pixel_model(tiny_parts)
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts, vae_patch=model.vae_patch)
    a, b = model(batch), model(batch)
    assert torch.equal(a.terms.image_sum, b.terms.image_sum) and torch.equal(
        a.terms.text_sum, b.terms.text_sum
    )
    combine_losses(a.terms).loss.backward()
    assert model.latent_proj.proj_out.weight.grad.abs().sum() > 0


def test_noisy_state_shape_is_checked(model, tiny_parts, shapes_dicts):
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts, vae_patch=model.vae_patch)
    n_t = int(batch.image_is_target.sum())
    with pytest.raises(ValueError, match="NoisyState"):
        model(
            batch,
            noisy=NoisyState(torch.zeros(n_t + 1), torch.zeros(batch.noisy_index.numel(), model.token_dim)),
        )


def test_noisy_copy_ignores_its_own_clean_copies(model, tiny_parts):
    """Why the sampler's placeholder target may be blank: the target's pixels never reach its noisy copy."""
    tok = tiny_parts["tokenizer"]
    red, blue = draw_shape("circle", "red"), draw_shape("square", "blue")
    b1 = make_batch(tok, [{"segments": [{"text": "Draw a red circle."}, {"image": red, "generate": True}]}])
    b2 = make_batch(tok, [{"segments": [{"text": "Draw a red circle."}, {"image": blue, "generate": True}]}])
    state = NoisyState(torch.tensor([0.7]), torch.randn(b1.noisy_index.numel(), model.token_dim))
    with torch.no_grad():
        v1, v2 = model(b1, noisy=state).velocity, model(b2, noisy=state).velocity
    torch.testing.assert_close(v1, v2, rtol=0, atol=1e-6)


def test_decode_tokens_inverts_image_tokens(model):
    img = resize_to_grid(draw_shape("triangle", "green"), (8, 6), model.vae_patch)  # 24 x 32 pixels
    tokens = model.image_tokens([img])[0]
    assert tokens.shape == (48, model.token_dim)
    torch.testing.assert_close(model.decode_tokens(tokens, (8, 6)), img, rtol=0, atol=1e-6)


# ---- images ------------------------------------------------------------------------------------------------


def test_sample_images_sizes_and_determinism(model, tiny_parts):
    tok = tiny_parts["tokenizer"]
    was_training = model.training
    model.train()
    a = sample_images(model, tok, PROMPTS, steps=3, seed=5)
    assert model.training and model.backbone.training and not model.autoencoder.training, "modes restored"
    model.train(was_training)
    b = sample_images(model, tok, PROMPTS, steps=3, seed=5)
    c = sample_images(model, tok, PROMPTS, steps=3, seed=6)
    assert [i.size for i in a] == [(32, 32), (32, 32)] and all(i.mode == "RGB" for i in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    wide = sample_images(model, tok, PROMPTS[:1], image_size=(48, 32), steps=2)
    assert wide[0].size == (48, 32)


def test_a_prompts_image_does_not_depend_on_its_batch_neighbours(model, tiny_parts):
    tok = tiny_parts["tokenizer"]
    alone, _ = sample_image_tokens(model, tok, PROMPTS[:1], steps=4, seed=3)
    both, grid = sample_image_tokens(model, tok, PROMPTS, steps=4, seed=3)
    assert grid == (8, 8) and alone[0].shape == (64, model.token_dim)
    torch.testing.assert_close(both[0], alone[0], rtol=0, atol=1e-5)
    assert (both[1] - both[0]).abs().max() > 1e-3


def test_cfg(model, tiny_parts):
    tok = tiny_parts["tokenizer"]
    batch, _ = build_generation_batch(model, tok, PROMPTS, unconditional=True)
    # the unconditional copies look like training samples whose text and condition images were all dropped
    special = SpecialTokens.from_tokenizer(tok)
    lay = batch.layout
    for s in (2, 3):
        text = batch.input_ids[(lay.sample == s) & (lay.modality == Modality.TEXT)]
        assert text.tolist() == [special.vision_start_id, special.vision_end_id, special.eos_id]
    plain, _ = sample_image_tokens(model, tok, PROMPTS, steps=3)
    one, _ = sample_image_tokens(model, tok, PROMPTS, steps=3, cfg_scale=1.0)
    assert all(torch.equal(x, y) for x, y in zip(plain, one))
    # scale 0 is the unconditional branch alone: the same as sampling from an empty context
    zero, _ = sample_image_tokens(model, tok, PROMPTS, steps=3, cfg_scale=0.0)
    uncond, _ = sample_image_tokens(model, tok, [[], []], steps=3)
    for x, y in zip(zero, uncond):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    guided, _ = sample_image_tokens(model, tok, PROMPTS, steps=3, cfg_scale=4.0)
    assert (guided[0] - plain[0]).abs().max() > 1e-3


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_exact_velocity_field_lands_on_the_target_image(model, tiny_parts, monkeypatch, cfg_scale):
    """With the exact velocity of a point mass at x0, v(x, σ) = (x − x0)/σ (= ε − x0 on the path), Euler
    sampling returns x0 after any schedule: the decoded images equal the target pixel for pixel. This pins the
    direction of integration, the σ handed to the model at each step, the start from each image's seeded noise
    at σ = 1, the token order and the decoding."""
    rng = np.random.default_rng(0)
    targets = [Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in PROMPTS]
    to_tensor = [torch.from_numpy(np.asarray(t).copy()).permute(2, 0, 1).float() / 255 for t in targets]
    x0 = torch.cat(model.image_tokens(to_tensor))
    seen = []

    def exact_velocity(batch, return_logits=False, noisy=None):
        n = int(batch.image_is_target.sum())
        per = noisy.tokens.shape[0] // n
        seen.append((noisy.sigmas.clone(), noisy.tokens.clone()))
        target = x0 if n == len(PROMPTS) else torch.cat((x0, x0))  # with CFG: both branches agree
        return ModelOutput(
            terms=None, velocity=(noisy.tokens - target) / noisy.sigmas.repeat_interleave(per)[:, None]
        )

    monkeypatch.setattr(model, "forward", exact_velocity)
    images = sample_images(
        model,
        tiny_parts["tokenizer"],
        PROMPTS,
        image_size=(48, 32),
        steps=7,
        shift=3.0,
        cfg_scale=cfg_scale,
        seed=11,
    )
    for img, target in zip(images, targets):
        assert np.array_equal(np.asarray(img), np.asarray(target))
    schedule = sampling_sigmas(7, shift=3.0)
    assert len(seen) == 7
    n_t = len(PROMPTS) * (1 if cfg_scale == 1.0 else 2)
    for (sig, _), s in zip(seen, schedule[:-1]):
        assert torch.equal(sig, torch.full((n_t,), float(s)))
    first = seen[0][1][: x0.shape[0]]
    assert float(seen[0][0][0]) == 1.0
    for i in range(len(PROMPTS)):
        noise = torch.randn(96, model.token_dim, generator=torch.Generator().manual_seed(11 + i))
        assert torch.equal(first[96 * i : 96 * (i + 1)], noise)


def test_image_size_must_fit_the_vae_patch(model, tiny_parts):
    from mogao.errors import ConfigError

    with pytest.raises(ConfigError, match="multiples of the model's VAE patch"):
        sample_images(model, tiny_parts["tokenizer"], PROMPTS, image_size=30, steps=1)


# ---- text --------------------------------------------------------------------------------------------------


def test_generate_text_reads_each_samples_last_token(model, tiny_parts, monkeypatch):
    """A scripted model predicts `20 + logical position`, and eos from position 30 on: the answers show that
    the decoder reads each sample's last-token logits through the physical layout, as samples finish."""
    tok = tiny_parts["tokenizer"]
    eos = SpecialTokens.from_tokenizer(tok).eos_id
    contexts = [
        [{"image": draw_shape("circle", "red")}, {"text": "It is"}],
        [{"text": "Draw a red"}],
        [{"text": "Now"}, {"image": draw_shape("square", "blue")}, {"text": "It is a big"}],
    ]

    def scripted(batch, return_logits=False, noisy=None):
        lay = batch.layout
        order = lay.order[: lay.n_und]
        want = torch.where(order >= 30, torch.full_like(order, eos), 20 + order)
        logits = torch.zeros(lay.n_und, len(tok))
        logits[torch.arange(lay.n_und), want] = 1.0
        return ModelOutput(terms=None, text_logits=logits)

    cfg = DataConfig(
        token_budget=10**6,
        max_image_tokens=4,
        vit_patch=model.vit_patch,
        vae_patch=model.vae_patch,
        p_drop_text=0.0,
        p_drop_images=0.0,
        drop_unread_vae=True,  # as generate_text lowers for a model whose text does not see VAE tokens
    )
    lengths = [
        lower_sample(s, tok, cfg).num_tokens - 1
        for s in samples_from_dicts([{"segments": c} for c in contexts], check_images=False)
    ]
    assert lengths[0] > lengths[1]  # different lengths: the samples finish at different steps
    monkeypatch.setattr(model, "forward", scripted)
    got = generate_text(model, tok, contexts, max_new_tokens=40, max_image_tokens=4)
    want = [tok.decode(list(range(20 + n - 1, 50))).strip() for n in lengths]
    assert got == want
    capped = generate_text(model, tok, contexts, max_new_tokens=3, max_image_tokens=4)
    assert capped == [tok.decode([20 + n - 1, 20 + n, 20 + n + 1]).strip() for n in lengths]


def test_last_token_rows_point_at_the_final_text_token(tiny_parts, shapes_dicts):
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts)
    rows = last_token_rows(batch)
    eos = SpecialTokens.from_tokenizer(tiny_parts["tokenizer"]).eos_id
    lay = batch.layout
    assert (batch.input_ids[rows] == eos).all() and (rows < lay.n_und).all()
    assert lay.sample[rows].tolist() == list(range(lay.num_samples))
    assert lay.order[rows].tolist() == [n - 1 for n in lay.sample_lengths]


def test_generate_text_after_brief_training(tiny_parts):
    """Train a tiny model on three image questions; greedy decoding must return the trained answers."""
    tok = tiny_parts["tokenizer"]
    model = _pixel_model(tiny_parts)
    colours = ("red", "green", "blue")
    data = [
        {
            "id": c,
            "segments": [
                {"image": draw_shape("square", c)},
                {"text": "What colour is it?", "loss": False},
                {"text": c},
            ],
        }
        for c in colours
    ]
    cfg = DataConfig(
        token_budget=4096,
        max_image_tokens=4,
        vit_patch=model.vit_patch,
        vae_patch=model.vae_patch,
        p_drop_text=0.0,
        p_drop_images=0.0,
    )
    batch = collate_plans([lower_sample(s, tok, cfg) for s in samples_from_dicts(data)], 4096)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(60):
        loss = combine_losses(model(batch).terms).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    questions = [[{"image": draw_shape("square", c)}, {"text": "What colour is it?"}] for c in colours]
    assert generate_text(model, tok, questions, max_new_tokens=8, max_image_tokens=4) == list(colours)


# ---- display -----------------------------------------------------------------------------------------------


def test_image_grid_upscales_and_wraps():
    imgs = [
        Image.new("RGB", (32, 32), (255, 0, 0)),
        Image.new("RGB", (32, 32), (0, 0, 255)),
        Image.new("RGB", (32, 32), (0, 255, 0)),
    ]
    caps = ["short", "a much longer caption that cannot possibly fit on one line under a small image", ""]
    grid = image_grid(imgs, caps, cols=2)
    one_line = image_grid(imgs, ["a", "b", "c"], cols=2)
    assert grid.width == one_line.width == 2 * 96 + 3 * 4
    assert grid.height > one_line.height > 2 * 96  # two rows; the long caption wraps onto several lines
    a = np.asarray(grid)
    assert tuple(a[4 + 50, 4 + 50]) == (255, 0, 0) and tuple(a[4 + 50, 8 + 96 + 50]) == (0, 0, 255)
    assert (a[4 + 96 : one_line.height // 2] < 128).any(), "caption text drawn under the first row"
    with pytest.raises(ValueError, match="captions"):
        image_grid(imgs, ["x"])
