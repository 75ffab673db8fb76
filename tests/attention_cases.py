"""Shared test material for the attention tests: random packings, fixed edge cases and a naive reference."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from mogao.attention.mask import ectf_mask
from mogao.sequence.layout import Span, TokenLayout
from mogao.sequence.modality import Modality

T, VIT, CLEAN, NOISY = Modality.TEXT, Modality.VIT, Modality.VAE_CLEAN, Modality.VAE_NOISY
MAX_TOKENS = 120


def image(index: int, size: int, generate: bool, vit: bool = True, clean: bool = True, vit_size: int | None = None
          ) -> list[Span]:
    """One image's copies in logical order: noisy (if generated), ViT, clean VAE."""
    spans = []
    if generate:
        spans.append(Span(NOISY, size, index))
    if vit:
        spans.append(Span(VIT, vit_size or size, index))
    if clean:
        spans.append(Span(CLEAN, size, index))
    return spans


@st.composite
def samples(draw: st.DrawFn, max_samples: int = 3) -> list[list[Span]]:
    """1-3 samples of 1-6 segments (text runs or images of 1-6 tokens per copy, generated or not, <= 4 targets).

    Images sometimes lack their ViT or clean copy (a packer may drop them, e.g. for a final generated image), so
    the decomposition is exercised beyond the usual noisy/ViT/clean triple.
    """
    n_samples = draw(st.integers(1, max_samples))
    budget = MAX_TOKENS // n_samples
    out = []
    for _ in range(n_samples):
        spans: list[Span] = []
        images = targets = tokens = 0
        for _ in range(draw(st.integers(1, 6))):
            if tokens >= budget:
                break
            if draw(st.booleans()):
                size = draw(st.integers(1, 6))
                generate = targets < 4 and draw(st.booleans())
                vit = draw(st.integers(0, 3)) > 0
                clean = draw(st.integers(0, 3)) > 0 or not (generate or vit)
                new = image(images, size, generate, vit, clean, vit_size=draw(st.integers(1, 6)))
                images += 1
                targets += generate
            else:
                new = [Span(T, draw(st.integers(1, 5)))]
            spans += new
            tokens += sum(s.length for s in new)
        out.append(spans)
    return out


def fixed_cases() -> dict[str, list[list[Span]]]:
    """Hand-picked packings that random ones may reach only rarely."""
    return {
        "text_only": [[Span(T, 7)], [Span(T, 1)], [Span(T, 4)]],
        "single_token": [[Span(T, 1)]],
        "image_first_generated": [image(0, 4, True) + [Span(T, 3)]],
        "one_token_images": [[Span(T, 2)] + image(0, 1, True) + image(1, 1, False) + [Span(T, 1)] + image(2, 1, True)],
        "noisy_only": [[Span(T, 3)] + image(0, 3, True, vit=False, clean=False)],
        "four_targets": [
            [Span(T, 2)] + image(0, 3, True) + [Span(T, 1)] + image(1, 2, True) + image(2, 4, True)
            + [Span(T, 2)] + image(3, 2, True) + [Span(T, 2)],
            [Span(T, 3)] + image(0, 5, True),
        ],
        "mixed_pack": [
            [Span(T, 3)] + image(0, 4, True) + [Span(T, 2)] + image(1, 3, False) + [Span(T, 3)],
            image(0, 2, False) + [Span(T, 4)],
            [Span(T, 5)],
            [Span(T, 1)] + image(0, 6, True, vit=False) + image(1, 2, True, clean=False),
        ],
        "vit_size_differs": [[Span(T, 2)] + image(0, 4, True, vit_size=2) + [Span(T, 2)] + image(1, 2, False, vit_size=5)],
    }


def layout_of(spans: list[list[Span]]) -> TokenLayout:
    return TokenLayout.from_spans(spans)


def random_qkv(n: int, hq: int, hk: int, d: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0,
               device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
               for h in (hq, hk, hk))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v written out by hand; q (N, Hq, D), k/v (N, Hk, D), mask (N, N)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", p, v)


def reference_for(layout: TokenLayout, text_sees_vae: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                  ) -> torch.Tensor:
    return reference_attention(q, k, v, ectf_mask(layout, text_sees_vae).to(q.device))
