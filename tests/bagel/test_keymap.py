"""Where BAGEL's tensors go in a MogaoModel (`mogao.bagel.keymap`, `features`): every tensor accounted for, the
names and shapes those of a real (meta-device) MogaoModel, and the transforms exact."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_bagel import tiny_settings, write_tiny_bagel

from mogao.bagel import features, keymap
from mogao.bagel.folder import check_bagel_folder, load_bagel_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_bagel(tmp_path_factory.mktemp("bagel") / "BAGEL-tiny")


@pytest.fixture(scope="module")
def ckpt(tiny):
    return load_bagel_folder(tiny.path, tiny_settings(tiny))


def _mogao_model(arch, llm_config=None):
    """A meta-device MogaoModel of the architecture `mogao_*_config` and `mogao_model_settings` describe."""
    from mogao.model.config import ModelConfig, architecture_record
    from mogao.model.io import load_model

    cfg = ModelConfig(llm="bagel-llm", vit="bagel-vit", autoencoder="bagel-ae", **features.mogao_model_settings(arch))
    record = architecture_record(cfg, llm_config or arch.mogao_llm_config(), arch.mogao_vit_config(),
                                 arch.mogao_autoencoder_config())
    return load_model(record, meta=True)


def test_every_tensor_of_both_files_has_exactly_one_mapping(tiny, ckpt):
    info = check_bagel_folder(tiny.path, tiny_settings(tiny))
    maps = keymap.key_mappings(ckpt.arch)
    assert [m.bagel for m in maps if m.file == keymap.EMA_FILE] == list(keymap.expected_ema_shapes(ckpt.arch))
    assert {m.bagel for m in maps if m.file == keymap.EMA_FILE} == set(info.ema)
    assert {m.bagel for m in maps if m.file == keymap.AE_FILE} == set(info.ae)
    targets = [m.mogao for m in maps if m.mogao is not None]
    assert len(targets) == len(set(targets))  # no two BAGEL tensors land on one parameter


def test_mapped_tensors_land_on_mogao_parameters_of_their_shape(ckpt):
    model_state = _mogao_model(ckpt.arch).state_dict()
    converted = keymap.to_mogao_state(ckpt.ema, ckpt.ae, ckpt.arch)
    wrong = {k: (tuple(v.shape), tuple(model_state[k].shape) if k in model_state else None)
             for k, v in converted.state.items() if k not in model_state or model_state[k].shape != v.shape}
    assert wrong == {}
    # what the model has and BAGEL does not fill: only the timestep embedders (feature timestep_embedding)
    left = sorted(set(model_state) - set(converted.state))
    assert left and all(k.startswith(("time_embed.", "additive_time.")) for k in left), left
    assert sorted(converted.unmapped) == sorted(m.bagel for m in keymap.key_mappings(ckpt.arch) if m.mogao is None)


def test_unmapped_tensors_name_a_missing_feature_that_lists_them(ckpt):
    by_name = {f.name: f for f in features.missing_features()}
    assert len(by_name) == len(features.missing_features())
    for m in keymap.key_mappings(ckpt.arch):
        if m.mogao is None or m.feature is not None:
            f = by_name[m.feature]  # KeyError: a feature nobody describes
            patterns = [re.escape(p).replace(re.escape("{N}"), r"\d+") for p in f.bagel_keys]
            assert any(re.fullmatch(p, m.bagel) for p in patterns), (m.bagel, f.name)
    unmapped = {m.bagel for m in keymap.key_mappings(ckpt.arch) if m.mogao is None}
    assert {m.feature for m in keymap.key_mappings(ckpt.arch) if m.bagel in unmapped} == {
        "qk_norm", "timestep_embedding", "latent_position_table", "vit_position_table"}


def test_proposed_places_exist_once_the_feature_does(ckpt):
    """q/k norms: a Qwen3-architecture LLM (q_norm/k_norm, q/k/v biases via attention_bias) gives MogaoModel
    the parameters the mapping proposes; the timestep MLP matches `time_embed`'s shapes."""
    arch = ckpt.arch
    qwen3 = {**arch.mogao_llm_config(), "model_type": "qwen3", "head_dim": arch.llm.head_dim, "attention_bias": True}
    model_state = _mogao_model(arch, qwen3).state_dict()
    proposed = [m for m in keymap.key_mappings(arch) if m.proposed is not None]
    assert len(proposed) == 4 * arch.llm.num_layers + 4  # 4 q/k norms a layer, the 4 timestep MLP tensors
    for m in proposed:
        assert m.proposed in model_state, m
        assert tuple(model_state[m.proposed].shape) == tuple(ckpt.ema[m.bagel].shape), m
    # the only parameters such an LLM adds beyond BAGEL's: o_proj biases (to be held at zero)
    extra = {k for k in model_state if k.endswith("o_proj.bias")}
    assert len(extra) == 2 * arch.llm.num_layers


def test_the_patch_embedding_transform_computes_bagels_linear_embedding():
    c, p, out = 3, 4, 5
    w_lin, bias = torch.randn(out, p * p * c, dtype=torch.float64), torch.randn(out, dtype=torch.float64)
    image = torch.randn(c, 2 * p, 3 * p, dtype=torch.float64)
    # BAGEL: patchify (c, h, w) into (cells, p*p*c) ordered (row, column, channel), then the Linear
    patches = torch.einsum("chpwq->hwpqc", image.reshape(c, 2, p, 3, p)).reshape(-1, p * p * c)
    bagel = patches @ w_lin.T + bias
    conv = torch.nn.functional.conv2d(image[None], keymap.patch_linear_to_conv(w_lin, c, p), bias, stride=p)
    assert torch.allclose(conv[0].flatten(1).T, bagel)  # conv output (out, 2, 3) in row-major cells
    assert torch.equal(keymap.patch_conv_to_linear(keymap.patch_linear_to_conv(w_lin, c, p)), w_lin)


def test_the_latent_token_permutation_makes_mogao_patchify_compute_bagels_projections(ckpt):
    from mogao.model.autoencoder import patchify, unpatchify

    arch = ckpt.arch
    c, p, h = arch.latent_channels, arch.settings.latent_patch_size, arch.llm.hidden_size
    maps = {m.bagel: m for m in keymap.key_mappings(arch)}
    w_in, b_in = ckpt.ema["vae2llm.weight"].double(), ckpt.ema["vae2llm.bias"].double()
    w_out, b_out = ckpt.ema["llm2vae.weight"].double(), ckpt.ema["llm2vae.bias"].double()
    latent = torch.randn(c, 2 * p, 3 * p, dtype=torch.float64)
    bagel_tokens = torch.einsum("chpwq->hwpqc", latent.reshape(c, 2, p, 3, p)).reshape(-1, p * p * c)
    ours_in = keymap.to_mogao_tensor(maps["vae2llm.weight"], w_in, arch)
    assert torch.allclose(patchify(latent, p) @ ours_in.T + b_in, bagel_tokens @ w_in.T + b_in)
    hidden = torch.randn(6, h, dtype=torch.float64)
    bagel_out = hidden @ w_out.T + b_out  # BAGEL's tokens back to a latent: (h, w, p, q, c) -> (c, h*p, w*p)
    bagel_latent = torch.einsum("hwpqc->chpwq", bagel_out.reshape(2, 3, p, p, c)).reshape(c, 2 * p, 3 * p)
    ours_w = keymap.to_mogao_tensor(maps["llm2vae.weight"], w_out, arch)
    ours_b = keymap.to_mogao_tensor(maps["llm2vae.bias"], b_out, arch)
    assert torch.allclose(unpatchify(hidden @ ours_w.T + ours_b, (2, 3), p, c), bagel_latent)


def test_model_settings_and_configs_fit_the_existing_model_config(ckpt):
    from dataclasses import fields

    from mogao.model.config import ModelConfig

    assert set(features.mogao_model_settings(ckpt.arch)) <= {f.name for f in fields(ModelConfig)}
    vit = ckpt.arch.mogao_vit_config()
    assert vit["num_hidden_layers"] == ckpt.arch.vit.config_layers - 1 and vit["vision_use_head"] is False
    for f in features.missing_features():
        assert f.what and f.where and f.source
