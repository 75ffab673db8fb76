"""The position schemes, grid cells and wrapped copies against their written definitions: hand-computed position
lists, BAGEL's 1-D rule (`mogao.bagel.rules.position_ids`), BAGEL's attention rule on its splits."""

from __future__ import annotations

import pytest
import torch

from mogao.attention.mask import ectf_mask
from mogao.bagel import rules
from mogao.sequence import (
    Span,
    TokenLayout,
    bagel_positions,
    grid_cells,
    il_rope_positions,
    sequence_positions,
)
from mogao.sequence.formats import image_copies
from mogao.sequence.modality import Modality as M

TXT, VIT, CLEAN, NOISY = M.TEXT, M.VIT, M.VAE_CLEAN, M.VAE_NOISY
_RULE_KIND = {TXT: "text", VIT: "vit", CLEAN: "vae", NOISY: "noisy"}


def _flat(pos: torch.Tensor) -> list[int]:
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[0], pos[2])  # (p, p, p)
    return pos[0].tolist()


def test_bagel_positions_of_an_edit_and_a_generated_image_by_hand():
    # an edit: VAE copy at p, ViT copy at p+1, text from p+2 (markers inside the copies)
    spans = [Span(CLEAN, 4 + 2, 0, markers=True), Span(VIT, 4 + 2, 0, markers=True), Span(TXT, 3)]
    pos, nxt = bagel_positions(spans, 5)
    assert _flat(pos) == [5] * 6 + [6] * 6 + [7, 8, 9] and nxt == 10
    # a generated image that stays as a condition: noisy at p, clean VAE at p too, ViT at p+1
    spans = [Span(TXT, 2), Span(NOISY, 3, 0, markers=True), Span(CLEAN, 3, 0, markers=True),
             Span(VIT, 3, 0, markers=True), Span(TXT, 1)]
    pos, nxt = bagel_positions(spans)
    assert _flat(pos) == [0, 1] + [2] * 3 + [2] * 3 + [3] * 3 + [4] and nxt == 5
    # a copy left out (None) still advances; a noisy copy alone does not
    pos, nxt = bagel_positions([Span(NOISY, 2, 0), None, Span(VIT, 2, 0), Span(TXT, 1)])
    assert _flat(pos) == [0, 0, 1, 1, 2] and nxt == 3


@pytest.mark.parametrize("seed", range(5))
def test_bagel_positions_are_bagels_rule_on_every_axis(seed):
    g = torch.Generator().manual_seed(seed)
    spans, rule_spans = [], []
    for image in range(6):
        if torch.rand((), generator=g) < 0.5:
            n = int(torch.randint(1, 5, (), generator=g))
            spans.append(Span(TXT, n))
            rule_spans.append(("text", n))
        n = int(torch.randint(1, 4, (), generator=g)) + 2
        for kind in image_copies("bagel", bool(torch.rand((), generator=g) < 0.5), True):
            if torch.rand((), generator=g) < 0.2 and kind != NOISY:
                spans.append(None)
                rule_spans.append(("skipped", 0))
            else:
                spans.append(Span(kind, n, image, markers=True))
                rule_spans.append((_RULE_KIND[kind], n))
    pos, nxt = bagel_positions(spans, 3)
    want, want_next = rules.position_ids(rule_spans, 3)
    assert _flat(pos) == want and nxt == want_next


def test_il_rope_positions_put_the_markers_of_a_wrapped_copy_at_the_images_t():
    spans = [Span(TXT, 2), Span(NOISY, 4 + 2, 0, markers=True), Span(CLEAN, 4 + 2, 0, markers=True), Span(TXT, 1)]
    pos, nxt = il_rope_positions(spans, [(2, 2)])
    t, h, w = pos.tolist()
    assert t == [0, 1] + [2] * 12 + [3] and nxt == 4
    image_hw = [0, 0, 1, 1], [0, 1, 0, 1]
    assert h == [0, 1, 2, *image_hw[0], 2, 2, *image_hw[0], 2, 3]
    assert w == [0, 1, 2, *image_hw[1], 2, 2, *image_hw[1], 2, 3]
    # unwrapped spans are positioned as always; a left-out copy changes nothing under IL-RoPE
    plain = [Span(TXT, 1), Span(VIT, 4, 0), Span(CLEAN, 4, 0), Span(TXT, 1)]
    ref, _ = il_rope_positions(plain, [(2, 2)])
    assert torch.equal(sequence_positions("il_rope", plain[:2] + [None] + plain[3:], [(2, 2)])[0],
                       torch.cat((ref[:, :5], ref[:, -1:]), 1))


def test_grid_cells_are_row_major_with_zero_for_text_and_markers():
    cells = grid_cells([Span(TXT, 1), Span(VIT, 6 + 2, 0, markers=True), Span(CLEAN, 6, 0)], [(2, 3)])
    rows, cols = cells.tolist()
    assert rows == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]
    assert cols == [0, 0, 0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="2x3 grid"):
        grid_cells([Span(VIT, 5, 0, markers=True)], [(2, 3)])


def test_a_wrapped_copy_has_its_markers_in_the_understanding_section_and_in_its_block():
    spans = [Span(TXT, 2), Span(NOISY, 3, 0, markers=True), Span(CLEAN, 3, 0, markers=True),
             Span(VIT, 3, 0, markers=True)]
    lay = TokenLayout.from_spans([spans])
    logical = lay.physical_of_logical
    mod, block = lay.modality[logical].tolist(), lay.block[logical].tolist()
    assert mod == [0, 0] + [int(NOISY)] * 3 + [int(CLEAN)] * 3 + [int(VIT)] * 3
    assert block == [-1, -1, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    # physical: text, all six markers and the ViT copy read by the understanding expert; then clean, noisy VAE
    assert (lay.n_und, lay.n_gen_clean, lay.n_noisy) == (2 + 6 + 1, 1, 1)
    und = set(logical[torch.tensor([0, 1, 2, 4, 5, 7, 8, 9, 10])].tolist())
    assert und == set(range(lay.n_und))
    # BAGEL's copy order (clean VAE before ViT) is accepted; a kind twice, or a noisy copy after another, is not
    for bad in ([Span(CLEAN, 3, 0, markers=True), Span(CLEAN, 3, 0, markers=True)],
                [Span(CLEAN, 3, 0, markers=True), Span(NOISY, 3, 0, markers=True)]):
        with pytest.raises(ValueError, match="each once"):
            TokenLayout.from_spans([bad])
    with pytest.raises(ValueError, match="wrapped span"):
        Span(TXT, 3, markers=True)


def _bagel_mask(splits: list[tuple[str, int]]) -> torch.Tensor:
    """BAGEL's attention rule on one sample, as its data code states it (data/data_utils.py
    `prepare_attention_mask_per_sample`): every split sees all earlier tokens, a causal split itself causally, a
    full or noise split itself fully; then no token sees a noise split except that split."""
    kinds = [k for k, n in splits for _ in range(n)]
    split = torch.tensor([i for i, (_, n) in enumerate(splits) for _ in range(n)])
    n = len(kinds)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    causal = torch.tensor([x == "causal" for x in kinds])
    noise = torch.tensor([x == "noise" for x in kinds])
    allowed = (split[None, :] < split[:, None]) | ((split[None, :] == split[:, None]) & (~causal[:, None] | (k <= q)))
    return allowed & (~noise[None, :] | (split[None, :] == split[:, None]))


def test_the_mask_of_bagels_format_is_bagels_rule():
    """A t2i sample, an edit and an interleaved one in BAGEL's format: with text_sees_vae (BAGEL) the ECTF mask is
    BAGEL's rule on its splits (a text chunk causal, a clean copy full, a noisy copy noise)."""
    cases = [  # (kind, tokens with markers, image)
        [("text", 3, -1), ("noisy", 4, 0), ("vae", 4, 0), ("vit", 4, 0)],
        [("vae", 4, 0), ("vit", 4, 0), ("text", 2, -1), ("noisy", 4, 1), ("vit", 4, 1)],
        [("text", 2, -1), ("noisy", 3, 0), ("vae", 3, 0), ("vit", 3, 0), ("text", 2, -1), ("noisy", 3, 1),
         ("vit", 3, 1), ("text", 1, -1)],
    ]
    kind_of = {"text": TXT, "vit": VIT, "vae": CLEAN, "noisy": NOISY}
    mode_of = {"text": "causal", "vit": "full", "vae": "full", "noisy": "noise"}
    for case in cases:
        spans = [Span(kind_of[k], n, i, markers=k != "text") for k, n, i in case]
        lay = TokenLayout.from_spans([spans])
        li = lay.physical_of_logical
        mask = ectf_mask(lay, text_sees_vae=True)[li][:, li]  # in logical order
        assert torch.equal(mask, _bagel_mask([(mode_of[k], n) for k, n, _ in case])), case


def test_aligned_mrope_puts_later_images_whole_strides_after_the_previous_one_by_hand():
    from mogao.sequence.positions import IMAGE_STRIDE, positions_from

    a = IMAGE_STRIDE
    # caption (5), a generated image (noisy, ViT, clean on a 2x3 grid), an instruction (7), the next image, text
    spans = [Span(TXT, 5), Span(NOISY, 6, 0), Span(VIT, 6, 0), Span(CLEAN, 6, 0), Span(TXT, 7),
             Span(NOISY, 6, 1), Span(CLEAN, 6, 1), Span(TXT, 2)]
    pos, nxt = sequence_positions("mrope_aligned", spans, [(2, 3), (2, 3)], 0)
    assert torch.equal(pos[:, :23], sequence_positions("mrope", spans[:4], [(2, 3)], 0)[0])  # M-RoPE up to there
    image0 = pos[:, 5:11]
    assert image0[0].tolist() == [5] * 6 and image0[1].tolist() == [5, 5, 5, 6, 6, 6]
    assert pos[:, 23:30].tolist() == [list(range(8, 15))] * 3  # the instruction continues past the image
    assert torch.equal(pos[:, 30:36], image0 + a) and torch.equal(pos[:, 36:42], image0 + a)  # one stride on
    assert pos[:, 42:].tolist() == [[a + 8, a + 9]] * 3 and nxt == a + 10
    # the offset between the two images does not depend on the instruction's length while it fits; then two
    for n, strides in ((1, 1), (12, 1), (a - 3, 1), (a - 2, 2), (2 * a, 3)):
        longer = [*spans[:4], Span(TXT, n), *spans[5:]]
        p, _ = sequence_positions("mrope_aligned", longer, [(2, 3), (2, 3)], 0)
        assert torch.equal(p[:, 23 + n: 29 + n] - image0, torch.full((3, 6), strides * a)), n
    # continuing a sequence: from the image before, which the cache keeps
    p, t, last = positions_from("mrope_aligned", [Span(TXT, 4), Span(VIT, 6, 0)], [(2, 3)], 50, previous_image=40)
    assert p[0, 4:].tolist() == [40 + a] * 6 and last == 40 + a and t == 40 + a + 3
    p, t, last = positions_from("mrope_aligned", [Span(TXT, 4), Span(VIT, 6, 0)], [(2, 3)], 50)
    assert p[0, 4:].tolist() == [54] * 6 and last == 54  # no image before: as M-RoPE
    # text alone: identical to every other scheme
    assert torch.equal(sequence_positions("mrope_aligned", [Span(TXT, 9)], [], 4)[0],
                       il_rope_positions([Span(TXT, 9)], [], 4)[0])
