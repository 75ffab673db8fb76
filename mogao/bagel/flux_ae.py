"""The FLUX autoencoder as BAGEL publishes it (`ae.safetensors`, Black Forest Labs' original key layout) as a
`diffusers.AutoencoderKL`, and back.

The two layouts name the same weights differently (`encoder.down.0.block.1.nin_shortcut` vs
`encoder.down_blocks.0.resnets.1.conv_shortcut`, decoder levels in reverse order, ...), and the mid-block
attention is four 1x1 convolutions in the original but linear layers in diffusers: the same numbers, shaped
(C, C, 1, 1) vs (C, C). `diffusers_key` / `flux_key` translate names one to one, `to_diffusers_state` /
`to_flux_state` the tensors (a reshape, so a round trip is bit-exact).

Latent scale: BAGEL's `AutoEncoder.encode` returns LATENT_SCALE * (z - LATENT_SHIFT) (modeling/autoencoder.py
315-322) - the diffusers normalisation `(z - shift_factor) * scaling_factor` with FLUX's factors, which the
diffusers config built here carries.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mogao.bagel.files import BagelFormatError, TensorInfo, check_tensors, load_tensors, read_header

LATENT_SCALE = 0.3611  # FLUX's scale_factor: encode = LATENT_SCALE * (z - LATENT_SHIFT)
LATENT_SHIFT = 0.1159  # FLUX's shift_factor


@dataclass(frozen=True)
class FluxAEConfig:
    """Sizes of a FLUX-layout autoencoder; the defaults are FLUX's (BAGEL's `load_ae`: ch 128, ch_mult
    [1, 2, 4, 4], 2 res blocks, 16 latent channels, downsample 8). Tests use tiny ones.

    norm_num_groups: FLUX's GroupNorms have 32 groups (the original code hard-codes it; no weight records it).
    """

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along a side."""
        return 2 ** (self.levels - 1)

    def diffusers_config(self) -> dict:
        """The `AutoencoderKL` config: FLUX has no quant / post-quant convs and normalises latents with
        LATENT_SCALE and LATENT_SHIFT."""
        n = self.levels
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
            "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
            "sample_size": 1024, "scaling_factor": LATENT_SCALE, "shift_factor": LATENT_SHIFT,
            "latents_mean": None, "latents_std": None, "force_upcast": True,
            "use_quant_conv": False, "use_post_quant_conv": False, "mid_block_add_attention": True,
        }


FLUX = FluxAEConfig()


def flux_autoencoder(config: FluxAEConfig = FLUX, *, meta: bool = False):
    """A `diffusers.AutoencoderKL` of this configuration (random weights; on the meta device with `meta`)."""
    from diffusers import AutoencoderKL

    with torch.device("meta") if meta else contextlib.nullcontext():
        return AutoencoderKL(**config.diffusers_config())


# ---- names ------------------------------------------------------------------------------------------------

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}
_RESNET = {"nin_shortcut": "conv_shortcut"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_PARAM = r"(weight|bias)"


def _resnet_part(part: str, table: dict[str, str]) -> str:
    return table.get(part, part)


def diffusers_key(key: str, levels: int) -> str:
    """The diffusers name of an original FLUX autoencoder key (`levels` = number of resolution levels: 4 for
    FLUX). Decoder level i of the original is diffusers' up block levels - 1 - i (the original lists levels
    from the highest resolution, diffusers in the order the decoder runs). KeyError for a key FLUX has not."""
    m = re.fullmatch(rf"(encoder|decoder)\.(conv_in|conv_out)\.{_PARAM}", key)
    if m:
        return key
    m = re.fullmatch(rf"(encoder|decoder)\.norm_out\.{_PARAM}", key)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid\.block_([12])\.(norm1|conv1|norm2|conv2|nin_shortcut)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_resnet_part(m[3], _RESNET)}.{m[4]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.{_PARAM}", key)
    if m:
        return f"{m[1]}.mid_block.attentions.0.{_ATTN[m[2]]}.{m[3]}"
    m = re.fullmatch(rf"encoder\.down\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.{_PARAM}", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_resnet_part(m[3], _RESNET)}.{m[4]}"
    m = re.fullmatch(rf"encoder\.down\.(\d+)\.downsample\.conv\.{_PARAM}", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(rf"decoder\.up\.(\d+)\.block\.(\d+)\.(norm1|conv1|norm2|conv2|nin_shortcut)\.{_PARAM}", key)
    if m and int(m[1]) < levels:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}.{_resnet_part(m[3], _RESNET)}.{m[4]}"
    m = re.fullmatch(rf"decoder\.up\.(\d+)\.upsample\.conv\.{_PARAM}", key)
    if m and int(m[1]) < levels:
        return f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    raise KeyError(f"'{key}' is not a key of a FLUX autoencoder")


def flux_key(key: str, levels: int) -> str:
    """The original FLUX name of a diffusers AutoencoderKL key: the inverse of `diffusers_key`."""
    m = re.fullmatch(rf"(encoder|decoder)\.(conv_in|conv_out)\.{_PARAM}", key)
    if m:
        return key
    m = re.fullmatch(rf"(encoder|decoder)\.conv_norm_out\.{_PARAM}", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid_block\.resnets\.([01])\.(norm1|conv1|norm2|conv2|conv_shortcut)\.{_PARAM}",
                     key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_part(m[3], _RESNET_BACK)}.{m[4]}"
    m = re.fullmatch(rf"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.{_PARAM}",
                     key)
    if m:
        return f"{m[1]}.mid.attn_1.{_ATTN_BACK[m[2]]}.{m[3]}"
    m = re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.{_PARAM}",
                     key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_part(m[3], _RESNET_BACK)}.{m[4]}"
    m = re.fullmatch(rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_PARAM}", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.{_PARAM}",
                     key)
    if m and int(m[1]) < levels:
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_resnet_part(m[3], _RESNET_BACK)}.{m[4]}"
    m = re.fullmatch(rf"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.{_PARAM}", key)
    if m and int(m[1]) < levels:
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise KeyError(f"'{key}' is not a key of a diffusers AutoencoderKL in the FLUX configuration")


def _is_attention_matrix(diffusers_name: str) -> bool:
    """The q/k/v/out weights of the mid-block attention: linear in diffusers, 1x1 convs in the original."""
    return bool(re.search(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_name))


def expected_flux_shapes(config: FluxAEConfig = FLUX) -> dict[str, tuple[int, ...]]:
    """Original FLUX key -> shape, for an autoencoder of this configuration (from a meta-device model)."""
    out = {}
    for name, t in flux_autoencoder(config, meta=True).state_dict().items():
        shape = tuple(t.shape)
        out[flux_key(name, config.levels)] = shape + (1, 1) if _is_attention_matrix(name) else shape
    return out


def to_diffusers_state(state: dict[str, torch.Tensor], config: FluxAEConfig = FLUX) -> dict[str, torch.Tensor]:
    """Original-layout tensors -> diffusers names (attention 1x1 convs as (C, C) matrices: a view)."""
    out = {}
    for k, t in state.items():
        name = diffusers_key(k, config.levels)
        out[name] = t.reshape(t.shape[0], t.shape[1]) if _is_attention_matrix(name) else t
    return out


def to_flux_state(state: dict[str, torch.Tensor], config: FluxAEConfig = FLUX) -> dict[str, torch.Tensor]:
    """Diffusers-named tensors -> the original layout (attention matrices back to (C, C, 1, 1))."""
    out = {}
    for k, t in state.items():
        name = flux_key(k, config.levels)
        out[name] = t.reshape(*t.shape, 1, 1) if _is_attention_matrix(k) else t
    return out


# ---- files ------------------------------------------------------------------------------------------------


def check_flux_file(path: str | os.PathLike, config: FluxAEConfig = FLUX) -> dict[str, TensorInfo]:
    """The header of a FLUX-layout safetensors file, checked against `config` (every key and shape, none left
    over, none missing) before any tensor is read; BagelFormatError naming the file and keys otherwise."""
    path = Path(path)
    found, _ = read_header(path)
    check_tensors(path, found, expected_flux_shapes(config),
                  hint="not a FLUX autoencoder in Black Forest Labs' layout of this configuration "
                       f"(channels {config.block_out_channels}, {config.layers_per_block} res blocks, "
                       f"{config.latent_channels} latent channels)")
    return found


def read_flux_state(path: str | os.PathLike, config: FluxAEConfig = FLUX) -> dict[str, torch.Tensor]:
    """The original-layout tensors of a FLUX autoencoder file, after `check_flux_file`."""
    found = check_flux_file(path, config)
    return load_tensors(Path(path), found)


def load_flux_autoencoder(path: str | os.PathLike, config: FluxAEConfig = FLUX):
    """A `diffusers.AutoencoderKL` holding the weights of a FLUX-layout safetensors file (e.g. BAGEL's
    `ae.safetensors`), in the file's dtype. The header is checked first (`check_flux_file`); the model is
    built on the meta device and takes the loaded tensors as they are (no second copy)."""
    state = to_diffusers_state(read_flux_state(path, config), config)
    vae = flux_autoencoder(config, meta=True)
    vae.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*vae.named_parameters(), *vae.named_buffers()] if t.is_meta]
    if left:  # a diffusers version with more tensors than the original layout has
        raise BagelFormatError(path, f"has no values for {', '.join(left[:5])} of this diffusers AutoencoderKL")
    return vae.eval().requires_grad_(False)


def save_flux_autoencoder(vae, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a diffusers AutoencoderKL in the original FLUX layout (what `load_flux_autoencoder` reads).
    Weights round-trip bit-exactly; with the source file's `metadata`, safetensors writes the same bytes."""
    from safetensors.torch import save_file

    c = vae.config
    cfg = FluxAEConfig(block_out_channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
                       latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
                       in_channels=c.in_channels, out_channels=c.out_channels)
    state = to_flux_state({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, cfg)
    save_file(state, str(path), metadata=metadata)
    return Path(path)
