"""Training throughput and model-FLOPs utilisation (MFU) of packed batches, over a sliding window of steps.

Logged at the steps Lightning writes logs (the trainer's `log_every_n_steps`) and at the last step (for
`trainer.callback_metrics`); every batch's work is counted:

    throughput/tokens_per_sec      packed tokens per second on this device
    throughput/samples_per_sec     samples per second on this device
    throughput/tflops_per_sec      training TFLOP/s on this device (`mogao.training.flops.training_flops`)
    throughput/mfu                 achieved / peak FLOP/s, averaged over devices (only when the peak is known)
    throughput/padding_fraction    share of the token budget the window's packs left empty
    throughput/global_*_per_sec    the three rates summed over all devices (only with more than one)

Rates are the work of the last `window` batches divided by the wall time between the end of the batch just
before the window and the end of the newest one, so data loading, the optimizer and logging are included.
On CUDA the clock is read after `torch.cuda.synchronize`. Time spent in validation is excluded: the window
starts afresh after each validation run.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from mogao.model.mogao import MogaoModel
from mogao.training.flops import peak_flops as lookup_peak_flops
from mogao.training.flops import training_flops
from mogao.training.rundir import logs_this_step

PREFIX = "throughput/"


@dataclass
class _Work:
    tokens: int
    samples: int
    budget: int
    flops: int | None


def compute_dtype(precision: str | int | None) -> torch.dtype:
    """The matmul dtype a Lightning precision setting ("bf16-mixed", "16-true", "32", ...) computes in."""
    p = str(precision)
    if "bf16" in p:
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    if p.startswith("64"):
        return torch.float64
    return torch.float32


class Throughput(Callback):
    """Logs tokens/s, samples/s, TFLOP/s, MFU and padding of training batches (see the module doc).

    Args:
        window: number of training batches the rates are measured over.
        peak_flops: peak FLOP/s of one device, overriding the lookup by device name and precision
            (`mogao.training.flops.peak_flops`, None on CPU and unknown accelerators: MFU is then not logged).

    Batches must be `PackedBatch`es (anything with `num_tokens` and a `layout`); FLOPs are counted when the
    LightningModule's `.model` is a `MogaoModel`, otherwise only token and sample rates are logged.
    """

    def __init__(self, window: int = 10, peak_flops: float | None = None) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"Throughput: window must be >= 1, got {window}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"Throughput: peak_flops must be positive, got {peak_flops}")
        self.window = window
        self._peak_override = peak_flops
        self.peak_flops: float | None = peak_flops
        self._times: deque[float] = deque(maxlen=window + 1)
        self._work: deque[_Work] = deque(maxlen=window)
        self._device = torch.device("cpu")

    # ---- clock ----------------------------------------------------------------------------------
    def _now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def _reset(self) -> None:
        self._times.clear()
        self._work.clear()

    # ---- hooks ----------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._device = trainer.strategy.root_device
        if self._peak_override is None:
            self.peak_flops = lookup_peak_flops(self._device, compute_dtype(trainer.precision))
        self._reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self._times:
            self._times.append(self._now())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self._times or getattr(batch, "layout", None) is None:
            return
        model = getattr(pl_module, "model", None)
        flops = training_flops(model, batch).total if isinstance(model, MogaoModel) else None
        self._work.append(_Work(batch.num_tokens, batch.layout.num_samples, int(batch.budget), flops))
        self._times.append(self._now())
        if not logs_this_step(trainer):
            return  # a `log_dict` costs a few ms on a CPU: a tenth of a tiny model's step
        metrics = self._rates(trainer, pl_module)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._reset()  # keep validation time out of the training rates

    # ---- metrics --------------------------------------------------------------------------------
    def _rates(self, trainer, pl_module) -> dict[str, float]:
        elapsed = self._times[-1] - self._times[0]
        if trainer.world_size == 1 and (elapsed <= 0 or not math.isfinite(elapsed)):
            return {}
        # (with several ranks every rank reaches the all-reduce below, whatever its own clock says)
        elapsed = elapsed if elapsed > 0 and math.isfinite(elapsed) else math.inf
        work = list(self._work)
        tokens = sum(w.tokens for w in work) / elapsed
        samples = sum(w.samples for w in work) / elapsed
        has_flops = all(w.flops is not None for w in work)
        flops = sum(w.flops for w in work) / elapsed if has_flops else 0.0
        out = {f"{PREFIX}tokens_per_sec": tokens, f"{PREFIX}samples_per_sec": samples}
        if has_flops:
            out[f"{PREFIX}tflops_per_sec"] = flops / 1e12
        budget = sum(w.budget for w in work)
        if budget > 0:
            out[f"{PREFIX}padding_fraction"] = 1.0 - sum(w.tokens for w in work) / budget
        world = trainer.world_size
        global_flops = flops
        if world > 1:  # one all-reduce of three scalars
            rates = torch.tensor([tokens, samples, flops], dtype=torch.float64, device=pl_module.device)
            g_tokens, g_samples, global_flops = trainer.strategy.reduce(rates, reduce_op="sum").tolist()
            out[f"{PREFIX}global_tokens_per_sec"] = g_tokens
            out[f"{PREFIX}global_samples_per_sec"] = g_samples
            if has_flops:
                out[f"{PREFIX}global_tflops_per_sec"] = global_flops / 1e12
        if has_flops and self.peak_flops:
            out[f"{PREFIX}mfu"] = global_flops / (world * self.peak_flops)
        return out
