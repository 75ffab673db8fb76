"""SigLIP vision encoder: loading through `from_pretrained`, variable-size batching, connector shapes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from mogao.errors import ConfigError, DataError
from mogao.model.tiny import save_tiny_vit
from mogao.model.vision import MLPConnector, VisionEncoder


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return save_tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.mark.parametrize("patch", [4, 8])
def test_shapes_for_mixed_sizes(tmp_path, patch):
    enc = VisionEncoder.from_pretrained(save_tiny_vit(tmp_path, patch_size=patch)).eval()
    assert enc.patch_size == patch and enc.hidden_size == 32
    grids = [(4, 4), (2, 3), (4, 4), (1, 5)]
    g = torch.Generator().manual_seed(0)
    pixels = [torch.rand(3, gh * patch, gw * patch, generator=g) for gh, gw in grids]
    out = enc(pixels)
    assert [tuple(o.shape) for o in out] == [(gh * gw, 32) for gh, gw in grids]


def test_batched_by_size_equals_one_by_one(vit_dir):
    enc = VisionEncoder.from_pretrained(vit_dir).eval()
    g = torch.Generator().manual_seed(1)
    pixels = [torch.rand(3, h, w, generator=g) for h, w in [(32, 32), (16, 24), (32, 32), (16, 24), (8, 8)]]
    together = enc(pixels)
    for img, feats in zip(pixels, together):
        torch.testing.assert_close(feats, enc([img])[0], atol=1e-5, rtol=1e-5)


def test_matches_hf_model_with_processor_normalisation(vit_dir):
    """At the native size the features are the HF model's last_hidden_state on (x - 0.5) / 0.5."""
    enc = VisionEncoder.from_pretrained(vit_dir).eval()
    hf = SiglipVisionModel.from_pretrained(vit_dir).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = hf(pixel_values=(x - 0.5) / 0.5).last_hidden_state
    torch.testing.assert_close(torch.stack(enc(list(x))), ref, atol=1e-5, rtol=1e-5)


def test_interpolation_only_for_non_native_sizes(vit_dir, monkeypatch):
    enc = VisionEncoder.from_pretrained(vit_dir).eval()
    emb = enc.model.embeddings
    calls: list[tuple[int, int]] = []
    original = emb.interpolate_pos_encoding

    def spy(embeddings, height, width):
        calls.append((height, width))
        return original(embeddings, height, width)

    monkeypatch.setattr(emb, "interpolate_pos_encoding", spy)
    enc([torch.rand(3, 32, 32)])
    assert calls == []  # native 8x8 grid: the trained position table is used as is
    out = enc([torch.rand(3, 16, 40)])
    assert calls == [(16, 40)] and out[0].shape == (4 * 10, 32)


def test_processor_mean_std_read_from_checkpoint(tmp_path):
    path = save_tiny_vit(tmp_path)
    (path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 4]})
    )
    enc = VisionEncoder.from_pretrained(path)
    assert enc.image_mean == pytest.approx((0.1, 0.2, 0.3))
    assert enc.image_std == (1, 2, 4)
    # SigLIP processor defaults when the checkpoint has none: [0, 1] -> [-1, 1]
    default = VisionEncoder.from_config(
        SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=4)
    )
    assert default.image_mean == (0.5,) * 3 and default.image_std == (0.5,) * 3


def test_penultimate_layer_and_no_unused_parameters(vit_dir):
    hf = SiglipVisionModel.from_pretrained(vit_dir).eval()
    enc = VisionEncoder.from_pretrained(vit_dir, feature_layer=-2).eval()
    assert len(enc.model.encoder.layers) == 1 and enc.config.num_hidden_layers == 2
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ref = hf(pixel_values=x * 2 - 1, output_hidden_states=True).hidden_states[-2]
    feats = enc(list(x))[0]
    torch.testing.assert_close(feats, ref[0], atol=1e-5, rtol=1e-5)
    # every remaining parameter gets a gradient (no pooling head, no dropped layer left behind)
    feats.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    # the same trimmed module is rebuilt from the (unchanged) config
    rebuilt = VisionEncoder.from_config(enc.config, feature_layer=-2)
    assert rebuilt.state_dict().keys() == enc.state_dict().keys()
    with pytest.raises(ConfigError, match="feature_layer"):
        VisionEncoder.from_pretrained(vit_dir, feature_layer=-3)


def test_bad_image_size_is_a_clear_error(vit_dir):
    enc = VisionEncoder.from_pretrained(vit_dir)
    with pytest.raises(
        DataError, match=r"ViT input 1 has shape \(3, 30, 32\).*multiples of the ViT patch size 4"
    ):
        enc([torch.rand(3, 32, 32), torch.rand(3, 30, 32)])


def test_connector_shape_and_activation():
    conn = MLPConnector(32, 48)
    y = conn(torch.randn(7, 32))
    assert y.shape == (7, 48)
    assert isinstance(conn.act, torch.nn.GELU) and conn.act.approximate == "tanh"


def test_loads_the_vision_tower_of_a_full_siglip_checkpoint(tmp_path):
    """Released SigLIP checkpoints are image-text `SiglipModel`s; the vision tower loads from them directly."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=4,
        ),
    )
    full = SiglipModel(cfg).eval()
    full.save_pretrained(tmp_path)
    enc = VisionEncoder.from_pretrained(tmp_path).eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    ref = full.vision_model(pixel_values=x * 2 - 1).last_hidden_state
    torch.testing.assert_close(enc(list(x))[0], ref[0], atol=1e-5, rtol=1e-5)


def test_meta_device_build_then_load(vit_dir):
    """Big models are built on the meta device and filled from a checkpoint: nothing else must need restoring."""
    real = VisionEncoder.from_pretrained(vit_dir).eval()
    with torch.device("meta"):
        enc = VisionEncoder.from_config(real.config)
    enc = enc.to_empty(device="cpu").eval()
    enc.load_state_dict(real.state_dict())
    # position_ids is a non-persistent buffer of the HF embeddings: `to_empty` leaves it uninitialised
    enc.model.embeddings.position_ids.copy_(real.model.embeddings.position_ids)
    x = [torch.rand(3, 32, 32), torch.rand(3, 16, 24)]
    for a, b in zip(enc(x), real(x)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
