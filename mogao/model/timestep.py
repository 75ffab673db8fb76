"""Timestep conditioning of noisy VAE tokens: σ -> embedding, and the two ways it enters the model.

- `AdaLNModulation` (Mogao): the generation expert's layers scale/shift their normalised inputs and gate their
  residual branches per token, from the token's σ embedding.
- `AdditiveTimestep`: the σ embedding is added to the VAE tokens' inputs once (BAGEL's way; BAGEL's own
  embedder is a `TimestepEmbedder` of scale 1, added as it is: `ModelConfig.timestep_embedding`).

Both start as no-ops, so a freshly built generation expert (a copy of the LLM layers) computes exactly what
the LLM layer computes. (BAGEL's embedder, added as it is, does not: its weights come from a checkpoint.)
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


class TimestepEmbedder(nn.Module):
    """σ in [0, 1] (M,) -> embedding (M, hidden): sinusoidal features of scale·σ, then an MLP (diffusers).

    With h = freq_dim / 2 and f_k = 10000^(-k/h), the features are [cos(scale·σ·f_k), sin(scale·σ·f_k)]
    (cos first), then Linear(freq_dim, hidden) -> SiLU -> Linear(hidden, hidden). The default scale 1000 puts
    σ on the timestep range the frequencies were designed for (SD3/FLUX do the same); BAGEL embeds σ itself
    (scale 1: `ModelConfig.timestep_embedding = "bagel"`). The sinusoid is computed in float32; the MLP runs in
    its own dtype.
    """

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(freq_dim, hidden)
        self.scale = float(scale)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        feats = self.freq(sigma.reshape(-1).float() * self.scale)  # (M, freq_dim)
        return self.mlp(feats.to(self.mlp.linear_1.weight.dtype))


class AdaLNModulation(nn.Module):
    """SiLU -> Linear(cond_dim, 6*hidden), zero-initialised: the per-token AdaLN parameters of one layer.

    Returns (shift_attn, scale_attn, gate_attn, shift_mlp, scale_mlp, gate_mlp), each (M, hidden). They are
    applied as `modulate(norm(x), shift, scale) = norm(x) * (1 + scale) + shift` and
    `gated_residual(x, branch, gate) = x + (1 + gate) * branch`.

    Why (1 + gate) and not DiT's adaLN-Zero `gate * branch`: adaLN-Zero makes every block the identity at
    init, which would throw away the copied LLM layer. With (1 + scale) and (1 + gate), all-zero modulation
    leaves the layer exactly as it was, so the generation expert starts as an exact copy of the LLM layer
    and the timestep only gradually bends it.
    """

    def __init__(self, cond_dim: int, hidden: int):
        super().__init__()
        self.act = nn.SiLU()
        self.linear = nn.Linear(cond_dim, 6 * hidden)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """cond (M, cond_dim) -> six tensors (M, hidden)."""
        return tuple(self.linear(self.act(cond)).chunk(6, dim=-1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN's affine modulation; the identity when shift = scale = 0."""
    return x * (1 + scale) + shift


def gated_residual(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + (1 + gate) * branch: the plain residual when gate = 0 (see `AdaLNModulation`)."""
    return x + (1 + gate) * branch


class AdditiveTimestep(nn.Module):
    """σ (M,) -> (M, hidden) to add to the noisy VAE tokens' input embeddings (BAGEL's conditioning).

    The embedder's last layer starts at zero, so adding it is a no-op at init.
    """

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.embedder = TimestepEmbedder(hidden, freq_dim)
        nn.init.zeros_(self.embedder.mlp.linear_2.weight)
        nn.init.zeros_(self.embedder.mlp.linear_2.bias)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.embedder(sigma)
