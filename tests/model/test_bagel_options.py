"""The model options a BAGEL checkpoint needs - `ModelConfig.qk_norm`, `timestep_embedding`, `latent_position_table`,
`vit_position_table`, `vit_positions`, `vae_sample_posterior` - each against its written definition on small cases
worked out by hand; their defaults leave the model as it was; all of them together keep every path trainable."""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch

from mogao.bagel import rules
from mogao.errors import ConfigError, DataError
from mogao.model.autoencoder import patchify, posterior_generator, sincos_position_table
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import SequenceInputs

# tiny_parts: a Qwen2 LLM of width 64 (4 heads of 16, 2 KV heads, 2 layers), a SigLIP of patch 4 on a 32-pixel
# native image (an 8x8 position grid), an AutoencoderKL of downsample 2 with 4 latent channels
ALL = dict(qk_norm=True, timestep_conditioning="additive", timestep_embedding="bagel", latent_position_table=8,
           latent_position_embedding=False, vit_position_table=8, vit_positions="navit", vae_sample_posterior=True)
NEW_FIELDS = ("qk_norm", "timestep_embedding", "latent_position_table", "vit_position_table", "vit_positions",
              "vae_sample_posterior")


def _model(parts, **kw):
    torch.manual_seed(0)
    return load_model(ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder=parts["vae"], latent_patch=2, **kw))


@pytest.fixture(scope="module")
def base(tiny_parts, one_thread):
    return _model(tiny_parts)


def _samples():
    from mogao.data.shapes_mini import draw_shape

    img, img2 = draw_shape("circle", "red", (16, 16)), draw_shape("square", "blue", (16, 16))
    return {"t2i": [{"text": "Draw a red circle."}, {"image": img, "generate": True}],
            "vqa": [{"image": img}, {"text": "What is it?", "loss": False}, {"text": "A red circle."}],
            "edit": [{"image": img}, {"text": "Make it a blue square."}, {"image": img2, "generate": True}],
            "text": [{"text": "Draw a red circle."}, {"text": "A blue square."}]}


# ---- defaults --------------------------------------------------------------------------------------------------


def test_defaults_leave_the_model_as_it_was(tiny_parts, base):
    """A config without the new fields (a model saved before them) is the default config, and a default model
    has none of the options' tensors and runs each path the way it did: `time_embed` on 1000·σ, the ViT
    interpolating its positions, the VAE's posterior mean."""
    d = ModelConfig(llm="l", vit="v").to_dict()
    old = {k: v for k, v in d.items() if k not in NEW_FIELDS}
    assert ModelConfig.from_dict(old) == ModelConfig(llm="l", vit="v")
    assert {k: d[k] for k in NEW_FIELDS} == {"qk_norm": False, "timestep_embedding": "mogao",
                                              "latent_position_table": None, "vit_position_table": None,
                                              "vit_positions": "interpolate", "vae_sample_posterior": False}
    names = set(base.state_dict())
    assert not [n for n in names if "q_norm" in n or "k_norm" in n or "position_table" in n]
    assert base.time_embed.scale == 1000.0 and base.vit.positions == "interpolate"
    assert base.autoencoder.sample_posterior is False and base.additive_time is None
    # additive conditioning keeps its own, zero-initialised embedder next to `time_embed`
    additive = _model(tiny_parts, timestep_conditioning="additive")
    assert additive.additive_time is not None and set(additive.state_dict()) > {"time_embed.mlp.linear_1.weight"}


def test_zero_tables_compute_exactly_the_path_without_them(tiny_parts, shapes_dicts):
    """The position-table options add their table and nothing else: with the tables at zero, the loss terms and
    every gradient are those of the model without them (the same random draws build both)."""
    plain = _model(tiny_parts, latent_position_embedding=False)
    tabled = _model(tiny_parts, latent_position_embedding=False, latent_position_table=8, vit_position_table=8)
    with torch.no_grad():
        tabled.latent_position_table.zero_()
        tabled.vit_position_table.zero_()
    params = dict(tabled.named_parameters())
    assert params.keys() == dict(plain.named_parameters()).keys()
    assert all(torch.equal(p, params[n]) for n, p in plain.named_parameters())
    batch = make_batch(tiny_parts["tokenizer"], shapes_dicts, vae_patch=plain.vae_patch)
    terms = []
    for m in (plain, tabled):
        out = m(batch).terms
        (out.text_sum + out.image_sum).backward()
        terms.append((out.text_sum.detach(), out.image_sum.detach()))
    assert terms[0] == terms[1]
    grads = dict(tabled.named_parameters())
    assert all((p.grad is None) == (grads[n].grad is None) and (p.grad is None or torch.equal(p.grad, grads[n].grad))
               for n, p in plain.named_parameters())


# ---- qk_norm ---------------------------------------------------------------------------------------------------


def test_qk_norm_is_a_per_head_rmsnorm_of_queries_and_keys_in_each_expert(tiny_parts):
    model = _model(tiny_parts, qk_norm=True)
    params = dict(model.named_parameters())
    for i in range(2):
        for expert in ("und", "gen"):
            for norm in ("q_norm", "k_norm"):
                w = params[f"backbone.layers.{i}.{expert}.self_attn.{norm}.weight"]
                assert w.shape == (16,) and torch.equal(w, torch.ones(16))
    layer = model.backbone.layers[0]
    attn = layer.und.self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None  # Qwen2's attention, q/k norms added
    assert layer.gen.self_attn.q_norm is not attn.q_norm  # each expert its own
    with torch.no_grad():
        attn.q_norm.weight.fill_(2.0)
        layer.gen.self_attn.k_norm.weight.fill_(3.0)
        h = torch.randn(5, 64)
        q, k, v = layer._qkv(layer.und, h)
        raw_q = attn.q_proj(h).view(5, 4, 16)
        eps = attn.q_norm.variance_epsilon
        torch.testing.assert_close(q, 2.0 * raw_q / torch.sqrt(raw_q.pow(2).mean(-1, keepdim=True) + eps))
        torch.testing.assert_close(v, attn.v_proj(h).view(5, 2, 16))  # values are not normalised
        _, k_gen, _ = layer._qkv(layer.gen, h)
        assert k_gen.shape == (5, 2, 16)
        torch.testing.assert_close(k_gen.pow(2).mean(-1).sqrt(), torch.full((5, 2), 3.0), atol=1e-4, rtol=0)


def test_qk_norm_is_refused_for_an_llm_that_has_them():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from mogao.model.backbone import add_qk_norms

    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(ConfigError, match="qk_norm: layer 0 .* has q/k norms already"):
        add_qk_norms(llm.model.layers, 1e-6)


# ---- timestep embedding ----------------------------------------------------------------------------------------


def test_bagel_timestep_embedding_embeds_t_itself_and_is_added_to_every_vae_token(tiny_parts):
    from mogao.training.parts import part_parameters

    model = _model(tiny_parts, timestep_conditioning="additive", timestep_embedding="bagel")
    assert model.additive_time is None and model.time_embed.scale == 1.0
    t = torch.tensor([0.0, 0.25, 1.0])
    feats = rules.timestep_embedding(t)  # BAGEL's sinusoid: cos before sin, t unscaled
    assert torch.equal(feats[0], torch.cat((torch.ones(128), torch.zeros(128))))
    f1 = math.exp(-math.log(10000.0) / 128)  # the second frequency
    assert feats[1, 1].item() == pytest.approx(math.cos(0.25 * f1)) and feats[1, 129].item() == pytest.approx(
        math.sin(0.25 * f1))
    mlp = model.time_embed.mlp
    with torch.no_grad():
        torch.testing.assert_close(model.time_embed(t), mlp.linear_2(F.silu(mlp.linear_1(feats))))
    # embed_inputs: 2 text rows, 3 clean VAE rows (t = 0), 2 noisy rows of targets at 0.3 and 0.8
    n_und, ids = 2, torch.tensor([5, 7, 0, 0, 0, 0, 0])
    clean, noisy = torch.randn(3, model.token_dim), torch.randn(2, model.token_dim)
    pos = torch.zeros(3, 7, dtype=torch.long)
    sigmas = torch.tensor([0.3, 0.8])
    inputs = SequenceInputs(ids, pos, n_und, clean_tokens=clean, clean_index=torch.tensor([2, 3, 4]),
                            noisy_tokens=noisy, noisy_index=torch.tensor([5, 6]), noisy_target=torch.tensor([0, 1]),
                            sigmas=sigmas)
    with torch.no_grad():
        x, mod = model.embed_inputs(inputs)
        assert mod is None
        torch.testing.assert_close(x[:2], model.backbone.embed_tokens(ids[:2]))
        torch.testing.assert_close(x[2:5], model.embed_latents(clean, pos[:, 2:5]) + model.time_embed(torch.zeros(1)))
        torch.testing.assert_close(x[5:], model.embed_latents(noisy, pos[:, 5:]) + model.time_embed(sigmas))
    assert any(k.startswith("time_embed.") for k in part_parameters(model)["gen"])  # it trains with the expert
    with pytest.raises(ConfigError, match="timestep_embedding 'bagel' .* needs timestep_conditioning 'additive'"):
        _model(tiny_parts, timestep_embedding="bagel")


# ---- position tables -------------------------------------------------------------------------------------------


def test_latent_position_table_adds_row_row_times_side_plus_column(tiny_parts):
    model = _model(tiny_parts, latent_position_table=4, latent_position_embedding=False)
    table = model.latent_position_table
    assert "latent_position_table" in model.state_dict() and "latent_position_table" not in dict(model.named_parameters())
    assert table.shape == (16, 64) and not table.requires_grad
    # BAGEL's sin-cos code: row r * 4 + c = [sin(c w), cos(c w), sin(r w), cos(r w)], w_k = 10000^(-k/16)
    w = 10000.0 ** (-torch.arange(16, dtype=torch.float64) / 16)
    r, c = 1, 2
    want = torch.cat(((c * w).sin(), (c * w).cos(), (r * w).sin(), (r * w).cos())).float()
    torch.testing.assert_close(table[r * 4 + c], want)
    assert torch.equal(table, rules.sincos_position_table(4, 64)) and torch.equal(table, sincos_position_table(4, 64))
    with torch.no_grad():
        table.copy_(torch.arange(16.0)[:, None].expand(16, 64))  # row i holds i
        tokens = torch.randn(3, model.token_dim)
        pos = torch.tensor([[9, 9, 9], [0, 1, 3], [2, 0, 3]])  # (T, H, W): cells (0, 2), (1, 0), (3, 3)
        added = model.embed_latents(tokens, pos) - model.latent_proj.proj_in(tokens)
    torch.testing.assert_close(added, torch.tensor([2.0, 4.0, 15.0])[:, None].expand(3, 64))
    with pytest.raises(DataError, match="beyond the 4x4 position table"):
        model.embed_latents(tokens[:1], torch.tensor([[0], [4], [0]]))
    with pytest.raises(ConfigError, match="latent_position_table replaces latent_position_embedding"):
        _model(tiny_parts, latent_position_table=4)


def test_vit_position_table_adds_its_rows_to_the_connector_output(tiny_parts):
    model = _model(tiny_parts, vit_position_table=8)
    assert model.vit_position_table.shape == (64, 64) and not model.vit_position_table.requires_grad
    with torch.no_grad():
        model.vit_position_table.copy_(torch.arange(64.0)[:, None].expand(64, 64))
        pixels = [torch.rand(3, 8, 12), torch.rand(3, 4, 4)]  # token grids 2x3 and 1x1
        added = model.embed_vit(pixels) - model.connector(torch.cat(model.vit(pixels)))
    torch.testing.assert_close(added[:, 0], torch.tensor([0.0, 1, 2, 8, 9, 10, 0]))


def test_navit_positions_take_the_top_left_of_the_vit_table(tiny_parts):
    model = _model(tiny_parts, vit_positions="navit")
    vit = model.vit
    assert vit.positions == "navit" and vit.native_grid == (8, 8)
    with torch.no_grad():
        full = torch.rand(3, 32, 32)  # the native grid: the table itself, as HF's own forward uses it
        navit = vit([full])[0]
        vit.positions = "interpolate"
        torch.testing.assert_close(navit, vit([full])[0], rtol=0, atol=0)
        small = torch.rand(3, 8, 12)  # grid 2x3: table rows 0, 1, 2, 8, 9, 10
        interpolated = vit([small])[0]
        vit.positions = "navit"
        got = vit([small])[0]
        emb = vit.model.embeddings
        x = emb.patch_embedding(((small - 0.5) / 0.5)[None]).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding.weight[torch.tensor([0, 1, 2, 8, 9, 10])]
        want = vit.model.post_layernorm(vit.model.encoder(inputs_embeds=x).last_hidden_state)[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, interpolated)
    with pytest.raises(DataError, match="9x1 ViT token grid does not fit the ViT's 8x8 position table"):
        vit([torch.rand(3, 36, 4)])
    with pytest.raises(ConfigError, match="vit_positions must be one of interpolate, navit"):
        _model(tiny_parts, vit_positions="rope")


# ---- posterior sample ------------------------------------------------------------------------------------------


def test_vae_sample_posterior_draws_from_each_images_own_seed(tiny_parts, base):
    model = _model(tiny_parts, vae_sample_posterior=True)
    ae = model.autoencoder
    assert ae.sample_posterior
    img, other = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    a = model.image_tokens([img], seeds=[5])[0]
    b = model.image_tokens([other, img], seeds=[9, 5])[1]
    torch.testing.assert_close(a, b)  # the draw follows the image's seed, not the batch it is encoded in
    with torch.no_grad():
        post = ae.vae.encode(img[None] * 2 - 1).latent_dist
        eps = torch.randn((4, 4, 4), generator=posterior_generator(5))
        want = patchify(ae.normalise(post.mean + post.std * eps)[0], 2)
        mean = patchify(ae.normalise(post.mode())[0], 2)
    torch.testing.assert_close(a, want)
    assert not torch.allclose(a, mean) and not torch.allclose(a, model.image_tokens([img], seeds=[6])[0])
    torch.testing.assert_close(base.image_tokens([img])[0], mean)  # the default: the posterior mean
    with pytest.raises(ConfigError, match="vae_sample_posterior needs a diffusers VAE"):
        _model({**tiny_parts, "vae": "pixel"}, vae_sample_posterior=True)


# ---- all together ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t2i", "vqa", "edit", "text"])
def test_every_option_together_keeps_every_trainable_parameter_in_the_graph(tiny_parts, kind):
    from mogao.training.parts import part_parameters

    model = _model(tiny_parts, **ALL).train()
    model.all_paths_in_training = True  # (as under data-parallel training)
    covered = {n for part in part_parameters(model).values() for n in part}
    assert covered == {n for n, _ in model.named_parameters() if not n.startswith("autoencoder.")}
    assert not [n for n, p in model.named_parameters() if "position_table" in n or (p.requires_grad and
                                                                                   n.startswith("autoencoder."))]
    batch = make_batch(tiny_parts["tokenizer"], [{"id": kind, "segments": _samples()[kind]}],
                       vae_patch=model.vae_patch, max_image_tokens=16)
    out = model(batch).terms
    loss = out.text_sum + out.image_sum
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    again = model(batch).terms  # the posterior draw and the noise follow the image seeds: the same loss
    assert torch.equal(again.image_sum, out.image_sum)


def test_options_and_tables_survive_save_and_load(tiny_parts, tmp_path):
    model = _model(tiny_parts, **ALL)
    with torch.no_grad():
        model.latent_position_table.mul_(2.0)  # a table that is not the initial one: it must come from the file
    model.save_pretrained(tmp_path / "m")
    again = load_model(tmp_path / "m")
    assert asdict(again.cfg) == asdict(model.cfg)
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert again.vit.positions == "navit" and again.autoencoder.sample_posterior and again.time_embed.scale == 1.0
