"""The packed-sequence contract every other floor speaks: token modality, the physical token layout, the IL-RoPE
position rule, `PackedBatch` and the loss sums a forward returns. It imports nothing else of mogao but `errors`."""

from mogao.sequence.batch import PackedBatch
from mogao.sequence.layout import Span, TokenLayout
from mogao.sequence.loss import LossTerms
from mogao.sequence.modality import GENERATION, UNDERSTANDING, Modality
from mogao.sequence.positions import il_rope_positions

__all__ = ["GENERATION", "UNDERSTANDING", "LossTerms", "Modality", "PackedBatch", "Span", "TokenLayout",
           "il_rope_positions"]
