"""`sdpa_dense`: the ECTF mask as per-sample dense boolean masks + `scaled_dot_product_attention`.

The reference backend and the CPU training path. Attention never crosses samples, so instead of one (N, N)
mask for the whole pack it gathers each sample's tokens (spread over the three physical sections) into one
row of a padded batch, masks each sample with `ectf_allowed` on its own ids and runs batched SDPA. A pack mixes
long samples (a five-image story) with many short ones (a caption, a digit), and one padded batch would pad
every short sample to the longest: samples are grouped by length instead (`length_groups`: sorted, a new group
where a sample is shorter than `GROUP_RATIO` of its group's longest) and each group is one SDPA call, so the
work is close to the sum of the samples' squared lengths. Memory: sum over groups of S_g * L_g^2 booleans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mogao.attention.base import check_qkv
from mogao.attention.mask import ectf_allowed
from mogao.sequence.layout import TokenLayout

GROUP_RATIO = 0.5
"""A sample shorter than this share of its group's longest sample starts a new group."""


@dataclass
class DenseGroup:
    """Samples of similar length, padded to the longest: one SDPA call."""

    gather: Tensor  # (S, L) physical index of the l-th token of the group's s-th sample (0 where l is padding)
    mask: Tensor  # (S, 1, L, L) bool; padding rows see only themselves so no row is empty


@dataclass
class DensePlan:
    """What `SdpaDenseAttention.prepare` builds once per batch."""

    groups: list[DenseGroup]
    scatter: Tensor  # (N,) position of each physical token in the groups' flattened outputs, concatenated
    num_tokens: int


def length_groups(lengths: list[int], ratio: float = GROUP_RATIO) -> list[list[int]]:
    """Sample indices grouped by length: longest first, a new group where a sample is shorter than `ratio` of
    the longest of the current group."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if not groups or lengths[i] < ratio * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(i)
    return groups


def _sample_rows(layout: TokenLayout, samples: Tensor) -> tuple[Tensor, Tensor]:
    """(S, L) physical indices of the tokens of `samples` (sample ids, one row each) and the (S, L) validity
    mask."""
    n = layout.num_tokens
    sample = layout.sample
    num_samples = int(sample.max()) + 1 if n else 0
    row_of = torch.full((num_samples,), -1, dtype=torch.long, device=sample.device)
    row_of[samples] = torch.arange(len(samples), device=sample.device)
    mine = (row_of[sample] >= 0).nonzero().flatten() if n else sample.new_zeros(0)
    # sort by row (stable keeps the physical order inside a sample; any order works for the mask)
    rows = row_of[sample[mine]]
    by_row = mine[torch.sort(rows, stable=True).indices]
    rows = row_of[sample[by_row]]
    counts = torch.bincount(rows, minlength=len(samples))
    longest = int(counts.max()) if len(rows) else 0
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(rows), device=sample.device) - starts[rows]  # position inside its sample
    gather = torch.zeros(len(samples), longest, dtype=torch.long, device=sample.device)
    valid = torch.zeros(len(samples), longest, dtype=torch.bool, device=sample.device)
    gather[rows, rank] = by_row
    valid[rows, rank] = True
    return gather, valid


def _batched(x: Tensor, gather: Tensor) -> Tensor:
    """(N, H, D) physical rows -> (S, H, L, D) by the (S, L) gather; index_select's backward is an index_add."""
    return x.index_select(0, gather.flatten()).view(*gather.shape, *x.shape[1:]).transpose(1, 2)


class SdpaDenseAttention:
    """Dense masked SDPA per sample; exact, simple, memory O(S * L^2). See the module docstring."""

    name = "sdpa_dense"

    def prepare(self, layout: TokenLayout, text_sees_vae: bool) -> DensePlan:
        dev = layout.sample.device
        scatter = torch.empty(layout.num_tokens, dtype=torch.long, device=dev)
        if not layout.num_tokens:
            return DensePlan(groups=[], scatter=scatter, num_tokens=0)
        lengths = torch.bincount(layout.sample).tolist()
        groups, offset = [], 0
        for members in length_groups(lengths):
            gather, valid = _sample_rows(layout, torch.tensor(members, device=dev))
            s, o, m, b = (t[gather] for t in (layout.sample, layout.order, layout.modality, layout.block))  # (S, L)
            allowed = ectf_allowed(
                s[:, :, None], o[:, :, None], m[:, :, None], b[:, :, None],
                s[:, None, :], o[:, None, :], m[:, None, :], b[:, None, :],
                text_sees_vae,
            )
            allowed &= valid[:, :, None] & valid[:, None, :]
            eye = torch.eye(gather.shape[1], dtype=torch.bool, device=dev)
            allowed |= eye & ~valid[:, :, None]  # padding rows attend to themselves only: no NaN rows
            flat_valid = valid.flatten().nonzero().flatten()
            scatter[gather.flatten()[flat_valid]] = flat_valid + offset
            offset += gather.numel()
            groups.append(DenseGroup(gather=gather, mask=allowed[:, None]))
        return DensePlan(groups=groups, scatter=scatter, num_tokens=layout.num_tokens)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, prepared: object, scale: float | None = None) -> Tensor:
        plan = prepared
        if not isinstance(plan, DensePlan):
            raise TypeError(f"sdpa_dense got a {type(plan).__name__} plan; call this backend's prepare() first")
        check_qkv(q, k, v, plan.num_tokens, self.name, plan.scatter.device)
        if plan.num_tokens == 0:
            return q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
        outs = []
        for g in plan.groups:
            num_samples, longest = g.gather.shape
            out = torch.nn.functional.scaled_dot_product_attention(
                _batched(q, g.gather), _batched(k, g.gather), _batched(v, g.gather), attn_mask=g.mask, scale=scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )  # (S, Hq, L, D)
            outs.append(out.transpose(1, 2).reshape(num_samples * longest, q.shape[1], v.shape[2]))
        return torch.cat(outs).index_select(0, plan.scatter)
