"""Distributed strategy presets for Mogao models, usable by class path from recipes and `--trainer.strategy`."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy


def _layer_classes() -> set[type]:
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    from mogao.model.backbone import MoTDecoderLayer

    return {MoTDecoderLayer, SiglipEncoderLayer}


class MoTFSDPStrategy(FSDPStrategy):
    """FSDP with one wrapping unit per MoT decoder layer (both experts of a layer together) and per ViT layer,
    and activation checkpointing of the same units when `activation_checkpointing` is true.

    Other arguments go to `lightning.pytorch.strategies.FSDPStrategy` (sharding_strategy, state_dict_type,
    cpu_offload, mixed_precision, ...).
    """

    def __init__(self, activation_checkpointing: bool = True, sharding_strategy: str = "FULL_SHARD",
                 state_dict_type: str = "sharded", limit_all_gathers: bool = True, **kwargs: Any) -> None:
        layers = _layer_classes()
        super().__init__(auto_wrap_policy=layers,
                         activation_checkpointing_policy=layers if activation_checkpointing else None,
                         sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                         limit_all_gathers=limit_all_gathers, use_orig_params=True, **kwargs)
