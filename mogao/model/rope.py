"""Interleaved 3-D RoPE (IL-RoPE): positions (T, H, W) per token, one frequency split shared by every layer.

With F = head_dim / 2 rotary frequencies (highest first, as the LLM's `inv_freq`), the first 3*(F//4)
frequencies are assigned to T, H, W in turn (T, H, W, T, H, W, ...) and the remaining lowest frequencies
all go to T. A text token has position (t, t, t), so on text alone every frequency sees t and IL-RoPE is
exactly the LLM's own 1-D RoPE - which is what lets the backbone reproduce the source model's logits.
"""

from __future__ import annotations

import torch
from torch import nn


def frequency_axes(num_freqs: int) -> torch.Tensor:
    """Axis (0=T, 1=H, 2=W) of each rotary frequency; shape (num_freqs,)."""
    n_interleaved = 3 * (num_freqs // 4)
    axes = torch.zeros(num_freqs, dtype=torch.long)
    axes[:n_interleaved] = torch.arange(n_interleaved) % 3
    return axes


class InterleavedRope(nn.Module):
    """Turns (3, N) IL-RoPE positions into the (cos, sin) tables of HF's rotate-half convention.

    `inv_freq` and `attention_scaling` are taken from the LLM's own rotary module, so RoPE variants the
    LLM config selects (e.g. Llama-3 frequency scaling) are inherited unchanged.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.register_buffer("axes", frequency_axes(inv_freq.numel()), persistent=False)
        self.attention_scaling = float(attention_scaling)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (3, N) -> per-frequency position (N, F), angles in fp32 for accuracy
        pos = position_ids.float().index_select(0, self.axes).transpose(0, 1)
        angles = pos * self.inv_freq[None, :]
        emb = torch.cat((angles, angles), dim=-1)  # (N, head_dim)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (N, H, D); cos/sin: (N, D). The result keeps x's dtype (under autocast q and k come out of the
    projections in bf16 while cos/sin follow the fp32 residual stream; v stays bf16)."""
    return (x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]).to(x.dtype)
