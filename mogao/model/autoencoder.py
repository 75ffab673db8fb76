"""Latent autoencoders (frozen) and the map between latents and VAE tokens.

The generation expert works on VAE tokens: an image's latent (C, h, w) is cut into p x p cells
(`patchify`), each cell a token of C*p*p numbers, projected to the LLM width by `LatentProjector.proj_in`
and back by `proj_out`. The autoencoder itself never trains: `encode` runs under `torch.no_grad` and the
module stays in eval mode even when a parent calls `.train()`.

Latents are *normalised* the diffusers way, `(z - shift_factor) * scaling_factor`, so they have roughly
unit variance - the scale the flow objective's noise assumes.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from mogao.errors import DataError


def _check_image(i: int, img: torch.Tensor, multiple: int) -> tuple[int, int]:
    if (
        img.dim() != 3
        or img.shape[0] != 3
        or img.shape[1] == 0
        or img.shape[1] % multiple
        or img.shape[2] % multiple
    ):
        raise DataError(
            f"autoencoder input {i} has shape {tuple(img.shape)}; expected (3, H, W) with H and W positive "
            f"multiples of the downsample factor {multiple} - resize the image to a multiple of {multiple} pixels"
        )
    return int(img.shape[1]), int(img.shape[2])


def _by_size(
    items: list[torch.Tensor], fn: Callable[..., torch.Tensor], batch_size: int,
    extra: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Apply `fn` to stacks of equal-size tensors (at most `batch_size` at a time); results in input order.
    With `extra` (one tensor per item, of equal size where the items are), `fn` gets the stack of those too."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, t in enumerate(items):
        groups[tuple(t.shape)].append(i)
    out: list[torch.Tensor | None] = [None] * len(items)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            stack = torch.stack([items[i] for i in chunk])
            res = fn(stack) if extra is None else fn(stack, torch.stack([extra[i] for i in chunk]))
            for j, i in enumerate(chunk):
                out[i] = res[j]
    return out  # type: ignore[return-value]


class LatentAutoencoder(nn.Module):
    """What the model needs from an autoencoder.

    Attributes:
        downsample: pixels per latent cell along each side.
        latent_channels: channels C of a latent.

    `encode(pixels)`: I images (3, H, W) in [0, 1] -> I normalised latents (C, H/downsample, W/downsample).
    `decode(latents)`: the inverse map back to images (3, H, W) in [0, 1].
    """

    downsample: int
    latent_channels: int

    def encode(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def decode(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def train(self, mode: bool = True) -> LatentAutoencoder:
        # Frozen: a parent LightningModule's .train() must not switch the autoencoder out of eval mode.
        return super().train(False)


class DiffusersVAE(LatentAutoencoder):
    """A frozen `diffusers.AutoencoderKL` (SD/SDXL/FLUX-class VAEs).

    Args:
        vae: the AutoencoderKL; its parameters are frozen here.
        sample_posterior: draw z ~ q(z|x) instead of taking the posterior mean (the default: deterministic
            latents, so an image encodes the same way wherever it is processed).
        batch_size: most images per VAE call (images are batched only with others of the same size).

    Normalisation follows the VAE config: `(z - shift) * scaling_factor / std`, where shift is
    `latents_mean` (per channel) if set, else `shift_factor`, else 0, and std is `latents_std` if set, else 1.
    Latents come back in float32 whatever the VAE's dtype; load SDXL's VAE in float32 (it overflows in fp16).
    """

    def __init__(self, vae: AutoencoderKL, sample_posterior: bool = False, batch_size: int = 16):
        super().__init__()
        self.vae = vae.requires_grad_(False).eval()
        self.sample_posterior = sample_posterior
        self.batch_size = batch_size
        cfg = vae.config
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(cfg.scaling_factor)
        c = self.latent_channels
        # Per-channel shift and std as plain lists, not buffers: nothing to restore after a meta-device
        # init or `to_empty`; the (C, 1, 1) tensors are made on the fly on the latent's device.
        if getattr(cfg, "latents_mean", None) is not None:
            self.latent_shift = [float(v) for v in cfg.latents_mean]
        else:
            self.latent_shift = [float(cfg.shift_factor or 0.0)] * c
        std = getattr(cfg, "latents_std", None)
        self.latent_std = [float(v) for v in std] if std is not None else [1.0] * c

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        subfolder: str | None = None,
        sample_posterior: bool = False,
        batch_size: int = 16,
        **kwargs,
    ) -> DiffusersVAE:
        """Load an AutoencoderKL checkpoint (a VAE folder, or a pipeline folder with `subfolder="vae"`)."""
        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, **kwargs)
        return cls(vae, sample_posterior=sample_posterior, batch_size=batch_size)

    @classmethod
    def from_config(cls, config: dict, sample_posterior: bool = False, batch_size: int = 16) -> DiffusersVAE:
        """A randomly initialised VAE (tests, tiny recipes). Block types default to one per block width."""
        config = dict(config)
        n = len(config.get("block_out_channels", (64,)))
        config.setdefault("down_block_types", ["DownEncoderBlock2D"] * n)
        config.setdefault("up_block_types", ["UpDecoderBlock2D"] * n)
        return cls(
            AutoencoderKL.from_config(config), sample_posterior=sample_posterior, batch_size=batch_size
        )

    @property
    def config(self):
        """The AutoencoderKL config; `from_config(dict(config))` rebuilds the architecture."""
        return self.vae.config

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift = torch.tensor(self.latent_shift, device=z.device).view(-1, 1, 1)
        return shift, torch.tensor(self.latent_std, device=z.device).view(-1, 1, 1)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent (C, h, w) or (B, C, h, w) -> the normalised float32 latent the model sees."""
        shift, std = self._stats(z)
        return (z.float() - shift) * (self.scaling_factor / std)

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalise`: back to the VAE's raw latent scale (float32)."""
        shift, std = self._stats(z)
        return z.float() * (std / self.scaling_factor) + shift

    @torch.no_grad()
    def encode(
        self, pixels: list[torch.Tensor], generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """I images (3, H, W) in [0, 1] -> I normalised float32 latents (C, H/ds, W/ds).

        With `sample_posterior=True` the latent is z = mean + std·ε of the posterior: ε from `generator` (or
        torch's global one), or, given `seeds` (one per image), drawn on the CPU from each image's own stream
        (`posterior_generator`), so that an image encodes the same way whatever batch, rank or device it is in.
        Without `sample_posterior` both are ignored.
        """
        for i, img in enumerate(pixels):
            _check_image(i, img, self.downsample)
        if seeds is not None and len(seeds) != len(pixels):
            raise ValueError(f"DiffusersVAE.encode: {len(seeds)} seeds for {len(pixels)} images")
        p = next(self.vae.parameters())

        def run(x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
            post = self.vae.encode((x.float() * 2 - 1).to(p.device, p.dtype)).latent_dist
            if not self.sample_posterior:
                z = post.mode()
            elif eps is None:
                z = post.sample(generator=generator)
            else:
                z = post.mean + post.std * eps.to(post.mean.device, post.mean.dtype)
            return self.normalise(z)

        if not self.sample_posterior or seeds is None:
            return _by_size(pixels, run, self.batch_size)
        ds, c = self.downsample, self.latent_channels
        eps = [torch.randn((c, img.shape[1] // ds, img.shape[2] // ds), generator=posterior_generator(seed),
                           dtype=torch.float32) for img, seed in zip(pixels, seeds)]
        return _by_size(pixels, run, self.batch_size, eps)

    @torch.no_grad()
    def decode(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """I normalised latents (C, h, w) -> I float32 images (3, h*ds, w*ds) in [0, 1]."""
        p = next(self.vae.parameters())

        def run(z: torch.Tensor) -> torch.Tensor:
            x = self.vae.decode(self.denormalise(z.to(p.device)).to(p.dtype)).sample
            return ((x.float() + 1) / 2).clamp(0, 1)

        return _by_size(latents, run, self.batch_size)


def posterior_generator(seed: int) -> torch.Generator:
    """The CPU generator of an image's posterior sample: seeded from the image's seed through an LCG step, a
    stream of its own (the image's σ and noise are drawn from the seed itself, `draw_sigmas_and_noise`)."""
    return torch.Generator(device="cpu").manual_seed((int(seed) * 6364136223846793005 + 1442695040888963407) % 2**64)


class PixelAutoencoder(LatentAutoencoder):
    """The identity 'autoencoder' of tiny CPU recipes: latent = pixels * 2 - 1 (3 channels, downsample 1).

    Lets a recipe train image generation without a trained VAE; `patchify` then makes the tokens.
    """

    downsample = 1
    latent_channels = 3

    @torch.no_grad()
    def encode(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        for i, x in enumerate(pixels):
            _check_image(i, x, 1)
        return [x.float() * 2 - 1 for x in pixels]

    @torch.no_grad()
    def decode(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        return [((z.float() + 1) / 2).clamp(0, 1) for z in latents]


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """latent (C, h, w) -> tokens (h/p * w/p, C*p*p): p x p cells in row-major order.

    Inside a token the numbers are ordered (C, p, p), the layout FLUX's latent packing uses.
    """
    if latent.dim() != 3:
        raise DataError(f"patchify expects a latent (C, h, w), got shape {tuple(latent.shape)}")
    c, h, w = latent.shape
    if h % p or w % p:
        raise DataError(
            f"latent of shape {tuple(latent.shape)} cannot be cut into {p}x{p} cells: h={h} and w={w} must be "
            f"multiples of {p} - make image sides multiples of (autoencoder downsample x {p}) pixels"
        )
    gh, gw = h // p, w // p
    return latent.reshape(c, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, c * p * p)


def unpatchify(tokens: torch.Tensor, grid_hw: tuple[int, int], p: int, channels: int) -> torch.Tensor:
    """tokens (gh*gw, C*p*p) -> latent (C, gh*p, gw*p); the exact inverse of `patchify`."""
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if tokens.shape != (gh * gw, channels * p * p):
        raise ValueError(
            f"unpatchify: tokens of shape {tuple(tokens.shape)} do not match grid {gh}x{gw} with "
            f"{channels} channels and patch {p} (expected {(gh * gw, channels * p * p)})"
        )
    return tokens.reshape(gh, gw, channels, p, p).permute(2, 0, 3, 1, 4).reshape(channels, gh * p, gw * p)


def grid_position_embedding(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (n, dim) of token cells (row, column): half the channels encode the row,
    half the column, each as sin and cos over `dim // 4` frequencies from 1 rad per cell down to 1e-4.

    Added to every VAE token (clean and noisy copies alike), it gives the same spatial cell the same code in
    every copy of every image, so a noisy token finds its cell in a condition image by content, not only
    through the few rotary frequencies IL-RoPE has for H and W. Computed, not stored: any grid size works.
    """
    quarter = dim // 4
    if quarter == 0:
        raise ValueError(f"grid_position_embedding needs dim >= 4, got {dim}")
    freqs = 1e-4 ** (torch.arange(quarter, dtype=torch.float32, device=rows.device) / max(quarter - 1, 1))
    parts = []
    for axis in (rows, cols):
        angles = axis.to(torch.float32)[:, None] * freqs[None, :]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, dim=1)
    return F.pad(out, (0, dim - out.shape[1]))  # dim not a multiple of 4: zero channels at the end


def sincos_position_table(side: int, dim: int) -> torch.Tensor:
    """The (side * side, dim) float32 2-D sin-cos table BAGEL stores as its frozen position tables: row
    `r * side + c` holds, with q = dim / 4 and w_k = 10000^(-k / q),

        [sin(c·w_0..q-1), cos(c·w_0..q-1), sin(r·w_0..q-1), cos(r·w_0..q-1)]   (the column first)

    computed in float64 and rounded to float32. The initial value of `ModelConfig.latent_position_table` and
    `vit_position_table` (a checkpoint's table replaces it); `grid_position_embedding` is another code."""
    if side <= 0 or dim <= 0 or dim % 4:
        raise ValueError(f"a position table needs side > 0 and a width that is a multiple of 4, got {side}, {dim}")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    idx = torch.arange(side, dtype=torch.float64)
    parts = []
    for coord in (idx.repeat(side), idx.repeat_interleave(side)):  # column c, then row r of row r * side + c
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def position_table_rows(table: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, what: str) -> torch.Tensor:
    """Rows `row * S + column` (n, width) of a position table of S*S rows for tokens at cells (rows, cols),
    each (n,); DataError when a cell lies outside the table (`what` names the tokens in the message)."""
    side = math.isqrt(table.shape[0])
    if rows.numel() and not table.is_meta:
        furthest = int(torch.maximum(rows.max(), cols.max()))
        if furthest >= side:
            raise DataError(f"a {what} token grid reaches row/column {furthest}, beyond the {side}x{side} position "
                            "table: use smaller images, or a larger table side")
    return table.index_select(0, (rows * side + cols).to(table.device))


class LatentProjector(nn.Module):
    """Linear maps between VAE tokens (token_dim = C*p*p) and the LLM width (hidden).

    `proj_out` (weight and bias) starts at zero, so the predicted velocity starts at 0: the first steps do not
    push random outputs through the loss, and the copied LLM weights of the generation expert are disturbed
    as little as possible. Re-initialising this module with a generic init would undo that.
    """

    def __init__(self, token_dim: int, hidden: int):
        super().__init__()
        self.proj_in = nn.Linear(token_dim, hidden)
        self.proj_out = nn.Linear(hidden, token_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
