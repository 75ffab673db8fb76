"""Loss terms and their global normalisation across data-parallel ranks.

Each rank returns *sums* of weighted per-token losses and the sums of the weights. The loss a rank
back-propagates is its weighted sum divided by the MEAN over ranks of the weight sums (one all-reduce of two
scalars). Data-parallel training averages gradients over R ranks, so the applied gradient is
(1/R) * sum_r grad S_r / ((1/R) * sum_r W_r) = grad (sum_r S_r) / (sum_r W_r): exactly the single-process
gradient of the whole global batch, whatever the token counts per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mogao.sequence.loss import LossTerms


@dataclass
class CombinedLoss:
    loss: torch.Tensor  # what to back-propagate
    text_loss: torch.Tensor  # this rank's mean CE (detached, for logging)
    image_loss: torch.Tensor  # this rank's mean flow MSE (detached, for logging)
    text_weight_global: torch.Tensor
    image_weight_global: torch.Tensor


def _mean_over_ranks(x: torch.Tensor, group: object | None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x / dist.get_world_size(group)
    return x


def combine_losses(
    terms: LossTerms, lambda_text: float = 1.0, lambda_image: float = 1.0, group: object | None = None
) -> CombinedLoss:
    """λ_text·CE + λ_img·MSE with global normalisation (see module doc). A term with no weight anywhere is 0."""
    weights = torch.stack([terms.text_weight.detach(), terms.image_weight.detach()]).float()
    mean_w = _mean_over_ranks(weights, group)
    tiny = torch.finfo(torch.float32).tiny
    text = terms.text_sum / mean_w[0].clamp_min(tiny)
    image = terms.image_sum / mean_w[1].clamp_min(tiny)
    loss = lambda_text * text + lambda_image * image
    local_w = weights.clamp_min(tiny)
    return CombinedLoss(
        loss=loss,
        text_loss=(terms.text_sum.detach() / local_w[0]),
        image_loss=(terms.image_sum.detach() / local_w[1]),
        text_weight_global=mean_w[0],
        image_weight_global=mean_w[1],
    )
