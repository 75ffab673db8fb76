"""QLoRA's 4-bit base: the adapted experts' Linear layers become bitsandbytes `Linear4bit` (NF4 weights, bf16
compute). bitsandbytes quantizes on the GPU, so this needs CUDA; without it nothing is replaced and a warning
says the run is plain LoRA."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

CPU_WARNING = ("model.lora.quantize='nf4' needs CUDA (bitsandbytes quantizes on the GPU); no GPU here, so the "
               "base weights stay in full precision and this run is plain LoRA, not QLoRA")


def quantize_nf4(model: nn.Module, names: list[str], compute_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Replace the Linear layers `names` of `model` by 4-bit NF4 `bnb.nn.Linear4bit` layers holding the same
    weights (quantized when the model moves to CUDA). Returns False, after a warning, when CUDA is missing."""
    if not torch.cuda.is_available():
        log.warning(CPU_WARNING)
        return False
    import bitsandbytes as bnb

    for name in names:
        old = model.get_submodule(name)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
        new.weight = bnb.nn.Params4bit(old.weight.data.to(compute_dtype), requires_grad=False, quant_type="nf4",
                                        module=new)  # (the module keeps the quant state when FSDP2 swaps the weight)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return True
