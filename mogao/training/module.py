"""LightningModules of the training stages. They all wrap the one shared `MogaoModel`; a stage decides what is
trained, how the losses are weighted, how optimizer groups are formed and what validation measures.

    UnderstandingModule   image → text (captions, VQA): trains the understanding expert + connector by default
    T2IModule             text → image: trains both experts by default (text conditioning lives in the
                          understanding expert's keys/values)
    InterleavedModule     everything: trains both experts and the connector

The model comes from pretrained components (`model`: LLM, SigLIP, autoencoder) or from a saved Mogao model
(`init_from`: e.g. the previous curriculum stage). Optimizer and LR schedule are injected (recipes give class
paths), and `configure_optimizers` builds weight-decay / no-decay groups over the trainable parameters only.

Numerical faults (a non-finite loss or gradient norm) follow the policy of `mogao.training.faults`; the count
is logged as `train/nonfinite_steps`.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import SumMetric

from mogao.errors import ConfigError
from mogao.lora.spec import LoraSpec
from mogao.model.config import ModelConfig
from mogao.model.io import load_model, resolve_checkpoint
from mogao.model.mogao import MogaoModel
from mogao.model.tiny import TinySpec, ensure_tiny_components
from mogao.sequence import PackedBatch
from mogao.training.datamodule import DataPosition
from mogao.training.exact_match import ExactMatch
from mogao.training.faults import ELSEWHERE, NonFinite, NumericalFaults
from mogao.training.objectives import combine_losses
from mogao.training.optim import extend_scheduler
from mogao.training.parts import check_lr_scale
from mogao.training.rundir import logs_this_step, run_dir
from mogao.training.trainable import FullParts, LoraAdapters

log = logging.getLogger(__name__)


# a step skipped for a non-finite loss returns None on purpose, and is logged with its samples here
warnings.filterwarnings("ignore", message="`training_step` returned `None`")


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


class MogaoModule(pl.LightningModule):
    """One training stage of a Mogao model (see the module docstring).

    Args:
        model: how to build the model from pretrained components (ignored except for runtime options - attention
            backend, timestep sampling, text_sees_vae - when `init_from` is given).
        tokenizer: directory of the tokenizer; the LLM's embeddings are resized to its length.
        init_from: directory of a saved Mogao model (`save_pretrained`) to start from instead of the components.
        generation_from_understanding: start the generation expert (every layer, and its final norm) as a copy of
            the understanding expert of the `init_from` model - for a stage whose earlier stage trained only the
            understanding expert from a random LLM (the tiny curriculum's text-to-image stage); a real LLM's
            generation expert already starts as the LLM's copy. A resumed run's checkpoint overrides it.
        tiny: build missing tokenizer / LLM / ViT directories as tiny random components of these sizes (CPU recipes).
        train: parts to train: any of "und", "gen", "vit", "connector" (None: the stage's default).
        lambda_text: weight of the text cross-entropy (None: the stage's default).
        lambda_image: weight of the flow-matching loss (None: the stage's default).
        optimizer: optimizer factory, called with parameter groups (decay / no decay).
        lr_scale: learning-rate multiplier per part (e.g. `{und: 0.25}`: the understanding expert learns at a
            quarter of the optimizer's rate, the other parts at the full rate); the scheduler scales each
            group's rate alike. Multiples are > 0 (a part that must not learn is left out of `train`). Not with
            `lora`.
        lr_scheduler: LR-scheduler factory; stepped every optimizer step.
        weight_decay_norms_and_biases: also apply weight decay to norms, biases and embeddings.
        exact_match_samples: validation samples per source whose final answer is generated greedily and compared
            with the reference (0 = off); only sources whose samples end in an answer after a prompt.
        save_dir: where the trained model is saved at the end of fit (default: `<log_dir>/model`).
        nonfinite: what a non-finite loss or gradient norm does: "skip" (the step makes no update; the run
            goes on) or "stop" (the run stops with a NumericalError at once).
        max_nonfinite_consecutive: with "skip", stop with a NumericalError after this many faulty steps in a
            row.
        lora: fine-tune with LoRA / QLoRA adapters (`mogao.lora.LoraSpec`) instead of full weights: only the
            adapters and `lora.full` train (`train` must then be left unset), and the end of fit saves the
            adapter alone to `<log_dir>/adapter` (weights, spec and the base model's identity).
        meta_init: build the model on the meta device here (architecture from the components' configs, no weights
            read) and fill it in `configure_model`: under `MoTFSDP2Strategy` after sharding, each rank reading
            only the rows of its own shards from the safetensors files (`mogao.training.shard_load`); under
            other strategies the whole model, in each process. Not with `lora`.
    """

    default_train: tuple[str, ...] = ("und", "gen", "connector")
    default_lambda_text: float = 1.0
    default_lambda_image: float = 1.0
    default_exact_match: int = 0

    def __init__(
        self,
        model: ModelConfig | None = None,
        tokenizer: str | None = None,
        init_from: str | None = None,
        tiny: TinySpec | None = None,
        train: list[str] | None = None,
        lambda_text: float | None = None,
        lambda_image: float | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        weight_decay_norms_and_biases: bool = False,
        exact_match_samples: int | None = None,
        save_dir: str | None = None,
        nonfinite: NonFinite = "skip",
        max_nonfinite_consecutive: int = 5,
        lora: LoraSpec | None = None,
        meta_init: bool = False,
        generation_from_understanding: bool = False,
        lr_scale: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if meta_init and lora is not None:
            raise ConfigError("model.meta_init and model.lora are exclusive: LoRA wraps loaded weights; set "
                              "model.meta_init: false for a LoRA run")
        if lr_scale and lora is not None:
            raise ConfigError("model.lr_scale and model.lora are exclusive: a LoRA run's adapters form one group")
        self.lr_scale = {k: float(v) for k, v in check_lr_scale(lr_scale or {}).items()}
        self.meta_init = meta_init
        self.weight_plan = None  # with meta_init: where configure_model reads the weights from
        self.faults = NumericalFaults(nonfinite, max_nonfinite_consecutive)
        if model is None and init_from is None:
            raise ConfigError("model: give 'model' (pretrained components: llm, vit, autoencoder) or 'init_from' "
                              "(a saved mogao model directory)")
        if tokenizer is None:
            raise ConfigError("model.tokenizer: the tokenizer directory is required")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.tokenizer_path = str(tokenizer)
        if tiny is not None and model is not None:
            ensure_tiny_components(tiny, tokenizer=tokenizer, llm=model.llm, vit=model.vit)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(str(tokenizer), "tokenizer"),
                                                       trust_remote_code=False)
        self.model = self._build_model(model, init_from, full=lora is None).train()  # (checkpoints load in eval mode)
        if generation_from_understanding:
            if init_from is None or meta_init:
                raise ConfigError("model.generation_from_understanding copies the understanding expert of the model "
                                  "read with model.init_from (not with meta_init)")
            self.model.backbone.copy_understanding_to_generation()
        if lora is not None and train is not None:
            raise ConfigError("model.train and model.lora are exclusive: with LoRA only the adapters train; "
                              "list parts to train in full alongside them in model.lora.full")
        self.lora = lora
        self.trainable = (LoraAdapters(lora, init_from or getattr(model, "llm", None)) if lora is not None
                          else FullParts(list(train if train is not None else self.default_train)))
        self.trainable_counts = self.trainable.apply(self.model)
        self.optimizer_parts = list(self.train_parts)
        self.lambda_text = self.default_lambda_text if lambda_text is None else float(lambda_text)
        self.lambda_image = self.default_lambda_image if lambda_image is None else float(lambda_image)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.decay_all = weight_decay_norms_and_biases
        self.exact_match_samples = self.default_exact_match if exact_match_samples is None else exact_match_samples
        self.save_dir = save_dir
        self.last_metrics: dict[str, float] = {}
        self._val_sums: torch.nn.ModuleDict | None = None
        self._skip_update = False  # the coming optimizer step must make no update
        self._batch_info: dict[str, Any] = {"sample_ids": [], "source": ""}

    def _build_model(self, cfg: ModelConfig | None, init_from: str | None, full: bool = True) -> MogaoModel:
        source, overrides = cfg, None
        if init_from is not None:
            source = Path(init_from).expanduser()
            if not source.is_dir():
                raise ConfigError(f"model.init_from: directory not found: '{init_from}'")
            overrides = {} if cfg is None else {"attention": cfg.attention, "text_sees_vae": cfg.text_sees_vae,
                                                "timestep_sampling": cfg.timestep_sampling}
        rng = torch.get_rng_state()  # the new layers' draws start here (per-shard loading draws them again)
        from mogao.bagel.folder import is_bagel_folder

        if init_from is not None and is_bagel_folder(source):  # a published BAGEL folder, read as it is
            if self.meta_init:  # built without weights; each rank reads its shards' rows in configure_model
                from mogao.bagel.load import meta_bagel_model
                from mogao.training.shard_load import plan_bagel_weights

                model, info = meta_bagel_model(source, overrides=overrides)  # (float32: the master weights)
                self.weight_plan = plan_bagel_weights(model, info)
                return model
            from mogao.bagel.load import load_any_model

            model = load_any_model(source, overrides=overrides)  # (in the files' dtypes: bf16, the VAE fp32)
            # trained in full: fp32 master weights (mixed precision computes in bf16); a LoRA base stays as read
            return model.float() if full else model
        model = load_model(source, meta=self.meta_init, tokenizer=self.tokenizer, overrides=overrides)
        if self.meta_init:
            from mogao.training.shard_load import plan_weights

            self.weight_plan = plan_weights(model, init_from, rng)
        return model

    # ---- what trains ----------------------------------------------------------------------------------
    @property
    def train_parts(self) -> list[str]:
        return list(self.trainable.parts)

    def set_train_parts(self, parts: list[str]) -> None:
        """Change what trains (e.g. unfreezing by a schedule); the optimizer gains groups for new parts."""
        before = {id(p) for p in self.model.parameters() if p.requires_grad}
        counts = self.trainable.change(self.model, list(parts))
        if counts:
            self.trainable_counts = counts
        if self._trainer is not None and before != {id(p) for p in self.model.parameters() if p.requires_grad}:
            from mogao.training.strategies import refresh_data_parallel

            refresh_data_parallel(self.trainer.strategy)  # DDP learns the new set of trainable parameters
        new = [p for p in self.train_parts if p not in self.optimizer_parts]
        if not new:
            return
        self.optimizer_parts += new
        if self._trainer is not None and self.trainer.optimizers:
            opt = self.trainer.optimizers[0]
            first = opt.param_groups[0]
            template = {k: v for k, v in first.items() if k not in ("params", "weight_decay", "part")}
            base = self.lr_scale_of(first.get("part"))
            for group in self._param_groups(new):
                ratio = self.lr_scale_of(group.get("part")) / base  # the first group's rate is already scaled
                scaled = {k: template[k] * ratio for k in ("lr", "initial_lr") if k in template}
                opt.add_param_group({**template, **scaled, **group})
                for config in self.trainer.lr_scheduler_configs:  # a scheduler keeps a list entry per group
                    extend_scheduler(config.scheduler, opt.param_groups[-1])

    def _param_groups(self, parts: list[str]) -> list[dict[str, Any]]:
        return self.trainable.param_groups(self.model, parts, self.decay_all)

    def lr_scale_of(self, part: str | None) -> float:
        """The multiple of the optimizer's rate a group of `part` learns at (`lr_scale`; 1 for other groups)."""
        return self.lr_scale.get(part, 1.0) if part is not None else 1.0

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            run_dir(self.trainer)  # every rank: the first call is a broadcast, later ones (on one rank) are not

    def configure_model(self) -> None:
        """Sharding hook: a strategy with a `parallelize(module)` method (`MoTFSDP2Strategy`) shards the model
        here, before the optimizer is built; other strategies wrap the model themselves."""
        parallelize = getattr(self.trainer.strategy, "parallelize", None) if self._trainer is not None else None
        if callable(parallelize):
            parallelize(self)  # with meta_init it also fills the shards
        elif self.weight_plan is not None and any(p.is_meta for p in self.model.parameters()):
            from mogao.training.shard_load import load_weights

            load_weights(self.model, self.weight_plan, "cpu")  # the strategy moves the model to its device

    def configure_optimizers(self) -> Any:
        groups = self._param_groups(self.optimizer_parts)
        if not groups:
            raise ConfigError(f"nothing to train: train={self.train_parts} selects no parameters")
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:  # (before the scheduler reads each group's initial rate)
            group["lr"] = group["lr"] * self.lr_scale_of(group.get("part"))
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mogao"] = {"train_parts": list(self.train_parts), "optimizer_parts": list(self.optimizer_parts),
                               "lambda_text": self.lambda_text, "lambda_image": self.lambda_image,
                               "numerical": self.faults.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mogao")
        if state:  # before the optimizer is built: its groups must match the saved optimizer's
            self.optimizer_parts = list(state["optimizer_parts"])
            self.set_train_parts(list(state["train_parts"]))
            self.lambda_text, self.lambda_image = state["lambda_text"], state["lambda_image"]
            self.faults.load_state_dict(state.get("numerical", {}))

    # ---- training -------------------------------------------------------------------------------------
    def _group(self):
        import torch.distributed as dist

        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor | None:
        cuda = [self.device] if self.device.type == "cuda" else []
        with self.trainable.step_context((self.trainer.global_step, *batch.sample_ids), cuda):
            out = self.model(batch)
        total = combine_losses(out.terms, self.lambda_text, self.lambda_image, group=self._group())
        source = (batch.data_state or {}).get("source", "")
        dm = getattr(self.trainer, "datamodule", None)
        bad_samples = dm.bad_sample_count() if hasattr(dm, "bad_sample_count") else 0
        self._batch_info = {"sample_ids": list(batch.sample_ids), "source": source}
        loss = total.loss.detach()
        local_bad = not bool(torch.isfinite(loss))
        bad_loss = self._on_any_rank(local_bad)
        if bad_loss:
            self.faults.record(self.trainer, "loss", float(loss) if local_bad else ELSEWHERE, self._batch_info)
            self._skip_update = True
        self.last_metrics = {"loss": float(loss), "text_loss": float(total.text_loss),
                             "image_loss": float(total.image_loss), "tokens": batch.num_tokens,
                             "samples": len(batch.sample_ids), "source": source,
                             "nonfinite_steps": self.faults.steps, "bad_samples": bad_samples}
        self.log_dict({"train/loss": loss, "train/text_loss": total.text_loss,
                       "train/image_loss": total.image_loss}, prog_bar=True, batch_size=1)
        if logs_this_step(self.trainer):
            self.log_dict({"train/nonfinite_steps": float(self.faults.steps),
                           "data/bad_samples": float(bad_samples)}, batch_size=1)
        if not bad_loss:
            return total.loss
        if self.trainer.world_size == 1:
            return None  # Lightning then skips backward; with no gradients the optimizer step updates nothing
        # Lightning cannot skip a step on some ranks only: back-propagate a zero (every rank saw the flag) and
        # drop the gradients before the optimizer step
        return total.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        skip, self._skip_update = self._skip_update, False
        norms = None if skip else self._grad_norms()
        if norms is not None:
            # A parameter whose gradient over the whole (global) batch is exactly zero had nothing to learn
            # from it: in data-parallel training every path runs (`MogaoModel.forward`), so a batch without
            # generation targets gives the generation expert zero gradients. It is left out of this update, as
            # a parameter without a gradient is (AdamW would otherwise move it by its momentum and decay it) -
            # the same rule in one process and on many ranks under any strategy.
            for p, n in zip(*norms):
                if n == 0.0:
                    p.grad = None
        if not skip and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # (fp16's gradient scaler finds and skips overflowing steps itself, and adapts its scale to them)
            norm = math.sqrt(sum(n * n for n in norms[1])) if norms is not None else 0.0
            local_bad = not math.isfinite(norm)
            if self._on_any_rank(local_bad):
                self.faults.record(self.trainer, "grad_norm", norm if local_bad else ELSEWHERE, self._batch_info)
                self.last_metrics["nonfinite_steps"] = self.faults.steps
                self.log("train/nonfinite_steps", float(self.faults.steps), batch_size=1)
                skip = True
        if skip:
            for group in optimizer.param_groups:  # a parameter without a gradient is not updated (or decayed)
                for p in group["params"]:
                    p.grad = None
        else:
            self.faults.step_ok()

    def _grad_norms(self) -> tuple[list[torch.nn.Parameter], list[float]] | None:
        """The trainable parameters that have a gradient and the 2-norm of each whole gradient (None when
        there are none). Sharded gradients (FSDP2's DTensors) are summed over their shards: one all-reduce of
        the squared norms of the local shards, so every rank gets the same norms."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return None
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
        sq = torch.stack([n.float() for n in torch._foreach_norm(grads, 2.0)]).pow(2)
        group = self._group()
        if group is not None and any(isinstance(p.grad, DTensor) for p in params):
            import torch.distributed as dist

            replicated = torch.tensor([not (isinstance(p.grad, DTensor) and any(pl.is_shard() for pl in p.grad.placements))
                                       for p in params], device=sq.device)
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
            sq = torch.where(replicated, sq / dist.get_world_size(group), sq)
        return params, sq.sqrt().tolist()

    def _on_any_rank(self, flag: bool) -> bool:
        """`flag` OR-ed over data-parallel ranks, so every rank skips the same steps."""
        group = self._group()
        if group is None:
            return flag
        import torch.distributed as dist

        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return bool(t.item() > 0)

    # ---- validation -----------------------------------------------------------------------------------
    def _val_names(self) -> list[str]:
        dm = getattr(self.trainer, "datamodule", None)
        return list(getattr(dm, "val_names", [])) or ["val"]

    def on_validation_epoch_start(self) -> None:
        names = self._val_names()
        self._val_sums = torch.nn.ModuleDict({
            n: torch.nn.ModuleDict({k: SumMetric() for k in ("text_sum", "text_w", "image_sum", "image_w")})
            for n in names}).to(self.device)

    def validation_step(self, batch: PackedBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        name = self._val_names()[dataloader_idx]
        t = self.model(batch).terms
        sums = self._val_sums[name]
        for key, v in (("text_sum", t.text_sum), ("text_w", t.text_weight), ("image_sum", t.image_sum),
                       ("image_w", t.image_weight)):
            sums[key].update(v.detach().float())

    def configure_callbacks(self) -> list[pl.Callback]:
        return [DataPosition(), *([ExactMatch(self.exact_match_samples)] if self.exact_match_samples > 0 else [])]

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        for name, sums in self._val_sums.items():
            s = {k: m.compute() for k, m in sums.items()}
            if s["text_w"] > 0:
                metrics[f"val/{name}/text_loss"] = s["text_sum"] / s["text_w"]
            if s["image_w"] > 0:
                metrics[f"val/{name}/image_loss"] = s["image_sum"] / s["image_w"]
        if metrics:
            self.log_dict(metrics, batch_size=1, sync_dist=False)
        self._val_sums = None

    # ---- end of fit -----------------------------------------------------------------------------------
    def output_dir(self) -> Path:
        if self.save_dir is not None:
            return Path(self.save_dir)
        return run_dir(self.trainer) / self.trainable.output_name

    def on_fit_end(self) -> None:
        self.faults.write(self.trainer)
        if self.faults.steps:
            log.warning("%d training step(s) had non-finite values and made no update; see "
                        "numerical_faults.json", self.faults.steps)
        if self.trainer.interrupted:
            return
        # collectives on every rank: the gathered weights, and `trainer.log_dir` (a broadcast) in output_dir
        from mogao.training.strategies import full_state_dict

        full = full_state_dict(self.model, keep=self.trainer.is_global_zero)
        d = self.output_dir()
        if self.trainer.is_global_zero:
            self.trainable.save(self.model, self.tokenizer, d, full)
            log.info("saved the trained %s to %s", self.trainable.output_name, d)

class UnderstandingModule(MogaoModule):
    """Image → text stage: trains the understanding expert and the connector; exact-match validation."""

    default_train = ("und", "connector")
    default_lambda_image = 0.0
    default_exact_match = 32


class T2IModule(MogaoModule):
    """Text → image stage: trains both experts (the text condition is read through the understanding expert)."""

    default_train = ("und", "gen")


class InterleavedModule(MogaoModule):
    """Interleaved text and images: trains both experts and the connector; exact-match validation where the
    data has answers."""

    default_train = ("und", "gen", "connector")
    default_exact_match = 16
