"""The physical token layout of a packed batch and the per-token ids the ECTF mask is stated on.

A packed batch holds several samples. Each sample is a list of spans in *logical* order
(text, then for every image: its noisy VAE copy if it is a generation target, its ViT copy,
its clean VAE copy). Physically, tokens are laid out in three contiguous sections

    [understanding: TEXT + VIT] | [generation clean: VAE_CLEAN] | [generation noisy: VAE_NOISY]

and inside each section by sample, then by logical order. This layout makes the expert routing
two contiguous slices (one matmul per expert) and lets the FlashAttention varlen decomposition
address every region of the mask as contiguous ranges without copying K/V. RoPE positions and
the `order` ids keep the logical order, so nothing semantic depends on the physical one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mogao.sequence.modality import Modality

_SECTION_OF = {Modality.TEXT: 0, Modality.VIT: 0, Modality.VAE_CLEAN: 1, Modality.VAE_NOISY: 2}
# order of an image's copies inside a sample: the mask rules rely on the noisy copy coming first
_COPY_RANK = {Modality.VAE_NOISY: 0, Modality.VIT: 1, Modality.VAE_CLEAN: 2}


@dataclass(frozen=True)
class Span:
    """A run of tokens of one kind inside a sample (a text run or one image copy)."""

    kind: Modality
    length: int
    image: int = -1  # index of the image inside its sample; -1 for text

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"a span needs at least one token, got length={self.length}")
        if (self.kind == Modality.TEXT) != (self.image < 0):
            raise ValueError(f"{self.kind.name} span with image={self.image}: text spans have image=-1, image spans >= 0")


@dataclass
class TokenLayout:
    """Per-token ids of a packed batch in physical order (all tensors have shape (N,), int64).

    sample:   index of the sample inside the pack (0..S-1)
    order:    logical position of the token inside its sample (strictly increasing along the sample)
    modality: `Modality` value
    block:    id of the bidirectional block the token belongs to (one per image copy, unique in
              the pack); -1 for text tokens
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
            prev: tuple[int, int] | None = None  # (image, copy rank) of the previous span
            for span in spans:
                blk = -1
                if span.kind == Modality.TEXT:
                    prev = None
                else:
                    rank = _COPY_RANK[span.kind]
                    if prev is not None and prev[0] == span.image:
                        if rank <= prev[1]:
                            raise ValueError(f"sample {s}: copies of image {span.image} must be ordered noisy, ViT, "
                                             f"clean VAE; got {span.kind.name} after a copy of rank {prev[1]}")
                    elif span.image in seen:
                        raise ValueError(f"sample {s}: the copies of image {span.image} are not adjacent")
                    seen.add(span.image)
                    prev = (span.image, rank)
                    blk = block_id
                    block_id += 1
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
