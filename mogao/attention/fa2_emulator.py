"""A pure-PyTorch stand-in for the FlashAttention-2 varlen kernels, with their exact masking semantics.

The `flash_varlen` backend composes the ECTF mask out of several FA2 varlen calls whose correctness hinges on
FA2's conventions (bottom-right aligned causal masks and windows, empty rows returning lse = +inf, zero-length
batch entries, the unpadded (heads, total_q) lse layout, a backward that takes the forward's out and lse instead
of differentiating through it). The real kernels only run on CUDA in fp16/bf16, so this module reproduces those
conventions on any device and dtype; CPU tests of the decomposition run against it, and GPU tests check the real
kernels against it.

Semantics reproduced (FlashAttention 2.x `mha_varlen_fwd` / `mha_varlen_bwd`):
- batch entry b has queries [cu_q[b], cu_q[b+1]) and keys [cu_k[b], cu_k[b+1]); either may be empty.
- `causal` forces window_right = 0 (and is dropped when max_q == 1, where it changes nothing); a window side
  >= max_k counts as unlimited (-1); a finite left side with an unlimited right side runs with right = max_k.
- with sq, sk the entry's lengths, query i may see key j iff
  j >= i + sk - sq - left (when left is finite) and j <= i + sk - sq + right (when right is finite).
- rows with no visible key get out = 0 and lse = +inf.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # FA2 accumulates in fp32; fp64 inputs stay fp64 so CPU tests can check results to 1e-10.
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_window(causal: bool, window_left: int, window_right: int, max_q: int, max_k: int) -> tuple[int, int]:
    """The (left, right) window FA2 actually applies; -1 = no limit on that side."""
    if max_q == 1:
        causal = False  # a single query row sees every key either way (bottom-right alignment)
    if causal:
        window_right = 0
    if window_left >= max_k:
        window_left = -1
    if window_right >= max_k:
        window_right = -1
    # FA2 runs a finite left side with an unlimited right side as a local window with right = max_k, which
    # can hide keys from the first rows when sq > sk + max_k. (An unlimited left side becomes left = max_k,
    # which never hides a key, so it stays -1 here.)
    if window_left >= 0 and window_right < 0:
        window_right = max_k
    return window_left, window_right


def entry_mask(sq: int, sk: int, window_left: int, window_right: int, device: torch.device | str = "cpu") -> Tensor:
    """(sq, sk) bool: which keys each query of one batch entry sees, for a normalized window."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    diag = i + sk - sq  # bottom-right alignment: the last query lines up with the last key
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        allowed &= j >= diag - window_left
    if window_right >= 0:
        allowed &= j <= diag + window_right
    return allowed


def _entries(cu_q: Tensor, cu_k: Tensor) -> list[tuple[int, int, int, int]]:
    qs, ks = cu_q.tolist(), cu_k.tolist()
    if len(qs) != len(ks):
        raise ValueError(f"cu_seqlens_q has {len(qs)} entries but cu_seqlens_k has {len(ks)}")
    return [(qs[b], qs[b + 1], ks[b], ks[b + 1]) for b in range(len(qs) - 1)]


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # (sk, Hk, D) -> (sk, Hq, D): query head h uses kv head h // groups, as in FA2
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def varlen_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    causal: bool, window_left: int, window_right: int, scale: float,
) -> tuple[Tensor, Tensor]:
    """FA2 varlen forward. q: (Tq, Hq, D), k/v: (Tk, Hk, D) -> out (Tq, Hq, D) in q.dtype, lse (Hq, Tq).

    lse is fp32 as in FA2, or fp64 for fp64 inputs.
    """
    tq, hq, d = q.shape
    groups = hq // k.shape[1]
    cdt = _compute_dtype(q.dtype)
    left, right = normalize_window(causal, window_left, window_right, max_q, max_k)
    out = torch.zeros(tq, hq, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((hq, tq), float("inf"), dtype=cdt, device=q.device)
    for q0, q1, k0, k1 in _entries(cu_q, cu_k):
        if q1 <= q0 or k1 <= k0:
            continue  # empty rows keep out = 0, lse = +inf
        qe = q[q0:q1].to(cdt).transpose(0, 1)  # (Hq, sq, D)
        ke = _expand_kv(k[k0:k1], groups).to(cdt).transpose(0, 1)  # (Hq, sk, D)
        ve = _expand_kv(v[k0:k1], groups).to(cdt).transpose(0, 1)
        allowed = entry_mask(q1 - q0, k1 - k0, left, right, q.device)
        s = (qe @ ke.transpose(1, 2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # (Hq, sq); -inf for empty rows
        empty = torch.isneginf(row_lse)
        p = torch.exp(s - row_lse.masked_fill(empty, 0.0)[..., None])
        out[q0:q1] = (p @ ve).transpose(0, 1)
        lse[:, q0:q1] = row_lse.masked_fill(empty, float("inf"))
    lse = lse if cdt == torch.float64 else lse.float()
    return out.to(q.dtype), lse


def varlen_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    causal: bool, window_left: int, window_right: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """FA2 varlen backward from (dout, q, k, v, out, lse), without autograd through the forward.

    Like FA2 it recomputes P = exp(S * scale - lse) and D = rowsum(dout * out), so the caller may pass an out and
    lse that belong to a larger softmax than this call's keys (the LSE-merge pattern). Returns dq (Tq, Hq, D) and
    dk, dv (Tk, Hk, D) summed over each kv head's query group.
    """
    tq, hq, d = q.shape
    tk, hk = k.shape[0], k.shape[1]
    groups = hq // hk
    cdt = _compute_dtype(q.dtype)
    left, right = normalize_window(causal, window_left, window_right, max_q, max_k)
    dq = torch.zeros(tq, hq, d, dtype=cdt, device=q.device)
    dk = torch.zeros(tk, hq, d, dtype=cdt, device=q.device)  # per query head, summed over groups at the end
    dv = torch.zeros(tk, hq, v.shape[-1], dtype=cdt, device=q.device)
    for q0, q1, k0, k1 in _entries(cu_q, cu_k):
        if q1 <= q0 or k1 <= k0:
            continue
        qe = q[q0:q1].to(cdt).transpose(0, 1)  # (Hq, sq, D)
        ke = _expand_kv(k[k0:k1], groups).to(cdt).transpose(0, 1)  # (Hq, sk, D)
        ve = _expand_kv(v[k0:k1], groups).to(cdt).transpose(0, 1)
        doe = dout[q0:q1].to(cdt).transpose(0, 1)  # (Hq, sq, D)
        oe = out[q0:q1].to(cdt).transpose(0, 1)
        row_lse = lse[:, q0:q1].to(cdt)  # (Hq, sq)
        allowed = entry_mask(q1 - q0, k1 - k0, left, right, q.device)
        s = (qe @ ke.transpose(1, 2)) * scale
        p = torch.exp(s - row_lse[..., None]).masked_fill(~allowed, 0.0)  # (Hq, sq, sk)
        delta = (doe * oe).sum(-1, keepdim=True)  # (Hq, sq, 1)
        dp = doe @ ve.transpose(1, 2)
        ds = p * (dp - delta)
        dq[q0:q1] = (ds @ ke * scale).transpose(0, 1)
        dk[k0:k1] = (ds.transpose(1, 2) @ qe * scale).transpose(0, 1)
        dv[k0:k1] = (p.transpose(1, 2) @ doe).transpose(0, 1)
    if groups > 1:
        dk = dk.reshape(tk, hk, groups, d).sum(2)
        dv = dv.reshape(tk, hk, groups, dv.shape[-1]).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
