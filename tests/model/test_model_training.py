"""A full training step of the whole model (ViT + VAE + MoT backbone) on a packed interleaved batch."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel
from mogao.training.objectives import combine_losses


def _model(parts, **kw) -> MogaoModel:
    torch.manual_seed(0)
    cfg = ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder=parts["vae"], latent_patch=2, **kw)
    return load_model(cfg)


def test_training_step_reaches_every_trainable_part(tiny_parts, shapes_dicts):
    model = _model(tiny_parts)
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts)
    assert batch.image_is_target.any() and (~batch.image_is_target).any()
    out = model(batch)
    total = combine_losses(out.terms)
    assert torch.isfinite(total.loss) and total.text_loss > 0 and total.image_loss > 0
    total.loss.backward()
    # the velocity out-projection is zero-initialised: at step 1 only it gets gradient on the image side
    assert model.latent_proj.proj_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.backbone.layers[0].gen.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    combine_losses(model(batch).terms).loss.backward()

    def grad_norm(params) -> float:
        return sum(float(p.grad.norm()) for p in params if p.grad is not None)

    layer = model.backbone.layers[0]
    assert grad_norm(layer.und.parameters()) > 0, "understanding expert"
    assert grad_norm(layer.gen.parameters()) > 0, "generation expert"
    assert grad_norm(model.connector.parameters()) > 0, "ViT connector"
    assert grad_norm(model.vit.parameters()) > 0, "ViT"
    assert grad_norm(model.latent_proj.proj_in.parameters()) > 0, "VAE in-projection"
    assert grad_norm(model.latent_proj.proj_out.parameters()) > 0, "VAE out-projection"
    assert grad_norm(model.time_embed.parameters()) + grad_norm(layer.gen_adaln.parameters()) > 0, "timestep"
    assert all(p.grad is None for p in model.autoencoder.parameters()), "the VAE is frozen"


def test_loss_goes_down_on_a_fixed_batch(tiny_parts, shapes_dicts):
    model = _model(tiny_parts)
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    history = []
    for _ in range(50):
        total = combine_losses(model(batch).terms)
        opt.zero_grad()
        total.loss.backward()
        opt.step()
        history.append((float(total.text_loss), float(total.image_loss)))
    (t0, i0), (t1, i1) = history[0], history[-1]
    assert t1 < 0.5 * t0, history
    assert i1 < 0.8 * i0, history


@pytest.mark.parametrize("text_sees_vae", [False, True])
def test_flash_varlen_model_matches_sdpa_dense_fp64(tiny_parts, shapes_dicts, text_sees_vae):
    """The whole model (not only one attention call) gives the same losses and gradients on both backends."""
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts)
    results = []
    for backend in ("sdpa_dense", "flash_varlen"):
        model = _model(tiny_parts, attention=backend, text_sees_vae=text_sees_vae).double()
        with torch.no_grad():  # give the zero-initialised out-projection weights so its gradient path is real
            torch.manual_seed(1)
            model.latent_proj.proj_out.weight.normal_(0, 0.02)
        b = batch.to("cpu")
        b.vit_pixels = [p.double() for p in b.vit_pixels]
        b.vae_pixels = [p.double() for p in b.vae_pixels]
        total = combine_losses(model(b).terms)
        total.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((total.loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert abs(float(l0 - l1)) < 1e-10
    assert g0.keys() == g1.keys()
    for n in g0:
        assert (g0[n] - g1[n]).abs().max() < 1e-9, n


def test_save_load_round_trip_keeps_outputs(tiny_parts, shapes_dicts, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(tiny_parts).eval()
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts)
    with torch.no_grad():
        before = model(batch, return_logits=True)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt").eval()
    with torch.no_grad():
        after = loaded(batch, return_logits=True)
    assert torch.equal(before.text_logits, after.text_logits)
    assert torch.equal(before.velocity, after.velocity)
    # text-only parity with the source HF model survives the round trip
    hf = AutoModelForCausalLM.from_pretrained(tiny_parts["llm"]).eval()
    ids = torch.tensor([[5, 17, 33, 2, 9, 41]])
    from mogao.sequence.layout import Span, TokenLayout
    from mogao.sequence.modality import Modality

    layout = TokenLayout.from_spans([[Span(Modality.TEXT, 6)]])
    pos = torch.arange(6).expand(3, 6)
    with torch.no_grad():
        h, _ = loaded.backbone(loaded.backbone.embed_tokens(ids[0]), pos, 6, loaded.attention,
                               loaded.attention.prepare(layout, False))
        diff = (loaded.backbone.lm_head(h) - hf(input_ids=ids).logits[0]).abs().max()
    assert diff <= 1e-5


def test_missing_checkpoint_directory_is_a_clear_error(tmp_path):
    from mogao.errors import ConfigError

    with pytest.raises(ConfigError, match="LLM checkpoint directory not found: '.*nope'"):
        load_model(ModelConfig(llm=str(tmp_path / "nope"), vit=str(tmp_path)))


def test_additive_timestep_and_pixel_autoencoder_options(tiny_parts, shapes_dicts):
    torch.manual_seed(0)
    cfg = ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder="pixel", latent_patch=4,
                      timestep_conditioning="additive")
    model = load_model(cfg)
    assert model.vae_patch == 4 and model.token_dim == 3 * 16
    assert all(layer.gen_adaln is None for layer in model.backbone.layers)
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts, vae_patch=model.vae_patch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # the second step sees non-zero out-projection and additive-embedding weights
        opt.zero_grad()
        combine_losses(model(batch).terms).loss.backward()
        opt.step()
    assert sum(float(p.grad.abs().sum()) for p in model.additive_time.parameters()) > 0
    assert sum(float(p.grad.abs().sum()) for p in model.backbone.layers[0].gen.parameters()) > 0


def test_additive_timestep_adds_each_noisy_tokens_own_sigma(tiny_parts):
    """With additive conditioning a noisy token's input gains the embedding of its own target's σ (and clean
    VAE tokens that of σ = 0); AdaLN's σ embedding is not used, and trains in no part."""
    from mogao.model.mogao import SequenceInputs
    from mogao.training.parts import part_parameters

    torch.manual_seed(0)
    cfg = ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder="pixel", latent_patch=4,
                      timestep_conditioning="additive")
    model = load_model(cfg)
    torch.nn.init.normal_(model.additive_time.embedder.mlp.linear_2.weight)  # no longer the no-op it starts as
    n_und, n_noisy = 3, 4
    sigmas = torch.tensor([0.2, 0.9])
    inputs = SequenceInputs(input_ids=torch.zeros(n_und + n_noisy, dtype=torch.long),
                            position_ids=torch.zeros(3, n_und + n_noisy, dtype=torch.long), n_und=n_und,
                            noisy_tokens=torch.zeros(n_noisy, model.token_dim),
                            noisy_index=torch.arange(n_und, n_und + n_noisy), noisy_target=torch.tensor([0, 0, 1, 1]),
                            sigmas=sigmas)
    with torch.no_grad():
        x, mod = model.embed_inputs(inputs)
        plain = model.embed_latents(inputs.noisy_tokens, inputs.position_ids[:, n_und:])
        want = plain + model.additive_time(sigmas)[inputs.noisy_target]
    assert mod is None
    torch.testing.assert_close(x[n_und:], want)
    assert not torch.allclose(x[n_und], x[n_und + 2])  # two σ, two embeddings
    gen = part_parameters(model)["gen"]
    assert not any(k.startswith("time_embed.") for k in gen) and any(k.startswith("additive_time.") for k in gen)


def test_unknown_timestep_conditioning_is_refused(tiny_parts):
    from mogao.errors import ConfigError

    with pytest.raises(ConfigError, match="timestep_conditioning must be 'adaln' or 'additive'"):
        load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], timestep_conditioning="x"))


def test_unknown_attention_backend_is_refused(tiny_parts):
    from mogao.errors import ConfigError

    with pytest.raises(ConfigError, match="sdpa_dense"):
        load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], attention="nope"))


def test_x0_prediction_trains_on_the_mse_of_the_clean_tokens(tiny_parts, shapes_dicts):
    """With `prediction: x0` the head outputs x̂₀; the loss is the MSE of x̂₀ against x₀ (the flow loss with both
    velocities scaled by σ), so at init (zero head: x̂₀ = 0) it is the mean square of the targets' tokens."""
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts)
    plain = _model(tiny_parts, prediction="x0", min_sigma_x0=1e-6)(batch).terms
    x0 = torch.cat([t for t, target in zip(_model(tiny_parts).image_tokens(batch.vae_pixels), batch.image_is_target)
                    if target])
    got = (plain.image_sum / plain.image_weight).detach()
    assert float(got) == pytest.approx(float(x0.square().mean()), rel=1e-4)
    velocity = _model(tiny_parts)(batch).terms  # the same seeded draw, v-prediction: |ε − x₀|²
    assert float((velocity.image_sum / velocity.image_weight).detach()) > 1.5 * float(x0.square().mean())
