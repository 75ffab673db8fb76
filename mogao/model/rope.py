"""Interleaved 3-D RoPE (IL-RoPE): positions (T, H, W) per token, one frequency split shared by every layer.

With F = head_dim / 2 rotary frequencies (highest first, as the LLM's `inv_freq`), the first 3*(F//4)
frequencies are assigned to T, H, W in turn (T, H, W, T, H, W, ...) and the remaining lowest frequencies
all go to T (the "interleaved" split; "hw_high" gives H and W the highest frequencies instead). A text token has
position (t, t, t), so on text alone every frequency sees t and IL-RoPE is exactly the LLM's own 1-D RoPE - which is what lets the backbone reproduce the source model's logits.
"""

from __future__ import annotations

import torch
from torch import nn

ROPE_AXES = ("interleaved", "hw_high")


def frequency_axes(num_freqs: int, split: str = "interleaved") -> torch.Tensor:
    """Axis (0=T, 1=H, 2=W) of each rotary frequency (highest first); shape (num_freqs,). H and W take
    num_freqs // 4 frequencies each under either split: "interleaved" gives the first 3*(num_freqs//4) to
    T, H, W in turn; "hw_high" gives the first 2*(num_freqs//4) to H, W in turn (the sharpest for image cells)."""
    if split not in ROPE_AXES:
        raise ValueError(f"rope axes split must be one of {', '.join(ROPE_AXES)}, got {split!r}")
    axes = torch.zeros(num_freqs, dtype=torch.long)
    if split == "interleaved":
        n = 3 * (num_freqs // 4)
        axes[:n] = torch.arange(n) % 3
    else:
        n = 2 * (num_freqs // 4)
        axes[:n] = 1 + torch.arange(n) % 2
    return axes


class InterleavedRope(nn.Module):
    """Turns (3, N) IL-RoPE positions into the (cos, sin) tables of HF's rotate-half convention.

    `inv_freq` and `attention_scaling` are taken from the LLM's own rotary module, so RoPE variants the
    LLM config selects (e.g. Llama-3 frequency scaling) are inherited unchanged.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0, axes: str = "interleaved") -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().float().clone(), persistent=False)
        self.register_buffer("axes", frequency_axes(inv_freq.numel(), axes), persistent=False)
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
