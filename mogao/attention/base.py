"""What every ECTF attention backend shares: the one interface (`EctfAttention`) and the input checks.

All backends compute exactly `softmax(q k^T * scale + mask) v` with the reference mask of
`mogao.attention.mask.ectf_mask`; they differ only in how (dense SDPA, FlashAttention-2 varlen pieces,
FlexAttention). Tokens arrive in the packed batch's PHYSICAL order (`TokenLayout`), so the deep-fusion
experts can work on contiguous slices and the attention never needs to permute.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from mogao.sequence.layout import TokenLayout


@runtime_checkable
class EctfAttention(Protocol):
    """Attention over a packed batch under the ECTF mask.

    `prepare` runs once per batch (its result is shared by all layers) and may build masks, cu_seqlens or a
    BlockMask on the layout's device; `__call__` runs per layer.
    """

    name: str

    def prepare(self, layout: TokenLayout, text_sees_vae: bool) -> object: ...

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, prepared: object, scale: float | None = None) -> Tensor:
        """q: (N, Hq, D), k/v: (N, Hk, D) with Hq % Hk == 0, physical order -> (N, Hq, D). Differentiable."""
        ...


def check_qkv(q: Tensor, k: Tensor, v: Tensor, num_tokens: int, backend: str, plan_device: torch.device) -> None:
    """Checks shared by the backends, so a wrong shape or device fails here with a readable message."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"{backend}: q, k, v must be (tokens, heads, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.shape[0] == k.shape[0] == v.shape[0] == num_tokens):
        raise ValueError(
            f"{backend}: the layout has {num_tokens} tokens but q, k, v have {q.shape[0]}, {k.shape[0]}, "
            f"{v.shape[0]}; prepare() must be called with this batch's layout"
        )
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"{backend}: query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]}, "
            f"{v.shape[1]})"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{backend}: q head_dim {q.shape[2]} != k head_dim {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"{backend}: q, k, v must share dtype and device; got {q.dtype}/{k.dtype}/{v.dtype}")
    if q.device != plan_device:
        raise ValueError(
            f"{backend}: prepare() built this batch's plan on {plan_device} but q is on {q.device}; "
            "move the layout first (layout.to(device))"
        )
