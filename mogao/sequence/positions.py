"""The rotary position rules, shared by the lowering (training) and the KV-cached forward (inference), and the grid
cell of every image token.

Positions are (T, H, W) per token, in logical order, under one of two schemes (`mogao.sequence.formats`):

- IL-RoPE (`il_rope_positions`): a text token is (t, t, t), t advancing by one per token. All copies of one
  image (noisy VAE, ViT, clean VAE, adjacent in the sequence) share T = the next t, with (H, W) the token's
  (row, column) in the image's token grid; the token after the image's last copy continues at T + 1. The
  markers of a wrapped copy (`Span.markers`) are at (T, T, T).
- M-RoPE (`mrope_positions`, the convention of Qwen2-VL's multimodal RoPE): as IL-RoPE, but an image token is
  (T, T + r, T + c) and the token after the image's last copy continues at T + max(gh, gw) (one past the largest
  position the image used). Every coordinate of every token then moves with the sample's start, so attention
  scores depend on relative positions only: shifting a whole sample by k changes no output (IL-RoPE's image
  H/W count from 0 whatever the depth, so an image token's angle to a text token depends on where the text
  sits). The cost: the same cell of two images is (d, d, d) apart for a gap d that varies with what lies
  between them, so copying a cell across images must come from content (the cell code), not from a rotary match.
- Aligned M-RoPE (`aligned_mrope_positions`): as M-RoPE, but an image that follows an earlier image of the
  sample starts a whole number of `IMAGE_STRIDE`s (32) after that image's T - the first such T at or after the
  one M-RoPE would give it (the positions in between are skipped). An edit's target or a story turn with less
  than `IMAGE_STRIDE` - max(gh, gw) text tokens since the previous image is then exactly `IMAGE_STRIDE` from it
  on all three axes, whatever the instruction's length: the same cell of the previous image is one fixed rotary
  offset away, a match attention can learn, and an older image a multiple of it. A sample's first image follows
  its text as under M-RoPE (text-to-image is unchanged), every angle stays relative (a shifted sample computes
  the same), and text alone is positioned as under every scheme. The price: the text just before a later image
  (its `<|vision_start|>` included) is a varying distance from it.
- BAGEL's 1-D positions (`bagel_positions`), as (p, p, p): a text span of n tokens takes p .. p+n-1; every
  token of one image copy (its markers included) takes one p, and the next span starts at p + 1 - or at p for
  a noisy copy, which the clean copy after it shares. A copy left out of the sequence (an entry None) still
  advances p by 1.

`grid_cells` gives each image token its (row, column) whatever the scheme: under IL-RoPE it equals (H, W), under
the other schemes the positions do not hold it and the model reads it from there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mogao.sequence.formats import POSITION_SCHEMES, check_choice
from mogao.sequence.layout import Span
from mogao.sequence.modality import Modality


def _grid(span: Span, grids: Sequence[tuple[int, int]]) -> tuple[int, int]:
    gh, gw = grids[span.image]
    if gh * gw != span.image_tokens:
        raise ValueError(f"image {span.image}: a {span.kind.name} copy of {span.image_tokens} tokens on a {gh}x{gw} "
                         "grid")
    return gh, gw


def il_rope_positions(spans: Sequence[Span], grids: Sequence[tuple[int, int]], t0: int = 0
                      ) -> tuple[torch.Tensor, int]:
    """(3, n) int64 positions of `spans` (logical order) starting at T = `t0`, and the next T after them.

    grids[i] is the token grid (gh, gw) of image i (the `Span.image` of its copies); an image span's image
    tokens must number gh * gw. Adjacent spans of the same image are copies of it and share T.
    """
    return _three_axis(spans, grids, t0, relative=False)[:2]


def mrope_positions(spans: Sequence[Span], grids: Sequence[tuple[int, int]], t0: int = 0
                    ) -> tuple[torch.Tensor, int]:
    """As `il_rope_positions`, under M-RoPE: an image token is (T, T + row, T + column) and the next T after the
    image is T + max(gh, gw)."""
    return _three_axis(spans, grids, t0, relative=True)[:2]


IMAGE_STRIDE = 32
"""Under "mrope_aligned", an image after another one starts a whole number of these after it."""


def aligned_mrope_positions(spans: Sequence[Span], grids: Sequence[tuple[int, int]], t0: int = 0,
                            previous_image: int | None = None) -> tuple[torch.Tensor, int, int | None]:
    """As `mrope_positions`, with every image after the first moved up to a whole number of `IMAGE_STRIDE`s after
    the image before it. `previous_image`: the T of the last image before `spans` (None: there is none). Returns
    the positions, the next T and the T of the last image so far."""
    return _three_axis(spans, grids, t0, relative=True, stride=IMAGE_STRIDE, previous_image=previous_image)


def _three_axis(spans: Sequence[Span], grids: Sequence[tuple[int, int]], t0: int, relative: bool,
                stride: int | None = None, previous_image: int | None = None
                ) -> tuple[torch.Tensor, int, int | None]:
    rows: list[np.ndarray] = []
    t = t0
    for n, s in enumerate(spans):
        if s.kind == Modality.TEXT:
            rows.append(np.broadcast_to(np.arange(t, t + s.length), (3, s.length)))
            t += s.length
            continue
        if n == 0 or spans[n - 1].image != s.image:  # an image's first copy
            if stride is not None and previous_image is not None:
                t = previous_image + -(-(t - previous_image) // stride) * stride
            previous_image = t
        gh, gw = _grid(s, grids)
        base = t if relative else 0
        image = np.empty((3, s.length), dtype=np.int64)
        inner = image[:, 1:-1] if s.markers else image
        inner[0] = t
        inner[1] = base + np.repeat(np.arange(gh), gw)
        inner[2] = base + np.tile(np.arange(gw), gh)
        if s.markers:
            image[:, 0] = image[:, -1] = t
        rows.append(image)
        if n + 1 == len(spans) or spans[n + 1].image != s.image:  # the image's last copy
            t += max(gh, gw) if relative else 1
    if not rows:
        return torch.zeros(3, 0, dtype=torch.long), t, previous_image
    return torch.from_numpy(np.concatenate(rows, 1).astype(np.int64)), t, previous_image


def bagel_positions(spans: Sequence[Span | None], t0: int = 0) -> tuple[torch.Tensor, int]:
    """(3, n) int64 positions (p, p, p) of `spans` (logical order; None = a copy left out) starting at p = `t0`,
    and the p the next span starts at: text +length, a noisy copy +0, any other copy +1 (also when left out).
    This is `mogao.bagel.rules.position_ids` on all three axes (BAGEL's `pack_sequence`, dataset_base.py
    349-458: one rotary position per token, one per image copy)."""
    out: list[torch.Tensor] = []
    p = t0
    for s in spans:
        if s is None:
            p += 1
        elif s.kind == Modality.TEXT:
            out.append(torch.arange(p, p + s.length))
            p += s.length
        else:
            out.append(torch.full((s.length,), p))
            p += 0 if s.kind == Modality.VAE_NOISY else 1
    if not out:
        return torch.zeros(3, 0, dtype=torch.long), p
    flat = torch.cat(out).long()
    return flat.expand(3, -1).clone(), p


def sequence_positions(scheme: str, spans: Sequence[Span | None], grids: Sequence[tuple[int, int]], t0: int = 0
                       ) -> tuple[torch.Tensor, int]:
    """Positions of `spans` (a whole sample, or its start) under the position scheme `scheme` ("il_rope", "mrope",
    "mrope_aligned" or "bagel") starting at T = `t0`, and the next T; an entry None is a copy left out of the
    sequence (it advances BAGEL's positions, not the 3-axis schemes': an image's copies share T)."""
    return positions_from(scheme, spans, grids, t0)[:2]


def positions_from(scheme: str, spans: Sequence[Span | None], grids: Sequence[tuple[int, int]], t0: int = 0,
                   previous_image: int | None = None) -> tuple[torch.Tensor, int, int | None]:
    """`sequence_positions` of `spans` that continue a sequence whose next T is `t0` and whose last image so far
    was at T = `previous_image` (None: no image yet; read by "mrope_aligned" only). Returns the positions, the
    next T and the T of the last image so far - the state the KV cache keeps per row."""
    scheme = check_choice(scheme, POSITION_SCHEMES, "positions")
    if scheme == "bagel":
        for s in spans:
            if s is not None and s.kind != Modality.TEXT:
                _grid(s, grids)
        return (*bagel_positions(spans, t0), previous_image)
    return _three_axis([s for s in spans if s is not None], grids, t0, relative=scheme != "il_rope",
                       stride=IMAGE_STRIDE if scheme == "mrope_aligned" else None, previous_image=previous_image)


def grid_cells(spans: Sequence[Span], grids: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(2, n) int64 (row, column) of every token of `spans` in its image's token grid, row-major; 0 for text
    tokens and for the markers of wrapped copies."""
    parts: list[torch.Tensor] = []
    for s in spans:
        if s.kind == Modality.TEXT:
            parts.append(torch.zeros(2, s.length, dtype=torch.long))
            continue
        gh, gw = _grid(s, grids)
        cells = torch.stack((torch.arange(gh).repeat_interleave(gw), torch.arange(gw).repeat(gh)))
        if s.markers:
            none = torch.zeros(2, 1, dtype=torch.long)
            cells = torch.cat((none, cells, none), 1)
        parts.append(cells)
    return torch.cat(parts, 1) if parts else torch.zeros(2, 0, dtype=torch.long)
