"""Packs in BAGEL's sequence format (image copies wrapped in their own markers, copies ordered noisy, clean VAE,
ViT): the dense backend and FlexAttention against the reference mask, the FLOP count's keys per query against
it, and flash_varlen's refusal of a layout its decomposition has no place for."""

from __future__ import annotations

import pytest
import torch
from attention_cases import random_qkv, reference_for

from mogao.attention import get_attention_backend
from mogao.attention.mask import ectf_mask
from mogao.sequence.layout import Span, TokenLayout
from mogao.sequence.modality import Modality as M
from mogao.training.flops import keys_per_query


def _pack() -> TokenLayout:
    def copies(image: int, n: int, generate: bool) -> list[Span]:
        kinds = ([M.VAE_NOISY] if generate else []) + [M.VAE_CLEAN, M.VIT]
        return [Span(k, n + 2, image, markers=True) for k in kinds]

    return TokenLayout.from_spans([
        [Span(M.TEXT, 3), *copies(0, 4, True), Span(M.TEXT, 2), *copies(1, 2, True), Span(M.TEXT, 1)],
        [*copies(0, 3, False), Span(M.TEXT, 4), *copies(1, 4, True), Span(M.TEXT, 1)],
    ])


@pytest.mark.parametrize("text_sees_vae", [False, True])
def test_dense_and_flex_compute_the_reference_on_wrapped_copies(text_sees_vae):
    layout = _pack()
    q, k, v = random_qkv(layout.num_tokens, 4, 2, seed=3)
    ref = reference_for(layout, text_sees_vae, q, k, v)
    for name in ("sdpa_dense", "flex"):
        backend = get_attention_backend(name)
        with torch.no_grad():
            out = backend(q, k, v, backend.prepare(layout, text_sees_vae))
        torch.testing.assert_close(out, ref.detach(), atol=1e-10, rtol=0, msg=name)
    assert torch.equal(keys_per_query(layout, text_sees_vae), ectf_mask(layout, text_sees_vae).sum(1))


def test_flash_varlen_refuses_markers_inside_image_blocks():
    layout = _pack()
    with pytest.raises(ValueError, match="flash_varlen needs the packed physical layout"):
        get_attention_backend("flash_varlen").prepare(layout, True)
