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

from mogao.modality import Modality

_SECTION_OF = {Modality.TEXT: 0, Modality.VIT: 0, Modality.VAE_CLEAN: 1, Modality.VAE_NOISY: 2}


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
    logical_index: (N,) physical position of the i-th token when the samples' logical sequences
              are concatenated in sample order - i.e. `physical[logical_index] = logical`.
    """

    sample: torch.Tensor
    order: torch.Tensor
    modality: torch.Tensor
    block: torch.Tensor
    n_und: int
    n_gen_clean: int
    n_noisy: int
    logical_index: torch.Tensor
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
            self.n_und, self.n_gen_clean, self.n_noisy, self.logical_index.to(device), list(self.sample_lengths),
        )

    @classmethod
    def from_spans(cls, samples: Sequence[Sequence[Span]]) -> TokenLayout:
        """Lay out samples (each a list of spans in logical order) in the three-section physical order."""
        rows: list[tuple[int, int, int, int, int, int]] = []  # (section, sample, order, modality, block, logical)
        block_id = 0
        logical = 0
        lengths = []
        for s, spans in enumerate(samples):
            if not spans:
                raise ValueError(f"sample {s} of the pack has no spans")
            order = 0
            for span in spans:
                blk = -1
                if span.kind != Modality.TEXT:
                    blk = block_id
                    block_id += 1
                for _ in range(span.length):
                    rows.append((_SECTION_OF[span.kind], s, order, int(span.kind), blk, logical))
                    order += 1
                    logical += 1
            lengths.append(order)
        # stable sort by (section, sample, order) gives the physical layout
        rows.sort(key=lambda r: (r[0], r[1], r[2]))
        t = torch.tensor(rows, dtype=torch.long).reshape(-1, 6)
        sections = t[:, 0]
        logical_index = torch.empty(len(rows), dtype=torch.long)
        logical_index[t[:, 5]] = torch.arange(len(rows))
        return cls(
            sample=t[:, 1].contiguous(), order=t[:, 2].contiguous(), modality=t[:, 3].contiguous(),
            block=t[:, 4].contiguous(),
            n_und=int((sections == 0).sum()), n_gen_clean=int((sections == 1).sum()), n_noisy=int((sections == 2).sum()),
            logical_index=logical_index, sample_lengths=lengths,
        )
