"""The FLUX autoencoder in Black Forest Labs' layout (`mogao.bagel.flux_ae`): names, loading, decoding, writing."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_bagel import FluxAutoencoderReplica, flux_replica

from mogao.bagel import flux_ae
from mogao.bagel.files import BagelFormatError

TINY = flux_ae.FluxAEConfig(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)


@pytest.fixture(scope="module")
def ae_file(tmp_path_factory) -> Path:
    """A tiny FLUX-layout ae.safetensors written from the replica of BFL's module tree."""
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in flux_replica().state_dict().items()}, str(path))
    return path


def test_the_key_maps_are_inverse_bijections_on_the_full_flux_autoencoder():
    shapes = flux_ae.expected_flux_shapes()
    assert len(shapes) == 244  # the tensors of FLUX's ae.safetensors
    diffusers_names = set(flux_ae.flux_autoencoder(meta=True).state_dict())
    mapped = {flux_ae.diffusers_key(k, 4) for k in shapes}
    assert mapped == diffusers_names and len(mapped) == len(shapes)
    assert all(flux_ae.flux_key(flux_ae.diffusers_key(k, 4), 4) == k for k in shapes)
    assert flux_ae.diffusers_key("decoder.up.0.block.2.nin_shortcut.weight", 4) == \
        "decoder.up_blocks.3.resnets.2.conv_shortcut.weight"
    assert flux_ae.diffusers_key("encoder.mid.attn_1.proj_out.weight", 4) == \
        "encoder.mid_block.attentions.0.to_out.0.weight"
    assert shapes["decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    for bad in ("encoder.down.0.attn.0.q.weight", "decoder.up.4.block.0.conv1.weight", "quant_conv.weight"):
        with pytest.raises(KeyError):
            flux_ae.diffusers_key(bad, 4)


@pytest.mark.parametrize("sizes", [((128, 256, 512, 512), 2, 16, 32), ((8, 16), 1, 4, 4)])
def test_expected_shapes_are_those_of_the_original_module_tree(sizes):
    with torch.device("meta"):
        replica = FluxAutoencoderReplica(*sizes)
    cfg = flux_ae.FluxAEConfig(block_out_channels=sizes[0], layers_per_block=sizes[1], latent_channels=sizes[2],
                               norm_num_groups=sizes[3])
    assert flux_ae.expected_flux_shapes(cfg) == {k: tuple(v.shape) for k, v in replica.state_dict().items()}


def test_loaded_autoencoder_decodes_like_diffusers_own_conversion_and_like_the_original(ae_file):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = flux_ae.load_flux_autoencoder(ae_file, TINY)
    assert vae.config.latent_channels == 4 and not vae.config.use_quant_conv
    assert vae.config.scaling_factor == flux_ae.LATENT_SCALE and vae.config.shift_factor == flux_ae.LATENT_SHIFT
    independent = AutoencoderKL(**TINY.diffusers_config())
    independent.load_state_dict(convert_ldm_vae_checkpoint(load_file(str(ae_file)), TINY.diffusers_config()),
                                strict=True)
    z = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = vae.decode(z).sample
        assert torch.equal(ours, independent.eval().decode(z).sample)
        assert torch.allclose(ours, flux_replica().decode_raw(z), atol=1e-5)  # BFL's decoder, re-implemented
        x = torch.rand(1, 3, 8, 8) * 2 - 1
        assert torch.equal(vae.encode(x).latent_dist.mean, independent.encode(x).latent_dist.mean)


def test_latent_normalisation_is_scale_times_z_minus_shift(ae_file):
    from mogao.model.autoencoder import DiffusersVAE

    wrapped = DiffusersVAE(flux_ae.load_flux_autoencoder(ae_file, TINY))
    z = torch.randn(4, 2, 2)
    assert torch.allclose(wrapped.normalise(z), 0.3611 * (z - 0.1159))
    assert torch.allclose(wrapped.denormalise(wrapped.normalise(z)), z, atol=1e-6)


def test_writing_back_gives_the_same_file_bit_for_bit(ae_file, tmp_path):
    from mogao.bagel.files import read_header

    _, meta = read_header(ae_file)
    vae = flux_ae.load_flux_autoencoder(ae_file, TINY)
    out = flux_ae.save_flux_autoencoder(vae, tmp_path / "ae.safetensors", metadata=meta)
    assert out.read_bytes() == ae_file.read_bytes()
    bf16 = tmp_path / "bf16.safetensors"  # another dtype comes back in that dtype, unchanged
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(ae_file)).items()}, str(bf16))
    again = flux_ae.save_flux_autoencoder(flux_ae.load_flux_autoencoder(bf16, TINY), tmp_path / "again.safetensors")
    assert again.read_bytes() == bf16.read_bytes()


def _edited(src: Path, dst: Path, edit) -> Path:
    state = load_file(str(src))
    edit(state)
    save_file(state, str(dst))
    return dst


@pytest.mark.parametrize("edit, names", [
    (lambda s: s.pop("decoder.mid.attn_1.k.bias"), ["missing", "decoder.mid.attn_1.k.bias"]),
    (lambda s: s.update({"quant_conv.weight": torch.zeros(8, 8, 1, 1)}), ["unexpected", "quant_conv.weight"]),
    (lambda s: s.update({"encoder.conv_in.weight": torch.zeros(8, 3, 5, 5)}), ["wrong shape", "encoder.conv_in.weight"]),
    (lambda s: s.update({"encoder.conv_in.bias": torch.zeros(8, dtype=torch.int32)}), ["non-floating"]),
])
def test_a_file_of_another_layout_is_refused_before_any_tensor_is_read(ae_file, tmp_path, monkeypatch, edit, names):
    bad = _edited(ae_file, tmp_path / "bad.safetensors", edit)

    def no_read(*a, **k):
        raise AssertionError("tensors read before the header was checked")

    monkeypatch.setattr(flux_ae, "load_tensors", no_read)
    with pytest.raises(BagelFormatError) as e:
        flux_ae.load_flux_autoencoder(bad, TINY)
    assert str(bad) in str(e.value) and all(n in str(e.value) for n in names)


def test_a_truncated_file_or_a_pickle_is_refused_and_nothing_is_unpickled(ae_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(ae_file.read_bytes()[:-100])
    with pytest.raises(BagelFormatError, match="not a readable safetensors"):
        flux_ae.load_flux_autoencoder(cut, TINY)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    pkl = tmp_path / "ae.safetensors"
    pkl.write_bytes(pickle.dumps({"encoder.conv_in.weight": Payload()}))
    with pytest.raises(BagelFormatError):
        flux_ae.load_flux_autoencoder(pkl, TINY)
    assert not marker.exists()


def test_the_flux_sizes_refuse_a_tiny_file(ae_file):
    with pytest.raises(BagelFormatError, match="missing .* tensor"):
        flux_ae.check_flux_file(ae_file)  # default: FLUX's own sizes
