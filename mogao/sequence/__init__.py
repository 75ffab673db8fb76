"""The packed-sequence contract every other floor speaks: token modality, the physical token layout, the sequence
formats and position schemes (IL-RoPE, BAGEL's 1-D positions), `PackedBatch` and the loss sums a forward
returns. It imports nothing else of mogao but `errors`."""

from mogao.sequence.batch import PackedBatch
from mogao.sequence.formats import POSITION_SCHEMES, SEQUENCE_FORMATS, image_copies
from mogao.sequence.layout import Span, TokenLayout
from mogao.sequence.loss import LossTerms
from mogao.sequence.modality import GENERATION, UNDERSTANDING, Modality
from mogao.sequence.positions import (
    bagel_positions,
    grid_cells,
    il_rope_positions,
    mrope_positions,
    sequence_positions,
)

__all__ = ["GENERATION", "POSITION_SCHEMES", "SEQUENCE_FORMATS", "UNDERSTANDING", "LossTerms", "Modality",
           "PackedBatch", "Span", "TokenLayout", "bagel_positions", "grid_cells", "il_rope_positions",
           "image_copies", "mrope_positions", "sequence_positions"]
