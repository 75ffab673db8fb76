"""Every ECTF attention backend equals attention under the reference mask (fp64, CPU, emulated FA2 kernels)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from attention_cases import (
    NOISY,
    T,
    fixed_cases,
    image,
    layout_of,
    random_qkv,
    reference_attention,
    reference_for,
    samples,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from mogao.attention import get_attention_backend
from mogao.attention.backends import attention_backend_names
from mogao.attention.fa2_emulator import entry_mask, normalize_window
from mogao.attention.flash_varlen import MODES, FlashVarlenAttention, ectf_pieces, pack_pieces
from mogao.attention.flex import padded_length
from mogao.attention.mask import ectf_mask
from mogao.errors import ConfigError
from mogao.sequence.layout import Span, TokenLayout

TOL = 1e-10
HEADS = st.sampled_from([(4, 2), (2, 2), (4, 1)])
GRADED = ("sdpa_dense", "flash_varlen")


def _run(name: str, layout: TokenLayout, text_sees_vae: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
         scale: float | None = None) -> torch.Tensor:
    backend = get_attention_backend(name)
    prepared = backend.prepare(layout, text_sees_vae)
    if name == "flex":  # FlexAttention has no CPU backward: forward only
        with torch.no_grad():
            return backend(q, k, v, prepared, scale=scale)
    return backend(q, k, v, prepared, scale=scale)


def _check_all_backends(layout: TokenLayout, text_sees_vae: bool, hq: int, hk: int, seed: int = 0) -> None:
    q, k, v = random_qkv(layout.num_tokens, hq, hk, seed=seed)
    ref = reference_for(layout, text_sees_vae, q, k, v)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    outs = {}
    for name in (*GRADED, "flex"):
        out = _run(name, layout, text_sees_vae, q, k, v)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        torch.testing.assert_close(out, ref, atol=TOL, rtol=0, msg=f"{name} output")
        outs[name] = out
        if name in GRADED:
            for label, got, want in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out), ref_grads):
                torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=f"{name} d{label}")
    for name in ("flash_varlen", "flex"):
        torch.testing.assert_close(outs[name], outs["sdpa_dense"], atol=TOL, rtol=0)


@settings(max_examples=30, deadline=None)
@given(spans=samples(), text_sees_vae=st.booleans(), heads=HEADS)
def test_backends_match_reference_on_random_packings(spans, text_sees_vae: bool, heads: tuple[int, int]) -> None:
    _check_all_backends(layout_of(spans), text_sees_vae, *heads)


@pytest.mark.parametrize("text_sees_vae", [False, True])
@pytest.mark.parametrize("case", sorted(fixed_cases()))
def test_backends_match_reference_on_edge_cases(case: str, text_sees_vae: bool) -> None:
    _check_all_backends(layout_of(fixed_cases()[case]), text_sees_vae, 4, 2, seed=1)


def _coverage(layout: TokenLayout, calls) -> torch.Tensor:
    """How many times each (row, key) pair is attended across the packed kernel calls, under FA2 semantics."""
    n = layout.num_tokens
    count = torch.zeros(n, n, dtype=torch.long)
    for c in calls:
        causal, left, right = MODES[c.mode]
        left, right = normalize_window(causal, left, right, c.max_q, c.max_k)
        cu_q, cu_k = c.cu_q.tolist(), c.cu_k.tolist()
        assert cu_q[0] == cu_k[0] == 0 and cu_q[-1] == c.q1 - c.q0 and cu_k[-1] == c.k1 - c.k0
        for b in range(len(cu_q) - 1):
            q0, q1, k0, k1 = c.q0 + cu_q[b], c.q0 + cu_q[b + 1], c.k0 + cu_k[b], c.k0 + cu_k[b + 1]
            assert q1 >= q0 and k1 >= k0
            if q1 > q0 and k1 > k0:
                count[q0:q1, k0:k1] += entry_mask(q1 - q0, k1 - k0, left, right).long()
    return count


@settings(max_examples=40, deadline=None)
@given(spans=samples(), text_sees_vae=st.booleans())
def test_kernel_calls_cover_the_mask_exactly_once(spans, text_sees_vae: bool) -> None:
    layout = layout_of(spans)
    pieces = ectf_pieces(layout, text_sees_vae)
    calls = pack_pieces(pieces)
    assert _coverage(layout, calls).equal(ectf_mask(layout, text_sees_vae).long())
    # every real piece sits in exactly one call, and a call's pieces never share rows or keys
    assert Counter(p for c in calls for p in c.pieces) == Counter(pieces)
    for c in calls:
        for a, b in zip(c.pieces, c.pieces[1:]):
            assert a.q1 <= b.q0 and a.k1 <= b.k0


def test_text_only_is_one_causal_call() -> None:
    layout = layout_of(fixed_cases()["text_only"])
    plan = FlashVarlenAttention().prepare(layout, False)
    assert [c.mode for c in plan.calls] == ["causal"]
    assert plan.calls[0].cu_q.tolist() == [0, 7, 8, 12]


def test_kernel_call_count_stays_small() -> None:
    # 2 samples with 4 generation targets: causal + upper + a handful of full calls, not one per piece
    plan = FlashVarlenAttention().prepare(layout_of(fixed_cases()["four_targets"]), False)
    assert len(plan.calls) <= 2 + 2 * 4 + 1
    assert len(plan.calls) < len(plan.pieces)


def _noisy_blocks(layout: TokenLayout) -> list[torch.Tensor]:
    ids = layout.block[layout.modality == NOISY].unique().tolist()
    return [(layout.block == b).nonzero().flatten() for b in ids]


@settings(max_examples=15, deadline=None)
@given(spans=samples(), text_sees_vae=st.booleans(), data=st.data())
def test_noisy_copies_are_isolated(spans, text_sees_vae: bool, data: st.DataObject) -> None:
    layout = layout_of(spans)
    blocks = _noisy_blocks(layout)
    if not blocks:
        return
    rows = blocks[data.draw(st.integers(0, len(blocks) - 1))]
    sample, start = int(layout.sample[rows[0]]), int(layout.order[rows].min())
    q, k, v = (x.detach() for x in random_qkv(layout.num_tokens, 4, 2, seed=2))
    inside = torch.zeros(layout.num_tokens, dtype=torch.bool)
    inside[rows] = True
    # everything at or after the image in its sample (its ViT/clean copies, later tokens), minus the copy itself
    later = (layout.sample == sample) & (layout.order >= start) & ~inside
    for name in ("sdpa_dense", "flash_varlen", "flex"):
        base = _run(name, layout, text_sees_vae, q, k, v)
        # perturbing the noisy copy changes nothing outside it
        moved = _run(name, layout, text_sees_vae, *(x.index_add(0, rows, torch.full_like(x[rows], 5.0)) for x in (q, k, v)))
        torch.testing.assert_close(moved[~inside], base[~inside], atol=1e-12, rtol=0)
        # perturbing what comes after the image changes nothing inside the copy
        idx = later.nonzero().flatten()
        moved = _run(name, layout, text_sees_vae, *(x.index_add(0, idx, torch.full_like(x[idx], 5.0)) for x in (q, k, v)))
        torch.testing.assert_close(moved[inside], base[inside], atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", ["sdpa_dense", "flash_varlen", "flex"])
def test_scale_and_non_contiguous_inputs(name: str) -> None:
    layout = layout_of(fixed_cases()["mixed_pack"])
    n = layout.num_tokens
    g = torch.Generator().manual_seed(3)
    # q, k, v as non-contiguous views, the way a fused projection might hand them over
    qkv = torch.randn(n, 3, 2, 8, generator=g, dtype=torch.float64)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    out = _run(name, layout, True, q, k, v, scale=0.3)
    want = reference_attention(q, k, v, ectf_mask(layout, True), scale=0.3)
    torch.testing.assert_close(out, want, atol=TOL, rtol=0)


def test_float32_runs_on_cpu() -> None:
    layout = layout_of(fixed_cases()["four_targets"])
    q, k, v = random_qkv(layout.num_tokens, 4, 2, dtype=torch.float32)
    want = reference_for(layout, False, q.double(), k.double(), v.double())
    for name in GRADED:
        out = _run(name, layout, False, q, k, v)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=0)
        out.sum().backward()


def test_registry_names_and_unknown_backend() -> None:
    assert attention_backend_names() == ["sdpa_dense", "flash_varlen", "flex"]
    for name in attention_backend_names():
        assert get_attention_backend(name).name == name
    with pytest.raises(ConfigError, match="sdpa_dense.*flash_varlen.*flex"):
        get_attention_backend("flash")


def test_clear_errors() -> None:
    layout = layout_of(fixed_cases()["mixed_pack"])
    q, k, v = random_qkv(layout.num_tokens, 4, 2)
    flex = get_attention_backend("flex")
    with pytest.raises(ConfigError, match="no backward on CPU"):
        flex(q, k, v, flex.prepare(layout, False))
    with pytest.raises(ConfigError, match="not available"):
        backend = FlashVarlenAttention(kernels="torch")
        backend(q, k, v, backend.prepare(layout, False))
    dense = get_attention_backend("sdpa_dense")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        dense(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), dense.prepare(layout, False))
    with pytest.raises(ValueError, match="layout has"):
        dense(q[:-1], k[:-1], v[:-1], dense.prepare(layout, False))
    with pytest.raises(TypeError, match="prepare"):
        dense(q, k, v, object())
    for name in ("sdpa_dense", "flash_varlen", "flex"):
        backend = get_attention_backend(name)
        with pytest.raises(ValueError, match="move the layout"):
            backend(*(x.detach().to("meta") for x in (q, k, v)), backend.prepare(layout, False))


def test_flash_varlen_rejects_a_non_physical_layout() -> None:
    layout = layout_of(fixed_cases()["mixed_pack"])
    perm = torch.randperm(layout.num_tokens, generator=torch.Generator().manual_seed(0))
    shuffled = TokenLayout(layout.sample[perm], layout.order[perm], layout.modality[perm], layout.block[perm],
                           layout.n_und, layout.n_gen_clean, layout.n_noisy, layout.physical_of_logical,
                           layout.sample_lengths)
    with pytest.raises(ValueError, match="physical layout"):
        FlashVarlenAttention().prepare(shuffled, False)


def test_flex_buckets() -> None:
    assert [padded_length(n) for n in (1, 128, 129, 1000, 4096, 4097, 8192, 8193)] == [
        128, 128, 256, 1024, 4096, 8192, 8192, 16384]


def test_sdpa_dense_groups_samples_by_length_and_stays_exact() -> None:
    from mogao.attention.sdpa_dense import length_groups

    assert length_groups([10, 300, 40, 160, 35, 20]) == [[1, 3], [2, 4, 5], [0]]
    assert length_groups([]) == [] and length_groups([5]) == [[0]]
    # a story-like sample beside short ones: three groups, none padded to the longest sample
    spans = [[Span(T, 3), *image(0, 6, True), Span(T, 2), *image(1, 6, True)], [Span(T, 4)], [Span(T, 5)],
             [*image(0, 2, False), Span(T, 3)], [Span(T, 1)]]
    layout = layout_of(spans)
    plan = get_attention_backend("sdpa_dense").prepare(layout, False)
    assert len(plan.groups) >= 2
    assert sum(g.gather.numel() for g in plan.groups) < len(spans) * int(torch.bincount(layout.sample).max())
    _check_all_backends(layout, False, 4, 2)
    _check_all_backends(layout, True, 2, 1, seed=1)
