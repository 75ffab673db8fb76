"""`flash_varlen`: the ECTF mask as an exact sum of FlashAttention-2 varlen pieces, merged by log-sum-exp.

Every region of the mask is a rectangle of contiguous physical rows x contiguous physical keys under one of
three FA2 modes, because the packer lays tokens out as [und: text+ViT] | [clean VAE] | [noisy VAE], each section
by sample then logical order (see `layout.py`). For a sample s with und stream U, clean-VAE stream C and noisy
copies, `ectf_pieces` emits (N_U(o) = U's tokens with order < o, likewise N_C):

    causal  U x U, C x C                      causal over each stream (logical order = physical order)
    upper   [a, b-1) x [a+1, b)               window (0, -1): the strict upper triangle of each ViT and clean
                                              VAE block [a, b) of >= 2 tokens, making the block bidirectional
    full    clean block x N_U(block start)    a clean image sees the understanding tokens before it
    full    noisy copy x noisy copy           B2: a noisy copy sees itself
    full    noisy copy x N_U(copy start)      B1: ... the clean understanding past,
    full    noisy copy x N_C(copy start)      ... and the clean VAE past (never its own clean copies)
    full    U after block x clean block       only with text_sees_vae: und tokens see earlier clean images

No piece touches a noisy key outside its own copy, and without text_sees_vae no und row sees a VAE key, so the
pieces partition exactly the allowed (row, key) pairs of `ectf_mask` (the tests check this against it).

`pack_pieces` greedily chains pieces of one mode into kernel calls: a call's q ranges and k ranges must each
increase (so pieces that start at the same key, like the prefixes of one sample, need separate calls: about
2 + 2 * images-per-sample calls in all), and gaps between consecutive pieces become two dummy batch entries (q len 0, k = gap) and
(q = gap, k len 0), never one entry with both gaps (those rows would see those keys). Rows with no key come
back with lse = +inf and out = 0 and drop out of the merge. Q/K/V enter the kernels as contiguous slices of the
physical tensors: no copies.

FA2's backward ignores a gradient on lse, so the merge is one autograd.Function whose backward runs every
call's FA2 backward with the MERGED out and lse (as ring attention does) and sums dq/dk/dv.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mogao.attention.base import check_qkv
from mogao.attention.fa2_ops import Fa2Kernels, check_kernel_inputs, select_kernels
from mogao.sequence.layout import TokenLayout
from mogao.sequence.modality import Modality

# mode -> (causal, window_left, window_right) as passed to the kernels
MODES: dict[str, tuple[bool, int, int]] = {"causal": (True, -1, -1), "upper": (False, 0, -1), "full": (False, -1, -1)}
_SECTION = {int(Modality.TEXT): 0, int(Modality.VIT): 0, int(Modality.VAE_CLEAN): 1, int(Modality.VAE_NOISY): 2}


@dataclass(frozen=True)
class MaskRect:
    """One rectangle of the mask: physical rows [q0, q1) see physical keys [k0, k1) under `mode`."""

    mode: str
    q0: int
    q1: int
    k0: int
    k1: int
    what: str = ""


@dataclass
class KernelCall:
    """One varlen kernel call: q[q0:q1] against k/v[k0:k1] with batch entries cu_q/cu_k (relative offsets)."""

    mode: str
    q0: int
    q1: int
    k0: int
    k1: int
    cu_q: Tensor  # (B+1,) int32 on the layout's device
    cu_k: Tensor
    max_q: int
    max_k: int
    pieces: tuple[MaskRect, ...] = field(default_factory=tuple)


@dataclass
class FlashVarlenPlan:
    """What `FlashVarlenAttention.prepare` builds once per batch."""

    calls: list[KernelCall]
    num_tokens: int
    pieces: list[MaskRect]
    device: torch.device


def _check_physical_order(layout: TokenLayout) -> None:
    sec = torch.tensor([_SECTION[m] for m in range(4)])[layout.modality.cpu()]
    key = torch.stack([sec, layout.sample.cpu(), layout.order.cpu()], 1)
    if key.shape[0] > 1:
        prev, nxt = key[:-1], key[1:]
        # lexicographic strict increase of (section, sample, order)
        gt = nxt > prev
        eq = nxt == prev
        ok = gt[:, 0] | (eq[:, 0] & (gt[:, 1] | (eq[:, 1] & gt[:, 2])))
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0])
            raise ValueError(
                f"flash_varlen needs the packed physical layout [und | clean VAE | noisy VAE], each section by "
                f"sample then order; tokens {bad} and {bad + 1} break it (build layouts with TokenLayout.from_spans)"
            )


def ectf_pieces(layout: TokenLayout, text_sees_vae: bool) -> list[MaskRect]:
    """The rectangles whose union is exactly the allowed set of `ectf_mask(layout, text_sees_vae)`."""
    _check_physical_order(layout)
    n = layout.num_tokens
    if n == 0:
        return []
    sample = layout.sample.cpu()
    order = layout.order.cpu().tolist()
    modality = layout.modality.cpu()
    block = layout.block.cpu()
    num_samples = int(sample.max()) + 1
    sec = torch.tensor([_SECTION[m] for m in range(4)])[modality]
    # per sample, the physical [start, end) of its stream in each section
    starts = []
    base = 0
    for s_id in range(3):
        counts = torch.bincount(sample[sec == s_id], minlength=num_samples).tolist()
        ranges = []
        for c in counts:
            ranges.append((base, base + c))
            base += c
        starts.append(ranges)
    und, clean = starts[0], starts[1]

    pieces: list[MaskRect] = []
    for s in range(num_samples):
        for lo, hi in (und[s], clean[s]):
            if hi > lo:
                pieces.append(MaskRect("causal", lo, hi, lo, hi, "stream"))

    def before(stream: tuple[int, int], o: int) -> tuple[int, int]:
        lo, hi = stream
        return lo, bisect.bisect_left(order, o, lo, hi)  # the stream's tokens with order < o

    # image copies: runs of one block id >= 0 (contiguous by construction of the layout)
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = block[1:] != block[:-1]
    run_starts = change.nonzero().flatten().tolist()
    for a, b in zip(run_starts, run_starts[1:] + [n]):
        if int(block[a]) < 0:
            continue
        s, mod, o = int(sample[a]), int(modality[a]), order[a]
        if mod in (Modality.VIT, Modality.VAE_CLEAN) and b - a >= 2:
            pieces.append(MaskRect("upper", a, b - 1, a + 1, b, "block upper triangle"))
        if mod == Modality.VAE_CLEAN:
            lo, hi = before(und[s], o)
            if hi > lo:
                pieces.append(MaskRect("full", a, b, lo, hi, "clean image x und past"))
            if text_sees_vae and hi < und[s][1]:
                pieces.append(MaskRect("full", hi, und[s][1], a, b, "later und x clean image"))
        elif mod == Modality.VAE_NOISY:
            pieces.append(MaskRect("full", a, b, a, b, "noisy copy x itself"))
            for stream, what in ((und[s], "noisy copy x und past"), (clean[s], "noisy copy x clean VAE past")):
                lo, hi = before(stream, o)
                if hi > lo:
                    pieces.append(MaskRect("full", a, b, lo, hi, what))
    return pieces


def _chains(pieces: list[MaskRect]) -> list[list[MaskRect]]:
    """Split pieces of one mode into chains whose q ranges and k ranges both increase.

    Greedy: pieces sorted by (q0, k0) join the chain whose last key end is the largest one still <= their k0
    (the tightest fit), so later pieces keep the most room.
    """
    chains: list[list[MaskRect]] = []
    for p in sorted(pieces, key=lambda p: (p.q0, p.k0)):
        best = None
        for c in chains:
            last = c[-1]
            if last.q1 <= p.q0 and last.k1 <= p.k0 and (best is None or last.k1 > best[-1].k1):
                best = c
        if best is None:
            chains.append([p])
        else:
            best.append(p)
    return chains


def pack_pieces(pieces: list[MaskRect], device: torch.device | str = "cpu") -> list[KernelCall]:
    """Kernel calls covering `pieces`, with dummy entries filling the gaps inside each call."""
    calls = []
    for mode in MODES:
        for chain in _chains([p for p in pieces if p.mode == mode]):
            q_base, k_base = chain[0].q0, chain[0].k0
            cu_q, cu_k = [0], [0]
            for p in chain:
                if p.q0 - q_base > cu_q[-1]:  # rows between pieces: (q = gap, k len 0) -> out 0, lse +inf
                    cu_q.append(p.q0 - q_base)
                    cu_k.append(cu_k[-1])
                if p.k0 - k_base > cu_k[-1]:  # keys between pieces: (q len 0, k = gap) -> nothing
                    cu_q.append(cu_q[-1])
                    cu_k.append(p.k0 - k_base)
                cu_q.append(p.q1 - q_base)
                cu_k.append(p.k1 - k_base)
            max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
            max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
            calls.append(KernelCall(
                mode, q_base, chain[-1].q1, k_base, chain[-1].k1,
                torch.tensor(cu_q, dtype=torch.int32, device=device),
                torch.tensor(cu_k, dtype=torch.int32, device=device),
                # FA2 treats max_seqlen_q == 1 with GQA as decoding and reshapes q assuming one row per entry,
                # which zero-length dummies break; a larger bound only adds idle thread blocks.
                max(max_q, 2), max_k, tuple(chain),
            ))
    return calls


def _merge_into(out_acc: Tensor, lse_acc: Tensor, out: Tensor, lse: Tensor) -> None:
    """Fold one call's (out (n, H, D), lse (H, n)) into the running accumulators, in place."""
    lse = lse.to(lse_acc.dtype)
    lse = lse.masked_fill(lse == float("inf"), float("-inf"))  # FA2's empty rows: weight 0
    new = torch.logaddexp(lse_acc, lse)
    safe = new.masked_fill(torch.isneginf(new), 0.0)
    w_old = torch.exp(lse_acc - safe).transpose(0, 1)[..., None]  # (n, H, 1)
    w_new = torch.exp(lse - safe).transpose(0, 1)[..., None]
    out_acc.mul_(w_old).add_(out.to(out_acc.dtype) * w_new)
    lse_acc.copy_(new)


class _MergedVarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: FlashVarlenPlan, scale: float,  # type: ignore[override]
                kernels: Fa2Kernels) -> Tensor:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        n, hq, _ = q.shape
        out_acc = torch.zeros(n, hq, v.shape[-1], dtype=acc, device=q.device)
        lse_acc = torch.full((hq, n), float("-inf"), dtype=acc, device=q.device)
        for c in plan.calls:
            causal, left, right = MODES[c.mode]
            o, lse = kernels.varlen_fwd(q[c.q0:c.q1], k[c.k0:c.k1], v[c.k0:c.k1], c.cu_q, c.cu_k, c.max_q, c.max_k,
                                        causal, left, right, scale)
            _merge_into(out_acc[c.q0:c.q1], lse_acc[:, c.q0:c.q1], o, lse)
        out = out_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_acc)
        ctx.plan, ctx.scale, ctx.kernels = plan, scale, kernels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale, kernels = ctx.plan, ctx.scale, ctx.kernels
        dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        lse_k = lse if kernels.name == "emulator" else lse.float()  # the real kernels read fp32
        for c in plan.calls:
            causal, left, right = MODES[c.mode]
            dq_c, dk_c, dv_c = kernels.varlen_bwd(
                dout[c.q0:c.q1], q[c.q0:c.q1], k[c.k0:c.k1], v[c.k0:c.k1], out[c.q0:c.q1],
                lse_k[:, c.q0:c.q1].contiguous(), c.cu_q, c.cu_k, c.max_q, c.max_k, causal, left, right, scale,
            )
            dq[c.q0:c.q1] += dq_c
            dk[c.k0:c.k1] += dk_c
            dv[c.k0:c.k1] += dv_c
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class FlashVarlenAttention:
    """FA2 varlen decomposition of the ECTF mask (see the module docstring).

    kernels: "flash_attn" | "torch" | "emulator" to force an implementation; None picks per device and dtype
    (`fa2_ops.select_kernels`): real kernels for fp16/bf16 on CUDA, the emulator otherwise.
    """

    name = "flash_varlen"

    def __init__(self, kernels: str | None = None) -> None:
        self.kernels = kernels

    def prepare(self, layout: TokenLayout, text_sees_vae: bool) -> FlashVarlenPlan:
        pieces = ectf_pieces(layout, text_sees_vae)
        device = layout.sample.device
        return FlashVarlenPlan(pack_pieces(pieces, device), layout.num_tokens, pieces, device)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, prepared: object, scale: float | None = None) -> Tensor:
        plan = prepared
        if not isinstance(plan, FlashVarlenPlan):
            raise TypeError(f"flash_varlen got a {type(plan).__name__} plan; call this backend's prepare() first")
        check_qkv(q, k, v, plan.num_tokens, self.name, plan.device)
        kernels = select_kernels(q.device, q.dtype, self.kernels)
        check_kernel_inputs(kernels, q)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        # the kernels need a unit stride on head_dim; a no-op for the usual (N, H*D).view(N, H, D) inputs
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return _MergedVarlenAttention.apply(q, k, v, plan, scale, kernels)
