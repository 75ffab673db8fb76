"""LightningModules of the training stages. They all wrap the one shared `MogaoModel`; a stage decides what is
trained, how the losses are weighted, how optimizer groups are formed and what validation measures.

    UnderstandingModule   image → text (captions, VQA): trains the understanding expert + connector by default
    T2IModule             text → image: trains both experts by default (text conditioning lives in the
                          understanding expert's keys/values)
    InterleavedModule     everything: trains both experts and the connector

The model comes from pretrained parts (`model`: LLM, SigLIP, autoencoder) or from a saved Mogao model
(`init_from`: e.g. the previous curriculum stage). Optimizer and LR schedule are injected (recipes give class
paths), and `configure_optimizers` builds weight-decay / no-decay groups over the trainable parameters only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import SumMetric

from mogao.data import PackedBatch
from mogao.data.samples import ImageSegment, Sample, TextSegment
from mogao.errors import ConfigError
from mogao.model.mogao import ModelConfig, MogaoModel, resolve_checkpoint
from mogao.model.tiny import TinySpec, ensure_tiny_parts
from mogao.training.objectives import combine_losses
from mogao.training.parts import check_parts, part_parameters, set_trainable

log = logging.getLogger(__name__)


def _default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


class MogaoModule(pl.LightningModule):
    """One training stage of a Mogao model (see the module docstring).

    Args:
        model: how to build the model from pretrained parts (ignored except for runtime options - attention
            backend, timestep sampling, text_sees_vae - when `init_from` is given).
        tokenizer: directory of the tokenizer; the LLM's embeddings are resized to its length.
        init_from: directory of a saved Mogao model (`save_pretrained`) to start from instead of the parts.
        tiny: build missing tokenizer / LLM / ViT directories as tiny random parts of these sizes (CPU recipes).
        train: parts to train: any of "und", "gen", "vit", "connector" (None: the stage's default).
        lambda_text: weight of the text cross-entropy (None: the stage's default).
        lambda_image: weight of the flow-matching loss (None: the stage's default).
        optimizer: optimizer factory, called with parameter groups (decay / no decay).
        lr_scheduler: LR-scheduler factory; stepped every optimizer step.
        weight_decay_norms_and_biases: also apply weight decay to norms, biases and embeddings.
        exact_match_samples: validation samples per source whose final answer is generated greedily and compared
            with the reference (0 = off); only sources whose samples end in an answer after a prompt.
        save_dir: where the trained model is saved at the end of fit (default: `<log_dir>/model`).
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
    ) -> None:
        super().__init__()
        if model is None and init_from is None:
            raise ConfigError("model: give 'model' (pretrained parts: llm, vit, autoencoder) or 'init_from' "
                              "(a saved mogao model directory)")
        if tokenizer is None:
            raise ConfigError("model.tokenizer: the tokenizer directory is required")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.tokenizer_path = str(tokenizer)
        if tiny is not None and model is not None:
            ensure_tiny_parts(tiny, tokenizer=tokenizer, llm=model.llm, vit=model.vit)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(str(tokenizer), "tokenizer"))
        self.model = self._build_model(model, init_from).train()  # checkpoints load in eval mode
        self.train_parts = check_parts(train if train is not None else self.default_train, "model.train")
        self.trainable_counts = set_trainable(self.model, self.train_parts)
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

    def _build_model(self, cfg: ModelConfig | None, init_from: str | None) -> MogaoModel:
        if init_from is not None:
            if not Path(init_from).expanduser().is_dir():
                raise ConfigError(f"model.init_from: directory not found: '{init_from}'")
            runtime = {} if cfg is None else {"attention": cfg.attention, "text_sees_vae": cfg.text_sees_vae,
                                              "timestep_sampling": cfg.timestep_sampling}
            model = MogaoModel.from_pretrained(Path(init_from).expanduser(), **runtime)
        else:
            from dataclasses import replace

            model = MogaoModel.from_parts(replace(cfg, vocab_size=len(self.tokenizer)))
        if model.backbone.embed_tokens.num_embeddings < len(self.tokenizer):
            raise ConfigError(f"the model's vocabulary ({model.backbone.embed_tokens.num_embeddings}) is smaller "
                              f"than the tokenizer's ({len(self.tokenizer)}): wrong tokenizer for this model?")
        return model

    # ---- what trains ----------------------------------------------------------------------------------
    def set_train_parts(self, parts: list[str]) -> None:
        """Change what trains (e.g. unfreezing by a schedule); the optimizer gains groups for new parts."""
        parts = check_parts(parts, "train")
        self.trainable_counts = set_trainable(self.model, parts)
        self.train_parts = parts
        new = [p for p in parts if p not in self.optimizer_parts]
        if not new:
            return
        self.optimizer_parts += new
        if self._trainer is not None and self.trainer.optimizers:
            opt = self.trainer.optimizers[0]
            template = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "weight_decay")}
            for group in self._param_groups(new):
                opt.add_param_group({**template, **group})

    def _param_groups(self, parts: list[str]) -> list[dict[str, Any]]:
        """Two groups per part (weight decay / none), in `parts` order; empty groups are left out."""
        by_part = part_parameters(self.model)
        groups = []
        for part in parts:
            decay, no_decay = [], []
            for name, p in by_part[part].items():
                (decay if self.decay_all or (p.dim() >= 2 and "embed" not in name) else no_decay).append(p)
            groups += [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return groups

    def configure_optimizers(self) -> Any:
        groups = self._param_groups(self.optimizer_parts)
        if not groups:
            raise ConfigError(f"nothing to train: train={self.train_parts} selects no parameters")
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mogao"] = {"train_parts": list(self.train_parts), "optimizer_parts": list(self.optimizer_parts),
                               "lambda_text": self.lambda_text, "lambda_image": self.lambda_image}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("mogao")
        if state:  # before the optimizer is built: its groups must match the saved optimizer's
            self.optimizer_parts = list(state["optimizer_parts"])
            self.set_train_parts(list(state["train_parts"]))
            self.lambda_text, self.lambda_image = state["lambda_text"], state["lambda_image"]

    # ---- training -------------------------------------------------------------------------------------
    def _group(self):
        import torch.distributed as dist

        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        out = self.model(batch)
        total = combine_losses(out.terms, self.lambda_text, self.lambda_image, group=self._group())
        source = (batch.data_state or {}).get("source", "")
        self.last_metrics = {"loss": float(total.loss.detach()), "text_loss": float(total.text_loss),
                             "image_loss": float(total.image_loss), "tokens": batch.num_tokens,
                             "samples": len(batch.sample_ids), "source": source}
        self.log_dict({"train/loss": total.loss.detach(), "train/text_loss": total.text_loss,
                       "train/image_loss": total.image_loss}, prog_bar=True, batch_size=1)
        return total.loss

    def on_train_batch_start(self, batch: PackedBatch, batch_idx: int) -> None:
        # recorded before the step: a checkpoint written at the end of this step must include this batch
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "consumed"):
            dm.consumed(batch)

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

    def on_validation_epoch_end(self) -> None:
        metrics = {}
        for name, sums in self._val_sums.items():
            s = {k: m.compute() for k, m in sums.items()}
            if s["text_w"] > 0:
                metrics[f"val/{name}/text_loss"] = s["text_sum"] / s["text_w"]
            if s["image_w"] > 0:
                metrics[f"val/{name}/image_loss"] = s["image_sum"] / s["image_w"]
        metrics.update(self._exact_match())
        if metrics:
            self.log_dict(metrics, batch_size=1, sync_dist=False)
        self._val_sums = None

    def _exact_match(self) -> dict[str, torch.Tensor]:
        """Greedy answers on validation samples that end in an answer; exact-match accuracy per source."""
        dm = getattr(self.trainer, "datamodule", None)
        if self.exact_match_samples <= 0 or dm is None or not hasattr(dm, "val_samples"):
            return {}
        from mogao.inference.simple import generate_text

        out = {}
        rank, world = self.global_rank, self.trainer.world_size
        for name in dm.val_names:
            qa = [x for x in map(_question_answer, dm.val_samples(name)) if x is not None]
            qa = qa[: self.exact_match_samples][rank::world]
            correct, total = SumMetric().to(self.device), SumMetric().to(self.device)
            if qa:
                answers = generate_text(self.model, self.tokenizer, [c for c, _ in qa],
                                        max_new_tokens=max(len(self.tokenizer(a)["input_ids"]) for _, a in qa) + 2)
                correct.update(torch.tensor(float(sum(_norm(g) == _norm(a) for g, (_, a) in zip(answers, qa)))))
                total.update(torch.tensor(float(len(qa))))
            else:
                correct.update(torch.tensor(0.0))
                total.update(torch.tensor(0.0))
            n = total.compute()
            if n > 0:
                out[f"val/{name}/exact_match"] = correct.compute() / n
        return out

    # ---- end of fit -----------------------------------------------------------------------------------
    def output_dir(self) -> Path:
        if self.save_dir is not None:
            return Path(self.save_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "model"

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            d = self.output_dir()
            self.model.save_pretrained(d)
            self.tokenizer.save_pretrained(d)
            log.info("saved the trained model to %s", d)


def _question_answer(sample: Sample) -> tuple[list[dict], str] | None:
    """(context segments, answer) when the sample ends in loss-bearing text after a prompt and has no targets."""
    segs = sample.segments
    if len(segs) < 2 or sample.has_target:
        return None
    last = segs[-1]
    if not isinstance(last, TextSegment) or not last.loss:
        return None
    if any(isinstance(s, TextSegment) and s.loss for s in segs[:-1]):
        return None
    ctx = [{"text": s.text, "loss": False} if isinstance(s, TextSegment) else {"image": s.image}
           for s in segs[:-1] if isinstance(s, (TextSegment, ImageSegment))]
    return ctx, last.text


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


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
