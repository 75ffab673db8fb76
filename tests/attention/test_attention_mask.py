"""The ECTF reference mask on hand-written packings: one test per rule of DESIGN section 3."""

from __future__ import annotations

import pytest
import torch
from attention_cases import CLEAN, NOISY, VIT, T, image, layout_of

from mogao.attention.mask import ectf_mask
from mogao.sequence.layout import Span, TokenLayout


def _logical(layout: TokenLayout, text_sees_vae: bool) -> torch.Tensor:
    """The mask in logical order (samples concatenated), which is how the rules are stated."""
    idx = layout.physical_of_logical
    return ectf_mask(layout, text_sees_vae)[idx][:, idx]


# one sample, logical positions:
# 0-1 text | 2-4 noisy(img0) | 5-6 vit(img0) | 7-9 clean(img0) | 10 text | 11-12 noisy(img1) | 13 vit(img1) |
# 14-15 clean(img1) | 16-17 text
SAMPLE = [Span(T, 2)] + image(0, 3, True, vit_size=2) + [Span(T, 1)] + image(1, 2, True, vit_size=1) + [Span(T, 2)]
TEXT = [0, 1, 10, 16, 17]
NOISY0, VIT0, CLEAN0 = range(2, 5), range(5, 7), range(7, 10)
NOISY1, VIT1, CLEAN1 = range(11, 13), range(13, 14), range(14, 16)


@pytest.fixture(params=[False, True], ids=["text_blind", "text_sees_vae"])
def mask(request: pytest.FixtureRequest) -> tuple[torch.Tensor, bool]:
    return _logical(layout_of([SAMPLE]), request.param), request.param


def test_layout_positions_match_the_comment() -> None:
    layout = layout_of([SAMPLE])
    mods = layout.modality[layout.physical_of_logical].tolist()
    assert [mods[i] for i in TEXT] == [T] * 5
    assert {mods[i] for i in (*NOISY0, *NOISY1)} == {NOISY}
    assert {mods[i] for i in (*VIT0, *VIT1)} == {VIT}
    assert {mods[i] for i in (*CLEAN0, *CLEAN1)} == {CLEAN}


def test_text_is_causal_over_text(mask: tuple[torch.Tensor, bool]) -> None:
    m, _ = mask
    for i in TEXT:
        for j in TEXT:
            assert bool(m[i, j]) == (j <= i)


def test_every_copy_is_one_bidirectional_block(mask: tuple[torch.Tensor, bool]) -> None:
    m, _ = mask
    for block in (NOISY0, VIT0, CLEAN0, NOISY1, VIT1, CLEAN1):
        idx = torch.tensor(list(block))
        assert bool(m[idx][:, idx].all())


def test_noisy_copy_sees_clean_past_and_itself_only(mask: tuple[torch.Tensor, bool]) -> None:
    m, _ = mask
    # image 0's noisy copy: text 0-1 and itself; not its own ViT/clean copies, nothing later
    for i in NOISY0:
        assert m[i].nonzero().flatten().tolist() == [0, 1, *NOISY0]
    # image 1's noisy copy: everything clean before it (text, image 0's ViT and clean copies), never a noisy copy
    for i in NOISY1:
        assert m[i].nonzero().flatten().tolist() == [0, 1, *VIT0, *CLEAN0, 10, *NOISY1]


def test_nothing_sees_a_noisy_copy_but_itself(mask: tuple[torch.Tensor, bool]) -> None:
    m, _ = mask
    for block in (NOISY0, NOISY1):
        rows = m[:, list(block)].any(1).nonzero().flatten().tolist()
        assert rows == list(block)


def test_text_sees_vae_switch(mask: tuple[torch.Tensor, bool]) -> None:
    m, text_sees_vae = mask
    und = [*TEXT, *VIT0, *VIT1]
    for i in und:
        for j in (*CLEAN0, *CLEAN1):
            assert bool(m[i, j]) == (text_sees_vae and j < i)
    # ViT tokens see earlier text and earlier ViT regardless
    assert bool(m[13, 5]) and bool(m[13, 10]) and bool(m[5, 1])


def test_clean_vae_sees_everything_clean_before_it(mask: tuple[torch.Tensor, bool]) -> None:
    m, _ = mask
    for i in CLEAN1:
        assert m[i].nonzero().flatten().tolist() == [0, 1, *VIT0, *CLEAN0, 10, *VIT1, *CLEAN1]
    for i in CLEAN0:  # its own ViT copy comes before it
        assert m[i].nonzero().flatten().tolist() == [0, 1, *VIT0, *CLEAN0]


def test_text_after_images_sees_clean_copies_only(mask: tuple[torch.Tensor, bool]) -> None:
    m, text_sees_vae = mask
    seen = m[17].nonzero().flatten().tolist()
    expected = [0, 1, *VIT0, 10, *VIT1, 16, 17]
    if text_sees_vae:
        expected = sorted(expected + [*CLEAN0, *CLEAN1])
    assert seen == expected


@pytest.mark.parametrize("text_sees_vae", [False, True])
def test_no_attention_across_samples(text_sees_vae: bool) -> None:
    layout = layout_of([SAMPLE, [Span(T, 3)] + image(0, 2, True), image(0, 2, False) + [Span(T, 1)]])
    m = ectf_mask(layout, text_sees_vae)
    same = layout.sample[:, None] == layout.sample[None, :]
    assert not bool((m & ~same).any())
    assert bool(m.diagonal().all())  # every token sees itself: no empty softmax rows
