"""What a stage trains, as one object: named parts in full (`FullParts`) or LoRA adapters (`LoraAdapters`).

Each gives the stage module the same four things: make the model's trainable set, change it (unfreezing by a
schedule), build optimizer parameter groups, and save what was trained at the end of fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mogao.errors import ConfigError
from mogao.lora.spec import LoraSpec
from mogao.training.parts import check_parts, part_parameters, set_trainable


class FullParts:
    """Named parts (`mogao.training.parts.PARTS`) train in full; a schedule may add parts during the run."""

    output_name = "model"  # the saved folder's default name in the run directory

    def __init__(self, parts: list[str]) -> None:
        self.parts = check_parts(parts, "model.train")

    def apply(self, model: nn.Module) -> dict[str, int]:
        """Make exactly these parts trainable; returns trainable parameter counts per part."""
        return set_trainable(model, self.parts)

    def change(self, model: nn.Module, parts: list[str]) -> dict[str, int]:
        self.parts = check_parts(parts, "train")
        return self.apply(model)

    def param_groups(self, model: nn.Module, parts: list[str], decay_all: bool) -> list[dict[str, Any]]:
        """Two groups per part (weight decay / none), in `parts` order, each naming its part; empty groups are
        left out."""
        by_part = part_parameters(model)
        groups = []
        for part in parts:
            decay, no_decay = [], []
            for name, p in by_part[part].items():
                (decay if decay_all or (p.dim() >= 2 and "embed" not in name) else no_decay).append(p)
            groups += [g for g in ({"params": decay, "part": part},
                                   {"params": no_decay, "weight_decay": 0.0, "part": part}) if g["params"]]
        return groups

    def step_context(self, seed_parts: tuple[Any, ...], devices: list[Any]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def save(self, model: nn.Module, tokenizer: Any, directory: Path, full: dict[str, torch.Tensor] | None) -> None:
        from mogao.model.io import save_model_directory

        save_model_directory(model, tokenizer, directory, full)  # one unit: a temporary folder renamed


class LoraAdapters:
    """LoRA / QLoRA adapters (and the spec's `full` parts) train; fixed for the run."""

    output_name = "adapter"

    def __init__(self, spec: LoraSpec, base_path: str | Path | None) -> None:
        self.spec = spec
        self.base_path = base_path
        self.parts = ["lora", *spec.full]

    def apply(self, model: nn.Module) -> dict[str, int]:
        from mogao.lora import apply_lora

        return apply_lora(model, self.spec, base_path=self.base_path)

    def change(self, model: nn.Module, parts: list[str]) -> dict[str, int]:
        if list(parts) != self.parts:
            raise ConfigError(f"cannot train {list(parts)} in a LoRA run: the adapters and model.lora.full "
                              f"({self.parts}) train; drop 'train' from the schedule's milestones")
        return {}

    def param_groups(self, model: nn.Module, parts: list[str], decay_all: bool) -> list[dict[str, Any]]:
        from mogao.lora import lora_param_groups

        return lora_param_groups(model, decay_all)  # the adapters and the spec's full parts: one pair of groups

    @contextlib.contextmanager
    def step_context(self, seed_parts: tuple[Any, ...], devices: list[Any]) -> Iterator[None]:
        """Adapter dropout drawn from the step and the batch, so a resumed run draws the same masks."""
        if self.spec.dropout <= 0:
            yield
            return
        from mogao.data import stable_seed

        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(stable_seed("lora-dropout", *seed_parts))
            yield

    def save(self, model: nn.Module, tokenizer: Any, directory: Path, full: dict[str, torch.Tensor] | None) -> None:
        from mogao.lora import save_adapter

        save_adapter(model, directory, full)
