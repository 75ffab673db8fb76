"""The one IL-RoPE position rule, shared by the lowering (training) and the KV-cached forward (inference).

Positions are (T, H, W) per token, in logical order. A text token is (t, t, t), t advancing by one per token.
All copies of one image (noisy VAE, ViT, clean VAE, adjacent in the sequence) share T = the next t, with (H, W)
the token's (row, column) in the image's token grid; the token after the image's last copy continues at T + 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mogao.sequence.layout import Span
from mogao.sequence.modality import Modality


def il_rope_positions(spans: Sequence[Span], grids: Sequence[tuple[int, int]], t0: int = 0
                      ) -> tuple[torch.Tensor, int]:
    """(3, n) int64 positions of `spans` (logical order) starting at T = `t0`, and the next T after them.

    grids[i] is the token grid (gh, gw) of image i (the `Span.image` of its copies); an image span's length must
    be gh * gw. Adjacent spans of the same image are copies of it and share T.
    """
    rows: list[torch.Tensor] = []
    t = t0
    for n, s in enumerate(spans):
        if s.kind == Modality.TEXT:
            rows.append(torch.arange(t, t + s.length).expand(3, s.length))
            t += s.length
            continue
        gh, gw = grids[s.image]
        if gh * gw != s.length:
            raise ValueError(f"image {s.image}: a {s.kind.name} copy of {s.length} tokens on a {gh}x{gw} grid")
        rows.append(torch.stack((torch.full((s.length,), t), torch.arange(gh).repeat_interleave(gw),
                                 torch.arange(gw).repeat(gh))))
        if n + 1 == len(spans) or spans[n + 1].image != s.image:  # the image's last copy
            t += 1
    if not rows:
        return torch.zeros(3, 0, dtype=torch.long), t
    return torch.cat(rows, 1).long(), t
