"""`SampleLogger`: text-to-image samples of the model being trained, every N steps, as a captioned image grid.

The grid goes to `{log_dir}/samples/step_{global_step:06d}.png` and, with a `TensorBoardLogger`, to the
"samples" image of the run. Sampling uses `mogao.inference.tasks.text_to_image` (the KV-cached generation
loop with classifier-free guidance that `mogao generate` runs) on `pl_module.model` with `pl_module.tokenizer`,
and leaves the training state as it found it: module modes are restored and the global random number
generators (torch CPU and CUDA, numpy, Python) are reset afterwards, so a run with this callback trains exactly
like one without it.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.seed import isolate_rng

from mogao.errors import ConfigError
from mogao.inference import GenerationConfig, Guidance, image_grid
from mogao.inference.tasks import text_to_image
from mogao.training.rundir import run_dir


class SampleLogger(pl.Callback):
    """Generate one image per prompt every `every_n_steps` optimizer steps and log the captioned grid.

    Args:
        prompts: text-to-image prompts, one image each (the caption under it).
        every_n_steps: log when the global step is a multiple of this (0: only at the end of training).
        steps: Euler steps of the sampler.
        cfg_scale: classifier-free guidance scale of the text (1 = no guidance, one forward per step); None =
            the default of `mogao generate` (`Guidance().text_scale`).
        image_size: side of the square samples in pixels (a multiple of the model's VAE patch).
        seed: noise seed; image i uses seed + i, so every logged grid starts from the same noise.
        on_fit_end: also log once when training ends (unless that step was just logged).
        shift: timestep shift of the sampling schedule (1 = uniform in σ); None = the model's training shift
            for the image's token count, as `mogao generate` samples.
        cols: images per row of the grid.

    The pl_module must expose `model` (a `MogaoModel`) and `tokenizer`. Images are drawn on global rank 0;
    under a sharded strategy (FSDP, ModelParallel) every rank runs the sampler, because each forward needs
    all ranks, and rank 0 writes. `last_path` is the file of the latest grid (None before the first).
    """

    def __init__(
        self,
        prompts: list[str],
        every_n_steps: int = 100,
        steps: int = 20,
        cfg_scale: float | None = None,
        image_size: int = 32,
        seed: int = 0,
        on_fit_end: bool = True,
        shift: float | None = None,
        cols: int = 4,
    ) -> None:
        super().__init__()
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ConfigError("SampleLogger.prompts must be a non-empty list of non-empty strings")
        if every_n_steps < 0 or steps < 1 or image_size < 1 or cols < 1:
            raise ConfigError(
                f"SampleLogger: every_n_steps must be >= 0 and steps, image_size, cols >= 1; got "
                f"every_n_steps={every_n_steps}, steps={steps}, image_size={image_size}, cols={cols}"
            )
        self.prompts = list(prompts)
        self.every_n_steps = every_n_steps
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.image_size = image_size
        self.seed = seed
        # stored under another name: an attribute `on_fit_end` would hide the Callback hook of that name
        self.log_at_end = on_fit_end
        self.shift = shift
        self.cols = cols
        self.last_path: Path | None = None
        self._last_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fail at start-up, not after the first N steps, when the module or the image size cannot work."""
        model = getattr(pl_module, "model", None)
        if model is None or getattr(pl_module, "tokenizer", None) is None:
            raise ConfigError(
                f"SampleLogger needs a LightningModule with `model` and `tokenizer`; "
                f"{type(pl_module).__name__} lacks one of them"
            )
        patch = getattr(model, "vae_patch", 1)
        if self.image_size % patch:
            raise ConfigError(
                f"SampleLogger.image_size={self.image_size} must be a multiple of the model's VAE "
                f"patch ({patch} pixels)"
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs,
        batch,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        # under gradient accumulation several batches end at the same global step: log it once
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_train_end, not on_fit_end: the model is still on its device and the loggers are still open
        if self.log_at_end and trainer.global_step != self._last_step:
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path | None:
        """Sample, save and log one grid at the current global step; returns the PNG's path on rank 0."""
        step = trainer.global_step
        self._last_step = step
        root = run_dir(trainer)
        sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        if not (trainer.is_global_zero or sharded):
            return None
        config = GenerationConfig(image_size=self.image_size, steps=self.steps, shift=self.shift, seed=self.seed)
        # (a text-to-image prompt has no condition image: the image scale only matters for `enabled`)
        guidance = Guidance() if self.cfg_scale is None else Guidance(text_scale=self.cfg_scale, image_scale=1.0)
        with isolate_rng():
            images = text_to_image(pl_module.model, pl_module.tokenizer, self.prompts, config=config,
                                   guidance=guidance)
        if not trainer.is_global_zero:
            return None
        grid = image_grid(images, self.prompts, cols=self.cols)
        path = root / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        self.last_path = path
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                chw = np.ascontiguousarray(np.asarray(grid).transpose(2, 0, 1))
                logger.experiment.add_image("samples", chw, step, dataformats="CHW")
        return path
