"""`LossTerms`: the unnormalised loss sums a model forward returns (normalised in `mogao.training.objectives`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossTerms:
    """Unnormalised loss sums of one rank's batch (0-d tensors)."""

    text_sum: torch.Tensor
    text_weight: torch.Tensor
    image_sum: torch.Tensor
    image_weight: torch.Tensor
