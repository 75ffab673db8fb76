"""The FA2 varlen emulator reproduces FlashAttention-2's conventions, checked on small hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from mogao.attention import fa2_emulator as emu
from mogao.attention.fa2_ops import EMULATOR, select_kernels

INF = float("inf")


def _cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _dense_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool, left: int, right: int) -> torch.Tensor:
    """The (Tq, Tk) mask the emulator should apply, stitched from per-entry masks."""
    qs, ks = cu_q.tolist(), cu_k.tolist()
    max_q = max(b - a for a, b in zip(qs, qs[1:]))
    max_k = max(b - a for a, b in zip(ks, ks[1:]))
    wl, wr = emu.normalize_window(causal, left, right, max_q, max_k)
    mask = torch.zeros(qs[-1], ks[-1], dtype=torch.bool)
    for b in range(len(qs) - 1):
        mask[qs[b]:qs[b + 1], ks[b]:ks[b + 1]] = emu.entry_mask(qs[b + 1] - qs[b], ks[b + 1] - ks[b], wl, wr)
    return mask


def _masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                      ) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = s.masked_fill(~mask, -INF)
    p = torch.nan_to_num(s.softmax(-1), nan=0.0)  # empty rows: 0, as FA2 writes them
    return torch.einsum("hqk,khd->qhd", p, v)


def _qkv(tq: int, tk: int, hq: int = 2, hk: int = 2, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, h, d, generator=g, dtype=torch.float64).requires_grad_() for t, h in
            ((tq, hq), (tk, hk), (tk, hk)))


def test_bottom_right_causal_with_fewer_queries_than_keys() -> None:
    # sq=2, sk=4: the last query lines up with the last key
    assert emu.entry_mask(2, 4, *emu.normalize_window(True, -1, -1, 2, 4)).tolist() == [
        [True, True, True, False], [True, True, True, True]]


def test_bottom_right_causal_with_more_queries_than_keys_leaves_empty_rows() -> None:
    mask = emu.entry_mask(4, 2, *emu.normalize_window(True, -1, -1, 4, 2))
    assert mask.tolist() == [[False, False], [False, False], [True, False], [True, True]]
    q, k, v = _qkv(4, 2)
    out, lse = emu.varlen_fwd(q, k, v, _cu(4), _cu(2), 4, 2, True, -1, -1, 0.5)
    assert out[:2].abs().max() == 0
    assert lse[:, :2].eq(INF).all() and lse[:, 2:].isfinite().all()
    # a visible row: lse is the natural-log sum over the scaled scores
    want = torch.logsumexp((q[3][:, None] * k[:2].transpose(0, 1)).sum(-1) * 0.5, dim=-1)  # (H,)
    torch.testing.assert_close(lse[:, 3], want)


def test_windows() -> None:
    # (0, -1) on a square entry: the upper triangle including the diagonal
    assert emu.entry_mask(3, 3, *emu.normalize_window(False, 0, -1, 3, 3)).tolist() == [
        [True, True, True], [False, True, True], [False, False, True]]
    # sliding causal window of one key to the left
    assert emu.entry_mask(3, 3, *emu.normalize_window(True, 1, -1, 3, 3)).tolist() == [
        [True, False, False], [True, True, False], [False, True, True]]
    # window sides >= max_k are unlimited
    assert emu.normalize_window(False, 5, 7, 4, 5) == (-1, -1)
    # causal forces right = 0, and with one query row it changes nothing
    assert emu.normalize_window(True, -1, -1, 3, 3) == (-1, 0)
    assert emu.normalize_window(True, -1, -1, 1, 3) == (-1, -1)
    # FA2 runs a finite left with an unlimited right as right = max_k: with sq > sk + max_k early rows see nothing
    assert emu.normalize_window(False, 0, -1, 10, 3) == (0, 3)
    assert not emu.entry_mask(10, 3, 0, 3)[0].any()


def test_zero_length_entries() -> None:
    # entries: (q 0, k 2) | (q 3, k 0) | (q 2, k 3)
    cu_q, cu_k = torch.tensor([0, 0, 3, 5], dtype=torch.int32), torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    q, k, v = _qkv(5, 5)
    out, lse = emu.varlen_fwd(q, k, v, cu_q, cu_k, 3, 3, False, -1, -1, 0.3)
    assert lse.shape == (2, 5) and lse.dtype == torch.float64
    assert out[:3].abs().max() == 0 and lse[:, :3].eq(INF).all()
    torch.testing.assert_close(out[3:], _masked_reference(q[3:], k[2:], v[2:], torch.ones(2, 3, dtype=torch.bool), 0.3))
    dq, dk, dv = emu.varlen_bwd(torch.ones_like(out), q, k, v, out, lse, cu_q, cu_k, 3, 3, False, -1, -1, 0.3)
    assert dq[:3].abs().max() == 0 and dk[:2].abs().max() == 0 and dv[:2].abs().max() == 0


def test_lse_layout_and_dtypes() -> None:
    q, k, v = (x.detach().float() for x in _qkv(6, 6, hq=4, hk=2))
    out, lse = emu.varlen_fwd(q, k, v, _cu(2, 4), _cu(2, 4), 4, 4, True, -1, -1, 0.35)
    assert out.shape == (6, 4, 8) and out.dtype == torch.float32
    assert lse.shape == (4, 6) and lse.dtype == torch.float32  # (Hq, total_q), FA2's unpadded varlen layout
    out16, lse16 = emu.varlen_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), _cu(2, 4), _cu(2, 4), 4, 4, True, -1,
                                  -1, 0.35)
    assert out16.dtype == torch.bfloat16 and lse16.dtype == torch.float32


CASES = [  # (q lengths, k lengths, causal, window_left, window_right)
    ((3, 5), (3, 5), True, -1, -1),
    ((2, 4), (5, 3), True, -1, -1),  # sq < sk and sq > sk (with empty rows)
    ((4, 3), (4, 3), False, 0, -1),
    ((4, 0, 3), (2, 3, 3), False, -1, -1),
    ((5,), (5,), True, 2, -1),
    ((3, 3), (3, 3), False, 1, 1),
]


@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_forward_and_backward_match_autograd(case, heads: tuple[int, int]) -> None:
    q_lens, k_lens, causal, left, right = case
    cu_q, cu_k = _cu(*q_lens), _cu(*k_lens)
    q, k, v = _qkv(sum(q_lens), sum(k_lens), *heads)
    scale = 1 / math.sqrt(8)
    max_q, max_k = max(q_lens), max(k_lens)
    out, lse = emu.varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, left, right, scale)
    ref = _masked_reference(q, k, v, _dense_mask(cu_q, cu_k, causal, left, right), scale)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    got = emu.varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, left, right, scale)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_backward_with_a_merged_lse_splits_the_gradient_exactly() -> None:
    # one softmax over 6 keys, computed as two calls over keys [0, 2) and [2, 6) and merged by log-sum-exp
    q, k, v = _qkv(3, 6, 4, 2)
    scale = 0.4
    full = _masked_reference(q, k, v, torch.ones(3, 6, dtype=torch.bool), scale)
    parts = [emu.varlen_fwd(q, k[a:b], v[a:b], _cu(3), _cu(b - a), 3, b - a, False, -1, -1, scale)
             for a, b in ((0, 2), (2, 6))]
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    out = sum(o * torch.exp(p_lse - lse).transpose(0, 1)[..., None] for o, p_lse in parts)
    torch.testing.assert_close(out, full, atol=1e-12, rtol=0)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(full, (q, k, v), dout)
    g0 = emu.varlen_bwd(dout, q, k[:2], v[:2], out, lse, _cu(3), _cu(2), 3, 2, False, -1, -1, scale)
    g1 = emu.varlen_bwd(dout, q, k[2:], v[2:], out, lse, _cu(3), _cu(4), 3, 4, False, -1, -1, scale)
    torch.testing.assert_close(g0[0] + g1[0], want[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat([g0[1], g1[1]]), want[1], atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.cat([g0[2], g1[2]]), want[2], atol=1e-12, rtol=0)


def test_cpu_selects_the_emulator() -> None:
    assert select_kernels("cpu", torch.float64) is EMULATOR
    assert select_kernels("cpu", torch.bfloat16) is EMULATOR


def test_flash_attn_keyword_arguments_fit_old_and_new_signatures() -> None:
    from mogao.attention.fa2_ops import _fa_kwargs

    def fwd_26(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size=(-1, -1),
               softcap=0.0, alibi_slopes=None, return_softmax=False, block_table=None):
        pass

    def fwd_27(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size_left=-1,
               window_size_right=-1, softcap=0.0, alibi_slopes=None, return_softmax=False, block_table=None,
               leftpad_k=None, seqused_k=None):
        pass

    class CustomOp:  # how torch.library.custom_op exposes the wrapped function
        _init_fn = staticmethod(fwd_27)

    old = _fa_kwargs(fwd_26, 0.1, True, 0, -1)
    assert old["window_size"] == (0, -1) and "window_size_left" not in old and old["block_table"] is None
    for fn in (fwd_27, CustomOp()):
        new = _fa_kwargs(fn, 0.1, True, 0, -1)
        assert (new["window_size_left"], new["window_size_right"]) == (0, -1) and "window_size" not in new
        assert new["seqused_k"] is None and new["softmax_scale"] == 0.1 and new["dropout_p"] == 0.0
