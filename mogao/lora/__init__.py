"""LoRA / QLoRA fine-tuning of a trained Mogao model with `peft` (and `bitsandbytes` for the 4-bit base).

    spec = LoraSpec(gen=["q_proj", "k_proj", "v_proj", "o_proj"], und=["q_proj", "v_proj"], rank=16)
    apply_lora(model, spec, base_path)       # inject; only adapters (+ spec.full) train
    save_adapter(model, "run/adapter")       # adapter weights + spec + the base's identity
    model = load_adapter(load_model(base), "run/adapter")   # refuses another base
    merge_lora(model).save_pretrained(out)   # a plain model again

Training: `model.init_args.lora` of any stage (see `recipes/lora/`); the adapter is saved to
`<run dir>/adapter` at the end of fit. `mogao lora merge` folds an adapter into a full saved model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mogao.lora.adapter import (
    adapter_state_dict,
    apply_lora,
    base_identity,
    lora_param_groups,
    merge_lora,
    read_adapter_config,
    save_adapter,
)
from mogao.lora.spec import LoraSpec

if TYPE_CHECKING:
    from mogao.model.mogao import MogaoModel

__all__ = ["LoraSpec", "adapter_state_dict", "apply_lora", "base_identity", "load_adapter", "lora_param_groups",
           "merge_lora", "read_adapter_config", "save_adapter"]


def load_adapter(model: MogaoModel, path: str | Path) -> MogaoModel:
    """Put the adapter saved in `path` onto `model` (in place; returned for chaining), every weight frozen.

    Raises `ConfigError` naming both bases when the adapter was trained on another base model (by fingerprint
    of architecture and weights), and when `path` is not an adapter directory.
    """
    from mogao.lora.adapter import _load_adapter

    return _load_adapter(model, path)
