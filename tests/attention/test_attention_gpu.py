"""Real FlashAttention-2 kernels and compiled FlexAttention on CUDA (skipped without a GPU).

bf16 rule (FlashAttention's own test rule): measured against an fp32 dense reference, a backend's error may be
at most 2x (dq: 3x) the error of a pure-PyTorch dense implementation run in bf16.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import T as TEXT
from attention_cases import fixed_cases, image, layout_of, reference_attention

from mogao.attention import fa2_emulator as emu
from mogao.attention import get_attention_backend
from mogao.attention.fa2_ops import _available, select_kernels
from mogao.attention.flash_varlen import FlashVarlenAttention
from mogao.attention.mask import ectf_mask
from mogao.sequence.layout import Span, TokenLayout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = torch.device("cuda")
KERNELS = [k for k in ("torch", "flash_attn") if torch.cuda.is_available() and _available(k, DEV)]
D = 64


def _big_layout() -> TokenLayout:
    """A few hundred to a few thousand tokens: several samples, conditions, targets, text between them."""
    return layout_of([
        [Span(TEXT, 37)] + image(0, 256, True, vit_size=64) + [Span(TEXT, 20)] + image(1, 128, True, vit_size=32)
        + [Span(TEXT, 11)] + image(2, 64, False, vit_size=16) + [Span(TEXT, 5)],
        image(0, 64, False, vit_size=64) + [Span(TEXT, 90)] + image(1, 100, True) + image(2, 1, True),
        [Span(TEXT, 300)],
        [Span(TEXT, 3)] + image(0, 33, True, vit_size=7) + [Span(TEXT, 1)] + image(1, 1, True, vit_size=1),
    ])


def _qkv(n: int, hq: int, hk: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(torch.randn(n, h, D, generator=g, device=DEV, dtype=torch.float32) for h in (hq, hk, hk))


def _cu(*lengths: int) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest magnitude: bf16 kernels round P and dS, so per-element rtol misleads."""
    scale = want.float().abs().max().clamp_min(1e-6)
    return ((got.float() - want.float()).abs().max() / scale).item()


RAW_CASES = [  # (q lengths, k lengths, causal, window_left, window_right)
    ((130, 70), (130, 70), True, -1, -1),
    ((40, 200), (90, 120), True, -1, -1),  # bottom-right with sq < sk and sq > sk (empty rows)
    ((129, 65), (129, 65), False, 0, -1),
    ((0, 77, 0, 50), (33, 0, 64, 50), False, -1, -1),  # zero-length q and k entries
    ((1, 0, 1), (5, 7, 9), False, -1, -1),
]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", RAW_CASES, ids=[str(i) for i in range(len(RAW_CASES))])
def test_real_kernels_match_the_emulator(kernels: str, heads: tuple[int, int], case) -> None:
    q_lens, k_lens, causal, left, right = case
    ops = select_kernels(DEV, torch.bfloat16, kernels)
    q, k, v = (x.bfloat16() for x in _qkv(sum(q_lens), *heads)[:1] + _qkv(sum(k_lens), *heads)[1:])
    cu_q, cu_k = _cu(*q_lens), _cu(*k_lens)
    max_q, max_k = max(2, max(q_lens)), max(k_lens)
    args = (cu_q, cu_k, max_q, max_k, causal, left, right, D ** -0.5)
    out, lse = ops.varlen_fwd(q, k, v, *args)
    out_e, lse_e = emu.varlen_fwd(q, k, v, *args)
    assert lse.shape == lse_e.shape == (heads[0], sum(q_lens)) and lse.dtype == torch.float32
    empty = lse_e == float("inf")
    assert torch.equal(lse == float("inf"), empty)
    torch.testing.assert_close(lse[~empty], lse_e[~empty], atol=2e-2, rtol=0)
    assert _rel_err(out, out_e) < 2e-2
    assert not out.transpose(0, 1)[empty].any()  # empty rows are exactly 0
    # backward from the kernel's own out/lse, on rows that have keys (the merge never passes +inf rows)
    dout = torch.randn_like(out)
    lse_b = lse.masked_fill(empty, 0.0).contiguous()
    dq, dk, dv = ops.varlen_bwd(dout, q, k, v, out, lse_b, *args)
    dq_e, dk_e, dv_e = emu.varlen_bwd(dout, q, k, v, out, lse_b, *args)
    for name, got, want in (("dq", dq, dq_e), ("dk", dk, dk_e), ("dv", dv, dv_e)):
        assert got.shape == want.shape
        assert _rel_err(got, want) < 3e-2, name


def _bf16_rule(layout: TokenLayout, text_sees_vae: bool, run, heads: tuple[int, int] = (8, 2)) -> None:
    """run(q, k, v) -> out, with bf16 q/k/v requiring grad."""
    mask = ectf_mask(layout, text_sees_vae).to(DEV)
    q32, k32, v32 = (x.requires_grad_() for x in _qkv(layout.num_tokens, *heads, seed=1))
    ref = reference_attention(q32, k32, v32, mask)
    dout = torch.randn_like(ref)
    ref_g = torch.autograd.grad(ref, (q32, k32, v32), dout)
    q, k, v = (x.detach().bfloat16().requires_grad_() for x in (q32, k32, v32))
    pt = reference_attention(q, k, v, mask)  # pure PyTorch, bf16 throughout
    pt_g = torch.autograd.grad(pt, (q, k, v), dout.bfloat16())
    out = run(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    out_g = torch.autograd.grad(out, (q, k, v), dout.bfloat16())

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.float() - b.float()).abs().max().item()

    assert err(out, ref) <= 2 * err(pt, ref) + 1e-5, (err(out, ref), err(pt, ref))
    for name, factor, got, base, want in zip("qkv", (3, 2, 2), out_g, pt_g, ref_g):
        assert err(got, want) <= factor * err(base, want) + 1e-5, (f"d{name}", err(got, want), err(base, want))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("text_sees_vae", [False, True])
def test_flash_varlen_bf16_rule(kernels: str, text_sees_vae: bool) -> None:
    layout = _big_layout().to(DEV)
    backend = FlashVarlenAttention(kernels=kernels)
    plan = backend.prepare(layout, text_sees_vae)
    _bf16_rule(layout, text_sees_vae, lambda q, k, v: backend(q, k, v, plan))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("text_sees_vae", [False, True])
@pytest.mark.parametrize("case", sorted(fixed_cases()))
def test_flash_varlen_edge_cases_on_real_kernels(kernels: str, case: str, text_sees_vae: bool) -> None:
    # tiny segments, one-token images, zero-length dummies, calls whose pieces are all one row long, GQA.
    # Too small for the bf16 rule to be meaningful (a one-key row has dq = 0 exactly in fp32), so: close to the
    # emulated run on the same bf16 inputs.
    layout = layout_of(fixed_cases()[case]).to(DEV)
    q, k, v = (x.bfloat16().requires_grad_() for x in _qkv(layout.num_tokens, 8, 2, seed=2))
    dout = torch.randn_like(q)
    results = []
    for kernels_name in (kernels, "emulator"):
        backend = FlashVarlenAttention(kernels=kernels_name)
        out = backend(q, k, v, backend.prepare(layout, text_sees_vae))
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(got.float()).all(), name
        assert _rel_err(got, want) < 3e-2, name


@pytest.mark.parametrize("text_sees_vae", [False, True])
def test_flex_bf16_rule(text_sees_vae: bool) -> None:
    layout = _big_layout().to(DEV)
    backend = get_attention_backend("flex")
    plan = backend.prepare(layout, text_sees_vae)
    _bf16_rule(layout, text_sees_vae, lambda q, k, v: backend(q, k, v, plan))


def test_sdpa_dense_runs_in_bf16() -> None:
    # the reference backend: no accuracy rule of its own (SDPA picks its kernel), only that it runs and is close
    layout = _big_layout().to(DEV)
    backend = get_attention_backend("sdpa_dense")
    q32, k32, v32 = _qkv(layout.num_tokens, 8, 2, seed=1)
    q, k, v = (x.bfloat16().requires_grad_() for x in (q32, k32, v32))
    out = backend(q, k, v, backend.prepare(layout, False))
    assert _rel_err(out, reference_attention(q32, k32, v32, ectf_mask(layout, False).to(DEV))) < 2e-2
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad.float()).all() for x in (q, k, v))


def test_flash_varlen_fp32_on_cuda_falls_back_to_the_emulator() -> None:
    layout = layout_of(fixed_cases()["mixed_pack"]).to(DEV)
    q, k, v = (x.requires_grad_() for x in _qkv(layout.num_tokens, 4, 2))
    backend = get_attention_backend("flash_varlen")
    out = backend(q, k, v, backend.prepare(layout, True))
    want = reference_attention(q, k, v, ectf_mask(layout, True))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    out.sum().backward()
