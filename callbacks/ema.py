"""Exponential moving average (EMA) of the trainable weights.

After optimizer step s (Lightning's `global_step`):

    s <= start_step:                 ema <- weights                  (follow the weights until the start)
    s > start_step, s % every == 0:  ema <- ema + (1 - decay) * (weights - ema)

The averaged set is exactly the parameters with `requires_grad=True`, by name (names of `pl_module.model`
when the LightningModule has one, else of the module itself). A parameter that starts training later (a
schedule unfreezes it) joins on the first step it is trainable, initialised from its value then; frozen
parameters take no EMA memory. A parameter frozen again keeps its average but stops being updated. Averages
are float32 tensors on the parameter's device, updated with one fused `torch._foreach_lerp_` per step.
Under sharding (FSDP2: DTensor parameters) each process averages its own shard only; the checkpointed state
and the saved EMA model hold the whole tensors (gathered on every rank, as checkpoints are dumped), and a
resume on any number of processes takes each one's slice of them.

The averages are part of the callback's `state_dict`, so resuming from a Lightning checkpoint continues the
exact same EMA. With `swap_for_validation` the EMA weights are loaded for every validation run and the
training weights are restored bit for bit afterwards. At the end of training the EMA weights are saved with
`model.save_pretrained(save_dir)` (default: "ema" under the trainer's log directory).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from mogao.training.rundir import run_dir


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor (sharing its storage), else the tensor."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _slice_for(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of the whole tensor `full` that this process holds of the (possibly sharded) parameter `p`."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor) or tuple(full.shape) != tuple(p.shape):
        return full
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))].contiguous()


def _target(pl_module: pl.LightningModule) -> nn.Module:
    """The module whose weights are averaged: `pl_module.model` when there is one."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


class EMA(Callback):
    """Keeps an EMA of the trainable weights (see the module doc).

    Args:
        decay: weight of the running average per update (0.999: a horizon of about 1000 updates).
        every_n_steps: update after every n-th optimizer step.
        start_step: the EMA equals the weights until this optimizer step, then starts averaging.
        swap_for_validation: validate with the EMA weights (training weights restored afterwards).
        save_dir: where the EMA model is saved at the end of training; None = "<log_dir>/ema".
    """

    def __init__(
        self,
        decay: float = 0.999,
        every_n_steps: int = 1,
        start_step: int = 0,
        swap_for_validation: bool = True,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"EMA: every_n_steps must be >= 1, got {every_n_steps}")
        if start_step < 0:
            raise ValueError(f"EMA: start_step must be >= 0, got {start_step}")
        self.decay = float(decay)
        self.every_n_steps = int(every_n_steps)
        self.start_step = int(start_step)
        self.swap_for_validation = swap_for_validation
        self.save_dir = save_dir
        self._ema: dict[str, torch.Tensor] = {}
        self._last_step = -1  # optimizer step of the last update (no double update under grad accumulation)
        self._backup: list[torch.Tensor] | None = None  # training weights while the EMA ones are swapped in
        self._swapped: list[torch.Tensor] = []
        self._sharded: dict[str, torch.Tensor] = {}  # name -> its DTensor parameter, for gathering the averages
        self._restored_whole: set[str] = set()  # averages loaded whole from a checkpoint, not yet sliced

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay)

    @property
    def averages(self) -> dict[str, torch.Tensor]:
        """The EMA tensors by parameter name (live tensors: do not modify)."""
        return dict(self._ema)

    # ---- bookkeeping ----------------------------------------------------------------------------
    def _trainable(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def _track(self, named: list[tuple[str, nn.Parameter]]) -> None:
        """Start averaging the parameters not tracked yet, from their current value; move restored
        averages onto their parameter's device."""
        from torch.distributed.tensor import DTensor

        for name, p in named:
            if isinstance(p, DTensor):
                self._sharded[name] = p
            e = self._ema.get(name)
            if e is None:
                self._ema[name] = _local(p.detach()).to(torch.float32, copy=True)
                continue
            if name in self._restored_whole:
                e = _slice_for(e, p)
                self._restored_whole.discard(name)
            self._ema[name] = e.to(_local(p).device)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        """Apply the update rule for optimizer step `step` to `module`'s trainable parameters."""
        named = self._trainable(module)
        self._track(named)
        if not named:
            return
        ema = [self._ema[n] for n, _ in named]
        weights = [_local(p.detach()).to(torch.float32) for _, p in named]  # no copy for float32 weights
        if step <= self.start_step:
            torch._foreach_copy_(ema, weights)
        elif step % self.every_n_steps == 0:
            torch._foreach_lerp_(ema, weights, 1.0 - self.decay)

    # ---- swapping -------------------------------------------------------------------------------
    @torch.no_grad()
    def swap_in(self, module: nn.Module) -> None:
        """Load the EMA weights into `module`, keeping a copy of its weights for `restore`."""
        if self._backup is not None:
            raise RuntimeError("EMA weights are already swapped in")
        params = dict(module.named_parameters())
        named = [(params[n], _slice_for(e, params[n]) if n in self._restored_whole else e)
                 for n, e in self._ema.items() if n in params]
        self._swapped = [_local(p) for p, _ in named]
        self._backup = [p.detach().clone() for p in self._swapped]
        if named:
            torch._foreach_copy_(self._swapped, [e for _, e in named])

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the training weights saved by `swap_in` (bit-identical)."""
        if self._backup is None:
            return
        if self._swapped:
            torch._foreach_copy_(self._swapped, self._backup)
        self._backup, self._swapped = None, []

    @contextmanager
    def swapped(self, module: nn.Module) -> Iterator[nn.Module]:
        """`with ema.swapped(model): ...` runs the block with the EMA weights loaded."""
        self.swap_in(module)
        try:
            yield module
        finally:
            self.restore()

    # ---- Lightning hooks ------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fresh run: the average starts at the initial weights. Resumed run: the restored state already
        # holds the averages and the step of the last update.
        if not self._ema:
            self._last_step = trainer.global_step
        self._track(self._trainable(_target(pl_module)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        self.update(_target(pl_module), step)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.swap_for_validation and self._ema and self._backup is None:
            self.swap_in(_target(pl_module))

    def on_validation_end(self, trainer, pl_module) -> None:
        self.restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.restore()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ema or trainer.interrupted:
            return
        directory = Path(self.save_dir) if self.save_dir else run_dir(trainer) / "ema"
        from mogao.training.strategies import full_state_dict

        module = _target(pl_module)
        with self.swapped(module):
            full = full_state_dict(module, keep=trainer.is_global_zero)  # every rank: gathers a sharded model
            if not trainer.is_global_zero:
                return
            if hasattr(module, "save_pretrained"):  # one unit, as the trained model (a sharded model: gathered)
                from mogao.model.io import save_model_directory

                save_model_directory(module, None, directory, full)
            else:
                directory.mkdir(parents=True, exist_ok=True)
                torch.save(module.state_dict(), directory / "model.pt")

    # ---- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # every process dumps the checkpoint: the shards of each average are gathered in the same order on all
        return {"ema": {n: self._whole(n, e) for n, e in self._ema.items()}, "last_step": self._last_step}

    def _whole(self, name: str, e: torch.Tensor) -> torch.Tensor:
        p = self._sharded.get(name)
        if p is None:
            return e
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(e, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()

    def load_state_dict(self, state_dict: dict) -> None:
        self._ema = dict(state_dict["ema"])
        self._restored_whole = set(self._ema)  # sliced to this process's shards when tracking starts
        self._last_step = int(state_dict["last_step"])
