"""Rectified flow on VAE latents, in the diffusers convention.

    x_σ = (1 − σ)·x₀ + σ·ε,   target velocity v = ε − x₀,   σ = 1 is pure noise, σ = 0 the clean latent.

Sampling integrates dx/dσ = v from σ = 1 down to σ = 0. Timesteps are drawn with diffusers' SD3 helper
(`compute_density_for_timestep_sampling`) and shifted towards noise, more so for larger images (FLUX's
resolution-dependent shift), because more tokens carry more redundant signal at a given σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch import nn

from mogao.errors import ConfigError

_SCHEMES = ("logit_normal", "mode", "uniform")
_LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass
class TimestepSampling:
    """How σ is drawn for each generation target during training."""

    weighting_scheme: str = "logit_normal"
    """Density of the unshifted σ: "logit_normal" (SD3's default), "mode" or "uniform"
    (`diffusers.training_utils.compute_density_for_timestep_sampling`)."""
    logit_mean: float = 0.0
    """Mean of the normal whose sigmoid is σ ("logit_normal")."""
    logit_std: float = 1.0
    """Standard deviation of that normal ("logit_normal")."""
    mode_scale: float = 1.29
    """Scale of the "mode" density (SD3's value; keep below ~1.3 so σ stays in [0, 1])."""
    shift: float | None = None
    """Fixed shift applied to every image (overrides the resolution-dependent shift when set); 1 = no shift."""
    base_shift: float = 0.5
    """mu at `base_seq_len` tokens; the shift is exp(mu)."""
    max_shift: float = 1.15
    """mu at `max_seq_len` tokens."""
    base_seq_len: int = 256
    """Token count (of one image) where mu = base_shift; mu is linear in the count (extrapolated outside)."""
    max_seq_len: int = 4096
    """Token count where mu = max_shift."""
    use_dynamic_shift: bool = True
    """Shift by image size (FLUX); when False and `shift` is None, σ is not shifted."""

    def __post_init__(self) -> None:
        if self.weighting_scheme not in _SCHEMES:
            raise ConfigError(
                f"TimestepSampling.weighting_scheme: unknown '{self.weighting_scheme}', choose one of {_SCHEMES}"
            )
        if self.logit_std <= 0:
            raise ConfigError(f"TimestepSampling.logit_std must be > 0, got {self.logit_std}")
        if self.shift is not None and self.shift <= 0:
            raise ConfigError(f"TimestepSampling.shift must be > 0 (1 = no shift), got {self.shift}")
        if self.max_seq_len <= self.base_seq_len:
            raise ConfigError(
                f"TimestepSampling: max_seq_len ({self.max_seq_len}) must exceed base_seq_len ({self.base_seq_len})"
            )

    def shift_for(self, num_tokens: int) -> float:
        """The shift used for an image of `num_tokens` tokens."""
        if self.shift is not None:
            return float(self.shift)
        if self.use_dynamic_shift:
            return resolution_shift(num_tokens, self)
        return 1.0


def shift_sigmas(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """shift·σ / (1 + (shift − 1)·σ): moves σ towards 1 (noise) for shift > 1; fixes 0 and 1.

    The same map as `FlowMatchEulerDiscreteScheduler(shift=...)` and, with shift = exp(mu), FLUX's time shift.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(num_tokens: int, cfg: TimestepSampling) -> float:
    """exp(mu), mu linear in the image's token count (FLUX). Written out here because diffusers only has it
    inside the FLUX pipeline module, whose import pulls in every pipeline."""
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq_len - cfg.base_seq_len)
    mu = cfg.base_shift + slope * (num_tokens - cfg.base_seq_len)
    return math.exp(mu)


def draw_sigmas_and_noise(
    seeds: torch.Tensor,
    token_shapes: Sequence[tuple[int, ...]],
    num_tokens: Sequence[int],
    cfg: TimestepSampling,
    device: torch.device | str,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per image: σ and noise drawn from that image's seed alone.

    seeds: (I,) int64; token_shapes: the shape of each image's noise (e.g. (gh*gw, C*p*p));
    num_tokens: each image's token count (for the resolution shift).
    Returns σ (I,) float32 on `device` (kept in float32: bf16 would round σ to ~1/256) and I noise tensors
    in `dtype` on `device`.

    Each image gets its own CPU generator, draws σ first and then noise in float32, and only then moves to
    the device: so an image gets identical draws whichever pack, rank, device or dtype it lands in.
    """
    if not (len(seeds) == len(token_shapes) == len(num_tokens)):
        raise ValueError(
            f"draw_sigmas_and_noise: {len(seeds)} seeds, {len(token_shapes)} shapes and {len(num_tokens)} "
            "token counts - one of each per image"
        )
    sigmas, noise = [], []
    for seed, shape, n in zip(seeds.tolist(), token_shapes, num_tokens):
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        u = compute_density_for_timestep_sampling(
            cfg.weighting_scheme,
            batch_size=1,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
            device="cpu",
            generator=g,
        )
        sigmas.append(shift_sigmas(u.float(), cfg.shift_for(int(n))))
        noise.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device, dtype))
    sig = torch.cat(sigmas) if sigmas else torch.zeros(0)
    return sig.to(device), noise


def _per_row(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """A 1-D σ with one entry per row of x (per token) is broadcast over the remaining dims."""
    if isinstance(sigma, torch.Tensor) and sigma.dim() == 1 and x.dim() > 1 and sigma.shape[0] == x.shape[0]:
        return sigma.view(-1, *([1] * (x.dim() - 1)))
    return sigma


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """x_σ = (1 − σ)·x₀ + σ·ε. σ: a scalar, a tensor broadcastable to x0, or (n,) per row of x0."""
    sigma = _per_row(sigma, x0)
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = ε − x₀, the constant velocity of the straight path from x₀ (σ = 0) to ε (σ = 1)."""
    return noise - x0


class FlowMatchingLoss(nn.Module):
    """Per-token weighted MSE between predicted and target velocity, returned as (sum, weight sum).

    The sum and the weight sum stay separate so the caller can normalise globally (divide by the mean over
    ranks of the weight sums) rather than per rank. Per-token error is the mean over the token's channels.

    Args:
        weighting: optional σ-dependent factor from `diffusers.training_utils.compute_loss_weighting_for_sd3`:
            "none" (default), "sigma_sqrt" or "cosmap". It multiplies the error but is not part of the weight
            sum (as in SD3 training, where it rescales the per-token loss, not the token count).
    """

    def __init__(self, weighting: str = "none"):
        super().__init__()
        if weighting not in _LOSS_WEIGHTINGS:
            raise ConfigError(
                f"FlowMatchingLoss.weighting: unknown '{weighting}', choose one of {_LOSS_WEIGHTINGS}"
            )
        self.weighting = weighting

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weights: torch.Tensor,
        sigmas: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pred, target: (n, ...) tokens; weights: (n,); sigmas: (n,) each token's σ (needed unless "none").

        Returns float32 scalars (Σ w·err·λ(σ), Σ w).
        """
        if pred.shape != target.shape or weights.shape != pred.shape[:1]:
            raise ValueError(
                f"FlowMatchingLoss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and weights "
                f"{tuple(weights.shape)} must be (n, ...), (n, ...) and (n,)"
            )
        err = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (n,)
        w = weights.float()
        if self.weighting != "none":
            if sigmas is None:
                raise ValueError(f"FlowMatchingLoss(weighting='{self.weighting}') needs each token's sigma")
            err = err * compute_loss_weighting_for_sd3(self.weighting, sigmas=sigmas.float())
        return (err * w).sum(), w.sum()


def sampling_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """(num_steps + 1,) σ schedule from 1 down to 0 for Euler sampling, shifted like training.

    Built by `FlowMatchEulerDiscreteScheduler` from uniform σ = 1, …, 1/num_steps; it appends the final 0.
    """
    if num_steps < 1:
        raise ConfigError(f"sampling_sigmas: num_steps must be >= 1, got {num_steps}")
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps).tolist(), device="cpu")
    return sched.sigmas.float()


def euler_sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
) -> torch.Tensor:
    """Integrate dx/dσ = velocity_fn(x, σ) with Euler steps along `sigmas` (descending, ending at 0).

    Starts at x = noise (σ = sigmas[0], normally 1). The same step as `FlowMatchEulerDiscreteScheduler.step`,
    written out so it works on packed tokens of several images and inside a KV-cached generation loop.
    """
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = velocity_fn(x, s)
        x = x + (s_next - s).to(x.dtype) * v
    return x
