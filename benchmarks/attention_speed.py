"""ECTF attention backends on the same packed tokens: forward+backward time, peak memory, and error against an
fp32 dense reference.

Packs of `tokens` tokens hold interleaved samples with 1-8 generation targets each (text, then per target: its
noisy VAE copy, ViT copy, clean VAE copy, text), in the attention shape of Qwen2.5-1.5B (12 query heads, 2
key/value heads, head_dim 128). Rows: `sdpa_dense`, `flash_varlen` (once per FA2 kernel set available here),
`flex`, and plain causal FA2 over each sample (no ECTF mask: the cost floor of the same tokens).

Error: max |backend - reference| of out, dq, dk, dv, the reference being the ECTF attention written out by hand
in fp32, sample by sample; "ratio" is that error over the error of the same hand-written attention in the
backend's dtype, divided by the allowance of DESIGN §3 (2x; dq 3x): at most 1 passes.

    python benchmarks/attention_speed.py --tokens 8192 16384 32768        # CUDA, bf16
    python benchmarks/attention_speed.py --tokens 256 --image-tokens 16    # CPU smoke run (flex: forward only)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch

HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128
TARGET_CYCLE = (1, 8, 2, 7, 3, 6, 4, 5)  # generation targets per sample, in packing order
ALLOWANCE = {"out": 2.0, "dq": 3.0, "dk": 2.0, "dv": 2.0}
BACKENDS = ("sdpa_dense", "flash_varlen", "flex", "causal")  # causal: plain causal FA2 over each sample


def packed_spans(tokens: int, max_targets: int = 8, image_tokens: int = 256, vit_tokens: int = 256,
                 text_tokens: int = 32) -> list[list]:
    """Samples with 1..max_targets targets (cycling through TARGET_CYCLE, fewer when the rest of the budget is
    short), packed to exactly `tokens` tokens; the remainder is one text-only sample."""
    from mogao.sequence import Span
    from mogao.sequence.modality import Modality

    def sample(targets: int) -> list:
        spans = [Span(Modality.TEXT, text_tokens)]
        for i in range(targets):
            spans += [Span(Modality.VAE_NOISY, image_tokens, i), Span(Modality.VIT, vit_tokens, i),
                      Span(Modality.VAE_CLEAN, image_tokens, i), Span(Modality.TEXT, text_tokens)]
        return spans

    out, used = [], 0
    for k in range(tokens):
        t = min(TARGET_CYCLE[k % len(TARGET_CYCLE)], max_targets)
        while t and used + sum(s.length for s in sample(t)) > tokens:
            t -= 1
        if not t:
            break
        out.append(sample(t))
        used += sum(s.length for s in out[-1])
    if used < tokens:
        out.append([Span(Modality.TEXT, tokens - used)])
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _hand_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d), masked) v in the inputs' dtype; q (L, Hq, D), k/v (L, Hk, D), allowed (L, L)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def reference_errors(layout, text_sees_vae: bool, q32, k32, v32, dout32, dtype: torch.dtype,
                     results: dict[str, tuple]) -> dict[str, dict[str, float]]:
    """Per backend: max abs error of out/dq/dk/dv against the fp32 hand-written attention, and `ratio` (the
    worst of error / (allowance x the error of the hand-written attention in `dtype`)). Sample by sample:
    attention never crosses samples, so memory stays at one sample's scores."""
    from mogao.attention import ectf_allowed

    names = ("out", "dq", "dk", "dv")
    err = {b: dict.fromkeys(names, 0.0) for b in [*results, "hand"]}
    for s in range(layout.num_samples):
        idx = (layout.sample == s).nonzero().flatten()
        ids = [t[idx] for t in (layout.sample, layout.order, layout.modality, layout.block)]
        allowed = ectf_allowed(*(i[:, None] for i in ids), *(i[None, :] for i in ids), text_sees_vae)
        x32 = [t[idx].detach().requires_grad_() for t in (q32, k32, v32)]
        ref = _hand_attention(*x32, allowed)
        want = (ref.detach(), *torch.autograd.grad(ref, x32, dout32[idx]))
        xlo = [t.detach().to(dtype).requires_grad_() for t in x32]
        lo = _hand_attention(*xlo, allowed)
        got = {"hand": (lo.detach(), *torch.autograd.grad(lo, xlo, dout32[idx].to(dtype)))}
        got.update({b: tuple(t[idx] for t in r) for b, r in results.items()})
        for b, tensors in got.items():
            for n, g, w in zip(names, tensors, want):
                err[b][n] = max(err[b][n], (g.float() - w).abs().max().item())
        del ref, lo, want, got
    out = {}
    for b in results:
        ratio = max(err[b][n] / (ALLOWANCE[n] * err["hand"][n] + 1e-5) for n in names)
        out[b] = {**{f"err_{n}": err[b][n] for n in names}, "ratio": ratio}
    return out


def _fwd_bwd(fn, q, k, v, dout, backward: bool):
    if not backward:
        with torch.no_grad():
            return (fn(q.detach(), k.detach(), v.detach()),)
    out = fn(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))


def measure(tokens: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, repeats: int = 3,
            max_targets: int = 8, image_tokens: int = 256, vit_tokens: int = 256, text_tokens: int = 32,
            text_sees_vae: bool = False, seed: int = 0, backends: tuple[str, ...] = BACKENDS) -> Iterator[dict]:
    """One row per backend on one pack of `tokens` tokens, yielded as measured; last, a row `{"errors": {...}}`
    with the error columns of each ECTF backend that ran forward and backward. `backends`: a subset of
    BACKENDS (the same pack and inputs whatever the subset)."""
    from mogao.attention import get_attention_backend
    from mogao.attention.fa2_ops import _available, select_kernels
    from mogao.attention.flash_varlen import FlashVarlenAttention
    from mogao.sequence import TokenLayout

    layout = TokenLayout.from_spans(packed_spans(tokens, max_targets, image_tokens, vit_tokens, text_tokens))
    layout = layout.to(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    q32, k32, v32, dout32 = (torch.randn(tokens, h, HEAD_DIM, generator=g).to(device)
                             for h in (HEADS, KV_HEADS, KV_HEADS, HEADS))
    q, k, v = (t.to(dtype).requires_grad_() for t in (q32, k32, v32))
    dout = dout32.to(dtype)
    cuda = device.type == "cuda"
    variants: list[tuple[str, object]] = []
    if "sdpa_dense" in backends:
        variants.append(("sdpa_dense", get_attention_backend("sdpa_dense")))
    if "flash_varlen" in backends:
        kernels = [n for n in ("flash_attn", "torch") if _available(n, device)] or ["emulator"]
        variants += [(f"flash_varlen ({n})", FlashVarlenAttention(kernels=n)) for n in kernels]
    if "flex" in backends:
        variants.append(("flex", get_attention_backend("flex")))
    lengths = torch.tensor(layout.sample_lengths)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device=device, dtype=torch.int32)
    fa2 = select_kernels(device, dtype)
    longest = int(lengths.max())

    class _CausalFA2(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):  # type: ignore[override]
            args = (cu, cu, longest, longest, True, -1, -1, HEAD_DIM ** -0.5)
            out, lse = fa2.varlen_fwd(q, k, v, *args)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.args = args
            return out

        @staticmethod
        def backward(ctx, dout):  # type: ignore[override]
            return fa2.varlen_bwd(dout.contiguous(), *ctx.saved_tensors, *ctx.args)

    results: dict[str, tuple] = {}
    shape = {"tokens": tokens, "samples": layout.num_samples, "longest_sample": longest,
             "targets_per_sample": f"1-{max_targets}"}
    causal = [(f"causal FA2 ({fa2.name}, no ECTF mask)", None)] if "causal" in backends else []
    for name, backend in [*variants, *causal]:
        row = {**shape, "backend": name}
        try:
            backward = cuda or name != "flex"  # PyTorch has no CPU backward for FlexAttention
            t0 = time.perf_counter()
            if backend is None:
                fn = _CausalFA2.apply
            else:
                plan = backend.prepare(layout, text_sees_vae)
                _sync(device)
                row["prepare_s"] = time.perf_counter() - t0

                def fn(q, k, v, backend=backend, plan=plan):
                    return backend(q, k, v, plan)
            t0 = time.perf_counter()
            first = _fwd_bwd(fn, q, k, v, dout, backward)  # includes compilation (flex)
            _sync(device)
            row["first_call_s"] = time.perf_counter() - t0
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                _fwd_bwd(fn, q, k, v, dout, backward)
                _sync(device)
                times.append(time.perf_counter() - t0)
            row["fwd_bwd_s" if backward else "fwd_s"] = statistics.median(times)
            row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
            if backend is not None:
                results[name] = first
            if not backward:
                row["note"] = "forward only: no FlexAttention backward on CPU"
        except Exception as e:  # one backend failing (missing kernel, OOM) must not hide the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if cuda:
                torch.cuda.empty_cache()
        yield row
    complete = {n: r for n, r in results.items() if len(r) == 4}
    yield {**shape, "errors": reference_errors(layout, text_sees_vae, q32, k32, v32, dout32, dtype, complete)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-tokens", type=int, default=256)
    ap.add_argument("--max-targets", type=int, default=8)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, bf16, {HEADS}/{KV_HEADS} heads x {HEAD_DIM}\n")
    print("| tokens | backend | fwd+bwd ms | peak MiB | first call s | err out | err dq | ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        rows = list(measure(tokens, device, repeats=args.repeats, max_targets=args.max_targets,
                            image_tokens=args.image_tokens, vit_tokens=args.image_tokens))
        errors = rows.pop()["errors"]
        for r in rows:
            if "error" in r:
                print(f"| {tokens} | {r['backend']} | failed: {r['error'][:80]} | | | | | |")
                continue
            e = errors.get(r["backend"], {})
            t = r.get("fwd_bwd_s", r.get("fwd_s"))
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            errs = " | ".join(f"{e[c]:.2e}" if c in e else "-" for c in ("err_out", "err_dq"))
            ratio = f"{e['ratio']:.2f}" if e else "-"
            print(f"| {tokens} | {r['backend']} | {t * 1e3:.2f} | {peak} | {r['first_call_s']:.2f} | {errs} | "
                  f"{ratio} |")


if __name__ == "__main__":
    main()
