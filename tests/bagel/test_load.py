"""A BAGEL folder as a working MogaoModel and back (`mogao.bagel.load`): every tensor used, BAGEL's own
definitions computed from the file's raw tensors, a training forward on every batch kind, and import -> export
byte for byte."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batch
from tiny_bagel import tiny_settings, write_tiny_bagel

from mogao.bagel import features, rules
from mogao.bagel.files import BagelFormatError
from mogao.bagel.folder import load_bagel_folder
from mogao.bagel.keymap import to_mogao_state
from mogao.bagel.load import load_bagel_model, save_bagel_model
from mogao.errors import ConfigError

WEIGHT_FILES = ("ema.safetensors", "ae.safetensors")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    return write_tiny_bagel(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")


@pytest.fixture(scope="module")
def ckpt(tiny):
    return load_bagel_folder(tiny.path, tiny_settings(tiny))


@pytest.fixture(scope="module")
def loaded(tiny):
    """The tiny folder as a float32 model (and its tokenizer)."""
    return load_bagel_model(tiny.path, dtype=torch.float32, settings=tiny_settings(tiny))


def test_the_folder_fills_every_tensor_of_the_model_and_uses_every_tensor_of_the_folder(tiny, ckpt):
    model, tok = load_bagel_model(tiny.path, settings=tiny_settings(tiny))
    cfg = model.cfg
    options = features.bagel_model_options(ckpt.arch)
    assert {k: getattr(cfg, k) for k in options} == options
    assert all(getattr(cfg, k) == v for k, v in features.mogao_model_settings(ckpt.arch).items())
    assert features.missing_features(cfg) == features.MISSING_FEATURES  # what remains: no option gives it
    converted = to_mogao_state(ckpt.ema, ckpt.ae, ckpt.arch, cfg)
    assert converted.unmapped == {}
    state = model.state_dict()
    assert state.keys() == converted.state.keys()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in converted.state.items())
    assert len(ckpt.ema) + len(ckpt.ae) == len(state)  # one model tensor for each tensor of the two files
    assert {str(p.dtype) for n, p in state.items() if not n.startswith("autoencoder.")} == {"torch.bfloat16"}
    assert not [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    assert model.latent_position_table.shape == (16, 32) and "latent_position_table" not in dict(model.named_parameters())
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    assert tok.convert_tokens_to_ids("<|vision_start|>") == rules.special_token_ids(tok).start_of_image


def test_the_model_computes_bagels_definitions_from_the_files_tensors(ckpt, loaded):
    """Timestep embedding, VAE token embedding with its table, ViT embedding with NaViT positions, connector
    and table, q/k norms: each recomputed from BAGEL's raw tensors in BAGEL's layouts."""
    model, _ = loaded
    ema = {k: v.float() for k, v in ckpt.ema.items()}
    a = ckpt.arch
    c, p, side = a.latent_channels, a.settings.latent_patch_size, a.settings.max_latent_size
    with torch.no_grad():
        t = torch.tensor([0.0, 0.3, 1.0])
        want = F.linear(F.silu(F.linear(rules.timestep_embedding(t), ema["time_embedder.mlp.0.weight"],
                                        ema["time_embedder.mlp.0.bias"])),
                        ema["time_embedder.mlp.2.weight"], ema["time_embedder.mlp.2.bias"])
        torch.testing.assert_close(model.time_embed(t), want)

        latent = torch.randn(c, 2 * p, 3 * p)  # a 2x3 token grid, BAGEL's tokens ordered (row, column, channel)
        bagel_tokens = torch.einsum("chpwq->hwpqc", latent.reshape(c, 2, p, 3, p)).reshape(6, -1)
        cells = rules.flattened_position_ids(2, 3, side)
        want = F.linear(bagel_tokens, ema["vae2llm.weight"], ema["vae2llm.bias"]) + ema["latent_pos_embed.pos_embed"][cells]
        pos = torch.stack((torch.zeros(6, dtype=torch.long), torch.arange(2).repeat_interleave(3), torch.arange(3).repeat(2)))
        from mogao.model.autoencoder import patchify

        torch.testing.assert_close(model.embed_latents(patchify(latent, p), pos), want)

        vp, vside = a.vit.patch_size, a.vit.positions_per_side
        image = torch.rand(3, 2 * vp, 3 * vp)  # smaller than the ViT's native grid: NaViT indexing, no resize
        x = (image - 0.5) / 0.5
        patches = torch.einsum("chpwq->hwpqc", x.reshape(3, 2, vp, 3, vp)).reshape(6, -1)
        vit = "vit_model.vision_model.embeddings."
        h = F.linear(patches, ema[vit + "patch_embedding.weight"], ema[vit + "patch_embedding.bias"])
        h = h + ema[vit + "position_embedding.weight"][rules.flattened_position_ids(2, 3, vside)]
        feats = model.vit.model.post_layernorm(model.vit.model.encoder(inputs_embeds=h[None]).last_hidden_state)[0]
        conn = F.linear(F.gelu(F.linear(feats, ema["connector.fc1.weight"], ema["connector.fc1.bias"]), approximate="tanh"),
                        ema["connector.fc2.weight"], ema["connector.fc2.bias"])
        want = conn + ema["vit_pos_embed.pos_embed"][rules.flattened_position_ids(2, 3, a.settings.vit_max_num_patch_per_side)]
        torch.testing.assert_close(model.embed_vit([image]), want)

        layer = model.backbone.layers[1]
        hidden = torch.randn(4, a.llm.hidden_size)
        for expert, sfx in ((layer.gen, "_moe_gen"), (layer.und, "")):
            q, k, _ = layer._qkv(expert, hidden)
            pre = "language_model.model.layers.1.self_attn."
            raw_q = F.linear(hidden, ema[f"{pre}q_proj{sfx}.weight"], ema[f"{pre}q_proj{sfx}.bias"]).view(4, -1, a.llm.head_dim)
            rms = raw_q.pow(2).mean(-1, keepdim=True).add(a.llm.rms_norm_eps).rsqrt()
            torch.testing.assert_close(q, raw_q * rms * ema[f"{pre}q_norm{sfx}.weight"])


def _batches(tok, model) -> dict:
    from mogao.data.shapes_mini import draw_shape

    img, img2 = draw_shape("circle", "red", (16, 16)), draw_shape("square", "blue", (16, 16))
    kinds = {"t2i": [{"text": "Draw a red cat."}, {"image": img, "generate": True}],
             "vqa": [{"image": img}, {"text": "What colour is the cat?", "loss": False}, {"text": "A red cat."}],
             "edit": [{"image": img}, {"text": "A blue square on the left."}, {"image": img2, "generate": True}],
             "text": [{"text": "Draw a red cat."}, {"text": "A blue square on the left."}]}
    return {k: make_batch(tok, [{"id": k, "segments": s}], vit_patch=model.vit_patch, vae_patch=model.vae_patch,
                          max_image_tokens=16) for k, s in kinds.items()}


def test_a_training_forward_on_every_batch_kind_trains_every_parameter(loaded):
    model, tok = loaded
    model.train()
    model.all_paths_in_training = True  # (as under data-parallel training)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if n.startswith("autoencoder.") or "position_table" in n]
    gen = [n for n in trainable if ".gen." in n or n.startswith(("time_embed.", "latent_proj."))]
    for kind, batch in _batches(tok, model).items():
        model.zero_grad(set_to_none=True)
        out = model(batch).terms
        assert torch.isfinite(out.text_sum) and torch.isfinite(out.image_sum)
        assert (out.image_weight > 0) == (kind in ("t2i", "edit"))
        (out.text_sum + out.image_sum).backward()
        grads = dict(model.named_parameters())
        missing = [n for n in trainable if grads[n].grad is None]
        assert not missing, (kind, missing[:5])
        assert all(torch.isfinite(grads[n].grad).all() for n in trainable), kind
        if kind in ("t2i", "edit"):  # BAGEL's weights are trained: the generation side learns at once
            assert all(grads[n].grad.any() for n in gen if "q_norm" in n or "time_embed" in n), kind
    model.zero_grad(set_to_none=True)


def test_import_then_export_is_byte_identical(tiny, tmp_path):
    model, tok = load_bagel_model(tiny.path, settings=tiny_settings(tiny))
    out = save_bagel_model(model, tok, tmp_path / "out")
    names = sorted(p.name for p in tiny.path.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (tiny.path / name).read_bytes(), name


def test_a_trained_model_saved_by_mogao_exports_as_a_bagel_folder(tiny, tmp_path):
    """Without the source folder (a model saved and loaded the mogao way), the configs and tokenizer files are
    made from the model; BAGEL's reader finds the model's tensors in BAGEL's layout."""
    from mogao.model.io import load_model

    model, tok = load_bagel_model(tiny.path, dtype=torch.float32, settings=tiny_settings(tiny))
    with torch.no_grad():
        model.backbone.layers[0].gen.self_attn.q_norm.weight.add_(0.5)
        model.latent_proj.proj_in.weight.mul_(2.0)
    model.save_pretrained(tmp_path / "mogao")
    again = load_model(tmp_path / "mogao")
    assert not hasattr(again, "bagel_source")
    out = save_bagel_model(again, tok, tmp_path / "bagel", dtype=torch.bfloat16)
    back, tok2 = load_bagel_model(out, settings=tiny_settings(tiny))
    assert tok2.get_vocab() == tok.get_vocab()
    mine = again.state_dict()
    theirs = back.state_dict()
    assert mine.keys() == theirs.keys()
    for k, v in mine.items():
        want = v if k.startswith("autoencoder.") else v.to(torch.bfloat16)
        assert theirs[k].dtype == want.dtype and torch.equal(theirs[k], want), k


def test_models_and_folders_that_are_not_bagels_are_refused(tiny, tmp_path, tiny_parts):
    from mogao.bagel.configs import BagelSettings
    from mogao.model.config import ModelConfig
    from mogao.model.io import load_model

    plain = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder=tiny_parts["vae"]))
    with pytest.raises(ConfigError, match=r"lacks BAGEL's qk_norm \(qk_norm\); timestep_embedding"):
        save_bagel_model(plain, tiny_parts["tokenizer"], tmp_path / "x")
    assert not (tmp_path / "x").exists()
    wide = BagelSettings(**{**vars(tiny_settings(tiny)), "vit_max_num_patch_per_side": 5})
    with pytest.raises(BagelFormatError, match="vit_pos_embed.pos_embed"):  # the folder's table has side 4
        load_bagel_model(tiny.path, settings=wide)


def test_random_bagel_model_has_the_loaded_models_tensors_and_a_reproducible_init(tiny, ckpt):
    """`random_bagel_model` (the GPU check measures BAGEL-7B-MoT with it) builds the tensors a folder's model has,
    in the dtypes the files give, without reading a weight: norms 1, biases 0, the rest drawn at 1/sqrt(fan-in)."""
    from dataclasses import replace

    from mogao.bagel.load import random_bagel_model
    from mogao.model.autoencoder import sincos_position_table

    model, _ = load_bagel_model(tiny.path, settings=tiny_settings(tiny))
    a = random_bagel_model(ckpt.arch, seed=3)
    want, got = model.state_dict(), a.state_dict()
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in want.items()}
    assert a.cfg == replace(model.cfg, llm="-", vit="-", autoencoder="-")  # (the folder's paths aside)
    assert not any(t.is_meta for t in got.values())
    layer = a.backbone.layers[0].gen
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not layer.self_attn.q_proj.bias.any()
    w = layer.mlp.down_proj.weight.float()  # (hidden, intermediate): fan-in 48
    assert abs(w.std().item() * w.shape[1] ** 0.5 - 1) < 0.1 and abs(w.mean().item()) < 0.05
    again, other = random_bagel_model(ckpt.arch, seed=3), random_bagel_model(ckpt.arch, seed=4)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in got.items())
    assert not torch.equal(got["backbone.embed_tokens.weight"], other.state_dict()["backbone.embed_tokens.weight"])
    table = sincos_position_table(ckpt.arch.settings.max_latent_size, ckpt.arch.llm.hidden_size)
    assert torch.equal(a.latent_position_table, table.to(torch.bfloat16))  # BAGEL's table, in the files' dtype
