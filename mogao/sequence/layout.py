"""The physical token layout of a packed batch and the per-token ids the ECTF mask is stated on.

A packed batch holds several samples. Each sample is a list of spans in *logical* order
(text, then for every image: its noisy VAE copy if it is a generation target, then its clean copies - ViT
and clean VAE, in the order of the sequence format, `mogao.sequence.formats`). Physically, tokens are laid
out in three contiguous sections

    [understanding: TEXT + VIT] | [generation clean: VAE_CLEAN] | [generation noisy: VAE_NOISY]

and inside each section by sample, then by logical order. This layout makes the expert routing
two contiguous slices (one matmul per expert) and lets the FlashAttention varlen decomposition
address every region of the mask as contiguous ranges without copying K/V. RoPE positions and
the `order` ids keep the logical order, so nothing semantic depends on the physical one.

A wrapped copy (`Span.markers`, BAGEL's format) begins and ends with a marker token: a text id that the
understanding expert reads (physically in the first section) but that belongs to the copy for the mask - it
has the copy's modality and block id, so it is inside the copy's bidirectional block and, for a noisy copy,
hidden from every later token like the rest of the copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mogao.sequence.modality import Modality

_SECTION_OF = {Modality.TEXT: 0, Modality.VIT: 0, Modality.VAE_CLEAN: 1, Modality.VAE_NOISY: 2}


@dataclass(frozen=True)
class Span:
    """A run of tokens of one kind inside a sample (a text run or one image copy)."""

    kind: Modality
    length: int
    image: int = -1  # index of the image inside its sample; -1 for text
    markers: bool = False  # an image copy wrapped in its own begin/end marker tokens (counted in `length`)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"a span needs at least one token, got length={self.length}")
        if (self.kind == Modality.TEXT) != (self.image < 0):
            raise ValueError(f"{self.kind.name} span with image={self.image}: text spans have image=-1, image spans >= 0")
        if self.markers and (self.kind == Modality.TEXT or self.length < 3):
            raise ValueError(f"a wrapped span is an image copy of at least one token and its two markers, got "
                             f"{self.kind.name} of length {self.length}")

    @property
    def image_tokens(self) -> int:
        """Tokens of the image itself (without the markers of a wrapped copy)."""
        return self.length - 2 if self.markers else self.length


@dataclass
class TokenLayout:
    """Per-token ids of a packed batch in physical order (all tensors have shape (N,), int64).

    sample:   index of the sample inside the pack (0..S-1)
    order:    logical position of the token inside its sample (strictly increasing along the sample)
    modality: `Modality` value (the marker of a wrapped copy has its copy's: what the mask is stated on)
    block:    id of the bidirectional block the token belongs to (one per image copy, unique in
              the pack, markers of a wrapped copy included); -1 for text tokens
    n_und / n_gen_clean / n_noisy: section sizes (the physical layout described in the module doc)
    physical_of_logical: (N,) physical position of the i-th token when the samples' logical sequences
              are concatenated in sample order - i.e. `physical[physical_of_logical] = logical`.
    """

    sample: torch.Tensor
    order: torch.Tensor
    modality: torch.Tensor
    block: torch.Tensor
    n_und: int
    n_gen_clean: int
    n_noisy: int
    physical_of_logical: torch.Tensor
    sample_lengths: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.sample.numel())

    @property
    def num_samples(self) -> int:
        return len(self.sample_lengths)

    def to(self, device: torch.device | str) -> TokenLayout:
        return TokenLayout(
            self.sample.to(device), self.order.to(device), self.modality.to(device), self.block.to(device),
            self.n_und, self.n_gen_clean, self.n_noisy, self.physical_of_logical.to(device), list(self.sample_lengths),
        )

    @classmethod
    def from_spans(cls, samples: Sequence[Sequence[Span]]) -> TokenLayout:
        """Lay out samples (each a list of spans in logical order) in the three-section physical order."""
        # one row per span (section, sample, first order, length, modality, block); tokens are expanded at once
        span_rows: list[tuple[int, int, int, int, int, int]] = []
        block_id = 0
        lengths = []
        for s, spans in enumerate(samples):
            if not spans:
                raise ValueError(f"sample {s} of the pack has no spans")
            order = 0
            seen: set[int] = set()
            prev: tuple[int, set[Modality]] | None = None  # (image, its copies so far) of the previous span
            for span in spans:
                blk = -1
                if span.kind == Modality.TEXT:
                    prev = None
                else:
                    if prev is not None and prev[0] == span.image:
                        # the noisy copy first (the mask relies on it), each kind once
                        if span.kind == Modality.VAE_NOISY or span.kind in prev[1]:
                            raise ValueError(f"sample {s}: copies of image {span.image} must be ordered noisy, ViT, "
                                             f"clean VAE (or noisy, clean VAE, ViT), each once; got "
                                             f"{span.kind.name} after {', '.join(k.name for k in prev[1])}")
                        prev[1].add(span.kind)
                    elif span.image in seen:
                        raise ValueError(f"sample {s}: the copies of image {span.image} are not adjacent")
                    else:
                        prev = (span.image, {span.kind})
                    seen.add(span.image)
                    blk = block_id
                    block_id += 1
                if span.markers:  # begin marker, the image, end marker: the markers read by the understanding expert
                    n = span.length - 2
                    span_rows += [(0, s, order, 1, int(span.kind), blk),
                                  (_SECTION_OF[span.kind], s, order + 1, n, int(span.kind), blk),
                                  (0, s, order + n + 1, 1, int(span.kind), blk)]
                else:
                    span_rows.append((_SECTION_OF[span.kind], s, order, span.length, int(span.kind), blk))
                order += span.length
            lengths.append(order)
        t = torch.tensor(span_rows, dtype=torch.long).reshape(-1, 6)
        counts = t[:, 3]
        n = int(counts.sum())
        section, sample, modality, block = (t[:, i].repeat_interleave(counts) for i in (0, 1, 4, 5))
        first = torch.cumsum(counts, 0) - counts  # logical position of each span's first token
        within = torch.arange(n) - first.repeat_interleave(counts)
        order = t[:, 2].repeat_interleave(counts) + within
        # stable sort by (section, sample, order) gives the physical layout
        key = (section * (len(samples) + 1) + sample) * (max(lengths) + 1) + order
        perm = torch.argsort(key, stable=True)  # physical position -> logical position
        physical_of_logical = torch.empty(n, dtype=torch.long)
        physical_of_logical[perm] = torch.arange(n)
        sections = section[perm]
        return cls(
            sample=sample[perm], order=order[perm], modality=modality[perm], block=block[perm],
            n_und=int((sections == 0).sum()), n_gen_clean=int((sections == 1).sum()), n_noisy=int((sections == 2).sum()),
            physical_of_logical=physical_of_logical, sample_lengths=lengths,
        )
