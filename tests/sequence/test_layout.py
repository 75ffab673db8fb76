"""The packed physical layout and its checks."""

from __future__ import annotations

import pytest
import torch

from mogao.sequence.layout import Span, TokenLayout
from mogao.sequence.modality import Modality as M


def test_three_sections_sorted_by_sample_then_order():
    lay = TokenLayout.from_spans([
        [Span(M.TEXT, 2), Span(M.VAE_NOISY, 2, 0), Span(M.VIT, 2, 0), Span(M.VAE_CLEAN, 2, 0), Span(M.TEXT, 1)],
        [Span(M.VIT, 1, 0), Span(M.VAE_CLEAN, 1, 0), Span(M.TEXT, 3)],
    ])
    assert (lay.n_und, lay.n_gen_clean, lay.n_noisy) == (5 + 4, 2 + 1, 2)
    assert lay.modality[:lay.n_und].le(M.VIT).all()
    assert lay.modality[lay.n_und:lay.n_und + lay.n_gen_clean].eq(M.VAE_CLEAN).all()
    assert lay.modality[-lay.n_noisy:].eq(M.VAE_NOISY).all()
    assert lay.sample_lengths == [9, 5]
    # inside each section: by sample, then logical order
    for lo, hi in ((0, lay.n_und), (lay.n_und, lay.n_und + lay.n_gen_clean), (lay.n_und + lay.n_gen_clean, 14)):
        key = lay.sample[lo:hi] * 100 + lay.order[lo:hi]
        assert torch.equal(key, key.sort().values)
    # physical_of_logical maps the concatenated logical sequence onto physical positions, a permutation
    assert torch.equal(lay.physical_of_logical.sort().values, torch.arange(14))
    logical_modality = torch.tensor([0, 0, 3, 3, 1, 1, 2, 2, 0, 1, 2, 0, 0, 0])
    assert torch.equal(lay.modality[lay.physical_of_logical], logical_modality)
    # one block id per image copy, -1 for text
    assert lay.block[lay.modality == M.TEXT].eq(-1).all()
    assert len(set(lay.block[lay.block >= 0].tolist())) == 5


@pytest.mark.parametrize("spans, message", [
    ([Span(M.VIT, 2, 0), Span(M.VAE_NOISY, 2, 0)], "must be ordered noisy, ViT, clean VAE"),
    ([Span(M.VIT, 2, 0), Span(M.TEXT, 1), Span(M.VAE_CLEAN, 2, 0)], "not adjacent"),
])
def test_copies_out_of_order_are_refused(spans, message):
    with pytest.raises(ValueError, match=message):
        TokenLayout.from_spans([spans])
