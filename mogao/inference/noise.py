"""Given starting noise: what a caller may hand the generation loop in place of the seeded draw, so that a sample
can be reproduced exactly (by this loop, or from another implementation's noise)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mogao.errors import ConfigError
from mogao.model.autoencoder import patchify

NoiseInput = torch.Tensor | Sequence[torch.Tensor] | None
"""A conversation's starting noise: one tensor for its next image, a list for its next images in order, or None
(seeded). A tensor is latent tokens (gh*gw, token_dim) in the model's order (what the seeded draw makes), or a
latent (C, gh*p, gw*p) of the autoencoder (p = ModelConfig.latent_patch), patchified here - a form that does not
depend on any model's token layout, e.g. the noise of another implementation's sampler."""


def noise_queue(given: NoiseInput) -> list[torch.Tensor]:
    """The tensors of one conversation's `NoiseInput`, in the order its images use them."""
    if given is None:
        return []
    return [given] if isinstance(given, torch.Tensor) else list(given)


def noise_tokens(given: torch.Tensor, grid: tuple[int, int], token_dim: int, latent_channels: int,
                 latent_patch: int, what: str) -> torch.Tensor:
    """`given` as float32 CPU latent tokens (gh*gw, token_dim) of a `grid` image; ConfigError naming `what` and
    the shapes that fit when it does not."""
    n = grid[0] * grid[1]
    side = (grid[0] * latent_patch, grid[1] * latent_patch)
    fits = f"tokens ({n}, {token_dim}) or a latent ({latent_channels}, {side[0]}, {side[1]})"
    x = given
    if x.dim() == 3:  # a latent (C, gh*p, gw*p)
        if tuple(x.shape) != (latent_channels, *side):
            raise ConfigError(f"{what}: the given noise latent {tuple(x.shape)} does not fit the {grid[0]}x{grid[1]} "
                              f"token grid: give {fits}")
        x = patchify(x.detach().float().cpu(), latent_patch)
    if tuple(x.shape) != (n, token_dim):
        raise ConfigError(f"{what}: the given noise has shape {tuple(given.shape)}; a {grid[0]}x{grid[1]} image "
                          f"needs {fits}")
    return x.detach().float().cpu()
