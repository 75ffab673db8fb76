"""Optimizer and LR-schedule pieces that recipes name by class path (`OptimizerCallable` / `LRSchedulerCallable`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from mogao.errors import ConfigError


class WarmupCosine(LambdaLR):
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_ratio`·lr at `total_steps` (held after)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int = 1000,
                 min_ratio: float = 0.1, last_epoch: int = -1) -> None:
        if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
            raise ConfigError(f"WarmupCosine: need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                              f"warmup_steps={warmup_steps}, total_steps={total_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ConfigError(f"WarmupCosine: min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def extend_scheduler(scheduler: Any, group: dict[str, Any]) -> None:
    """Give a torch LR scheduler the entries of an optimizer group added after it was built (a part unfrozen
    during the run): its base rate, and (LambdaLR, MultiplicativeLR) the first group's factor function."""
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs.append(group.get("initial_lr", group["lr"]))
    if isinstance(getattr(scheduler, "lr_lambdas", None), list):
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    if isinstance(getattr(scheduler, "_last_lr", None), list):
        scheduler._last_lr.append(group["lr"])


def AdamW8bit(params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
              weight_decay: float = 0.0, paged: bool = False) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW (optimizer states in 8 bits: ~4x less optimizer memory). CUDA only.

    On CPU this stops with a clear error rather than silently training with another optimizer.
    """
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if not tensors or not all(t.is_cuda for t in tensors):
        raise ConfigError("AdamW8bit (bitsandbytes) needs the parameters on a CUDA device; on CPU use "
                          "torch.optim.AdamW (set optimizer.class_path: torch.optim.AdamW)")
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError("AdamW8bit needs bitsandbytes: pip install bitsandbytes") from e
    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
