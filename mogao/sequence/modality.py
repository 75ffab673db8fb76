"""Per-token modality ids: the fixed routing key of the deep-fusion backbone and of the ECTF mask."""

from __future__ import annotations

from enum import IntEnum


class Modality(IntEnum):
    """What a token of a packed sequence is.

    TEXT and VIT tokens go through the understanding expert, VAE tokens (clean and noisy)
    through the generation expert. Routing is by this id alone - there is no gate.
    """

    TEXT = 0
    VIT = 1
    VAE_CLEAN = 2
    VAE_NOISY = 3

    @property
    def is_image(self) -> bool:
        return self is not Modality.TEXT

    @property
    def expert(self) -> int:
        """0 = understanding expert, 1 = generation expert."""
        return int(self >= Modality.VAE_CLEAN)


UNDERSTANDING, GENERATION = 0, 1
