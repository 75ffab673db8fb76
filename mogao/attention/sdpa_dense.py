"""`sdpa_dense`: the ECTF mask as per-sample dense boolean masks + `scaled_dot_product_attention`.

The reference backend and the CPU training path. Attention never crosses samples, so instead of one (N, N)
mask for the whole pack it gathers each sample's tokens (spread over the three physical sections) into one
row of a padded (S, L) batch, masks each sample with `ectf_allowed` on its own ids and runs a single batched
SDPA call; memory is S * L^2 booleans with L the longest sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mogao.attention.base import check_qkv
from mogao.attention.mask import ectf_allowed
from mogao.sequence.layout import TokenLayout


@dataclass
class DensePlan:
    """What `SdpaDenseAttention.prepare` builds once per batch."""

    gather: Tensor  # (S, L) physical index of the l-th token of sample s (0 where l is padding)
    mask: Tensor  # (S, 1, L, L) bool; padding rows see only themselves so no row is empty
    scatter: Tensor  # (N,) position in gather.flatten() of each physical token
    num_tokens: int


def _sample_rows(layout: TokenLayout) -> tuple[Tensor, Tensor]:
    """(S, L) physical indices of each sample's tokens and the (S, L) validity mask."""
    n = layout.num_tokens
    sample = layout.sample
    num_samples = int(sample.max()) + 1 if n else 0
    # sort by sample (stable keeps the physical order inside a sample; any order works for the mask)
    by_sample = torch.sort(sample, stable=True).indices
    counts = torch.bincount(sample, minlength=num_samples)
    longest = int(counts.max()) if n else 0
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=sample.device) - starts[sample[by_sample]]  # position inside its sample
    gather = torch.zeros(num_samples, longest, dtype=torch.long, device=sample.device)
    valid = torch.zeros(num_samples, longest, dtype=torch.bool, device=sample.device)
    gather[sample[by_sample], rank] = by_sample
    valid[sample[by_sample], rank] = True
    return gather, valid


class SdpaDenseAttention:
    """Dense masked SDPA per sample; exact, simple, memory O(S * L^2). See the module docstring."""

    name = "sdpa_dense"

    def prepare(self, layout: TokenLayout, text_sees_vae: bool) -> DensePlan:
        gather, valid = _sample_rows(layout)

        def ids(t: Tensor) -> Tensor:
            return t[gather]  # (S, L)

        s, o, m, b = ids(layout.sample), ids(layout.order), ids(layout.modality), ids(layout.block)
        allowed = ectf_allowed(
            s[:, :, None], o[:, :, None], m[:, :, None], b[:, :, None],
            s[:, None, :], o[:, None, :], m[:, None, :], b[:, None, :],
            text_sees_vae,
        )
        allowed &= valid[:, :, None] & valid[:, None, :]
        eye = torch.eye(gather.shape[1], dtype=torch.bool, device=gather.device)
        allowed |= eye & ~valid[:, :, None]  # padding rows attend to themselves only: no NaN rows
        flat_valid = valid.flatten().nonzero().flatten()
        scatter = torch.empty(layout.num_tokens, dtype=torch.long, device=gather.device)
        scatter[gather.flatten()[flat_valid]] = flat_valid
        return DensePlan(gather=gather, mask=allowed[:, None], scatter=scatter, num_tokens=layout.num_tokens)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, prepared: object, scale: float | None = None) -> Tensor:
        plan = prepared
        if not isinstance(plan, DensePlan):
            raise TypeError(f"sdpa_dense got a {type(plan).__name__} plan; call this backend's prepare() first")
        check_qkv(q, k, v, plan.num_tokens, self.name, plan.mask.device)
        if plan.num_tokens == 0:
            return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
        num_samples, longest = plan.gather.shape

        def batch(x: Tensor) -> Tensor:
            return x[plan.gather].transpose(1, 2)  # (N, H, D) -> (S, H, L, D)

        out = torch.nn.functional.scaled_dot_product_attention(
            batch(q), batch(k), batch(v), attn_mask=plan.mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )  # (S, Hq, L, D)
        out = out.transpose(1, 2).reshape(num_samples * longest, q.shape[1], v.shape[2])
        return out[plan.scatter]
