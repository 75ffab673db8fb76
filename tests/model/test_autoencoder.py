"""Latent autoencoders (diffusers VAE, pixel space), patchify/unpatchify and the latent projections."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from hypothesis import given, settings
from hypothesis import strategies as st

from mogao.errors import DataError
from mogao.model.autoencoder import DiffusersVAE, LatentProjector, PixelAutoencoder, patchify, unpatchify

TINY_VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
)


def _save_vae(path, **overrides):
    torch.manual_seed(0)
    AutoencoderKL(**{**TINY_VAE, **overrides}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    # FLUX-style normalisation: both a shift and a scale
    return _save_vae(tmp_path_factory.mktemp("vae"), scaling_factor=0.3611, shift_factor=0.1159)


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def test_encode_decode_shapes_and_downsample(vae_dir):
    vae = DiffusersVAE.from_pretrained(vae_dir)
    assert vae.downsample == 2 and vae.latent_channels == 4
    pixels = _images([(16, 16), (8, 12), (16, 16)])
    lat = vae.encode(pixels)
    assert [tuple(z.shape) for z in lat] == [(4, 8, 8), (4, 4, 6), (4, 8, 8)]
    assert all(z.dtype == torch.float32 for z in lat)
    out = vae.decode(lat)
    assert [tuple(x.shape) for x in out] == [(3, 16, 16), (3, 8, 12), (3, 16, 16)]
    assert all(x.min() >= 0 and x.max() <= 1 for x in out)


def test_pipeline_subfolder(tmp_path):
    _save_vae(tmp_path / "vae")
    vae = DiffusersVAE.from_pretrained(tmp_path, subfolder="vae")
    assert vae.encode(_images([(8, 8)]))[0].shape == (4, 4, 4)


def test_scaling_and_shift_match_manual_computation(vae_dir):
    vae = DiffusersVAE.from_pretrained(vae_dir)
    ref = AutoencoderKL.from_pretrained(vae_dir).eval()
    x = _images([(16, 16)])[0]
    with torch.no_grad():
        mean = ref.encode(x[None] * 2 - 1).latent_dist.mean[0]
    torch.testing.assert_close(vae.encode([x])[0], (mean - 0.1159) * 0.3611, atol=1e-6, rtol=1e-5)
    # decode undoes the normalisation before the VAE decoder
    with torch.no_grad():
        img = ref.decode(mean[None]).sample[0]
    torch.testing.assert_close(
        vae.decode([(mean - 0.1159) * 0.3611])[0], ((img + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5
    )


def test_no_shift_factor_means_zero_shift(tmp_path):
    vae = DiffusersVAE.from_pretrained(_save_vae(tmp_path))  # SD-style: scaling 0.18215, no shift
    ref = AutoencoderKL.from_pretrained(tmp_path).eval()
    x = _images([(8, 8)])[0]
    with torch.no_grad():
        mean = ref.encode(x[None] * 2 - 1).latent_dist.mean[0]
    torch.testing.assert_close(vae.encode([x])[0], mean * 0.18215, atol=1e-6, rtol=1e-5)


def test_batched_by_size_equals_one_by_one(vae_dir):
    vae = DiffusersVAE.from_pretrained(vae_dir, batch_size=2)
    pixels = _images([(8, 8), (16, 8), (8, 8), (8, 8), (16, 8)], seed=1)
    together = vae.encode(pixels)
    for x, z in zip(pixels, together):
        torch.testing.assert_close(z, vae.encode([x])[0], atol=1e-5, rtol=1e-5)


def test_frozen_even_after_train(vae_dir):
    vae = DiffusersVAE.from_pretrained(vae_dir)
    parent = torch.nn.ModuleDict({"vae": vae, "head": torch.nn.Linear(2, 2)})
    parent.train()
    assert not vae.training and not vae.vae.training
    assert all(not p.requires_grad for p in vae.parameters())
    pixels = [torch.rand(3, 8, 8, requires_grad=True)]
    z = vae.encode(pixels)[0]
    assert not z.requires_grad


def test_posterior_sampling_option(vae_dir):
    det = DiffusersVAE.from_pretrained(vae_dir)
    x = _images([(8, 8)])
    torch.testing.assert_close(det.encode(x)[0], det.encode(x)[0], atol=0, rtol=0)
    sto = DiffusersVAE.from_pretrained(vae_dir, sample_posterior=True)
    a = sto.encode(x, generator=torch.Generator().manual_seed(0))[0]
    b = sto.encode(x, generator=torch.Generator().manual_seed(0))[0]
    c = sto.encode(x, generator=torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c) and not torch.equal(a, det.encode(x)[0])


def test_from_config_rebuilds_same_architecture(vae_dir):
    vae = DiffusersVAE.from_pretrained(vae_dir)
    again = DiffusersVAE.from_config(dict(vae.config))
    assert again.state_dict().keys() == vae.state_dict().keys()
    assert again.scaling_factor == pytest.approx(0.3611)
    # block types default to one per block width
    short = {k: v for k, v in TINY_VAE.items() if not k.endswith("block_types")}
    assert DiffusersVAE.from_config(short).downsample == 2


def test_bad_image_size_is_a_clear_error(vae_dir):
    vae = DiffusersVAE.from_pretrained(vae_dir)
    with pytest.raises(
        DataError, match=r"input 0 has shape \(3, 9, 8\).*multiples of the downsample factor 2"
    ):
        vae.encode([torch.rand(3, 9, 8)])


def test_pixel_autoencoder_exact_round_trip():
    ae = PixelAutoencoder()
    assert ae.downsample == 1 and ae.latent_channels == 3
    pixels = _images([(4, 6), (5, 3)])
    lat = ae.encode(pixels)
    torch.testing.assert_close(lat[0], pixels[0] * 2 - 1, atol=0, rtol=0)
    torch.testing.assert_close(ae.decode(lat)[1], pixels[1], atol=1e-7, rtol=0)
    assert ae.decode([torch.full((3, 2, 2), 5.0)])[0].max() == 1.0  # decode clamps


@settings(max_examples=30, deadline=None)
@given(
    c=st.integers(1, 4),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    p=st.integers(1, 3),
)
def test_patchify_unpatchify_are_inverses(c, gh, gw, p):
    lat = torch.randn(c, gh * p, gw * p)
    tokens = patchify(lat, p)
    assert tokens.shape == (gh * gw, c * p * p)
    assert torch.equal(unpatchify(tokens, (gh, gw), p, c), lat)
    assert torch.equal(patchify(unpatchify(tokens, (gh, gw), p, c), p), tokens)


def test_patchify_cell_order_is_row_major():
    lat = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)
    tokens = patchify(lat, 2)  # grid 2 x 3
    # token 1 = row 0, column 1: pixels rows 0-1, columns 2-3, channel-major inside
    assert tokens[1].tolist() == lat[:, 0:2, 2:4].reshape(-1).tolist()
    assert tokens[3].tolist() == lat[:, 2:4, 0:2].reshape(-1).tolist()


def test_patchify_errors():
    with pytest.raises(DataError, match=r"h=5 and w=4 must be multiples of 2"):
        patchify(torch.zeros(3, 5, 4), 2)
    with pytest.raises(DataError, match="expects a latent"):
        patchify(torch.zeros(5, 4), 2)
    with pytest.raises(ValueError, match="do not match grid 2x2"):
        unpatchify(torch.zeros(3, 12), (2, 2), 2, 3)


def test_latent_projector_output_starts_at_zero():
    proj = LatentProjector(12, 32)
    assert proj.proj_in.in_features == 12 and proj.proj_in.out_features == 32
    h = proj.proj_in(torch.randn(5, 12))
    assert torch.equal(proj.proj_out(h), torch.zeros(5, 12))
    assert torch.count_nonzero(proj.proj_out.weight) == 0 and torch.count_nonzero(proj.proj_out.bias) == 0


def test_per_channel_latent_mean_and_std(tmp_path):
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.0, 2.0, 0.5, 4.0]
    path = _save_vae(tmp_path, latents_mean=mean, latents_std=std, scaling_factor=0.5)
    vae = DiffusersVAE.from_pretrained(path)
    ref = AutoencoderKL.from_pretrained(path).eval()
    x = _images([(8, 8)])[0]
    with torch.no_grad():
        z = ref.encode(x[None] * 2 - 1).latent_dist.mean[0]
    m, s = torch.tensor(mean).view(4, 1, 1), torch.tensor(std).view(4, 1, 1)
    expected = (z - m) * 0.5 / s
    torch.testing.assert_close(vae.encode([x])[0], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(vae.denormalise(expected), z, atol=1e-6, rtol=1e-5)


def test_meta_device_build_then_load(vae_dir):
    real = DiffusersVAE.from_pretrained(vae_dir)
    with torch.device("meta"):
        vae = DiffusersVAE.from_config(dict(real.config))
    vae = vae.to_empty(device="cpu")
    vae.load_state_dict(real.state_dict())
    x = _images([(8, 8)])
    torch.testing.assert_close(vae.encode(x)[0], real.encode(x)[0], atol=0, rtol=0)


def test_grid_position_embedding_codes_each_cell_and_peaks_at_the_same_cell():
    from mogao.model.autoencoder import grid_position_embedding

    rows, cols = torch.arange(8).repeat_interleave(8), torch.arange(8).repeat(8)
    e = grid_position_embedding(rows, cols, 64)
    assert e.shape == (64, 64)
    torch.testing.assert_close(e, grid_position_embedding(rows, cols, 64))  # fixed: a second image, same codes
    sim = e @ e.T
    assert torch.equal(sim.argmax(dim=1), torch.arange(64))  # every cell's code is most similar to itself
    assert torch.unique(e, dim=0).shape[0] == 64
    odd = grid_position_embedding(rows, cols, 66)  # not a multiple of 4: padded with zero channels
    assert odd.shape == (64, 66) and torch.equal(odd[:, :64], e) and not odd[:, 64:].any()
    with pytest.raises(ValueError, match="dim >= 4"):
        grid_position_embedding(rows, cols, 3)
