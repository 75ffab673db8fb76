"""EMA and throughput callbacks under a real Lightning Trainer (CPU), and the training FLOP count."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_batch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from callbacks.ema import EMA
from callbacks.throughput import Throughput, compute_dtype
from mogao.attention.mask import ectf_mask
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel
from mogao.sequence.layout import Span, TokenLayout
from mogao.sequence.modality import Modality
from mogao.training.flops import image_forward_flops, keys_per_query, peak_flops, training_flops
from mogao.training.objectives import combine_losses

STEPS = 4


def _model(parts, **kw) -> MogaoModel:
    torch.manual_seed(0)
    cfg = ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder=parts["vae"], latent_patch=2, **kw)
    return load_model(cfg)


class _Module(pl.LightningModule):
    """The smallest stage: the shared model, its global-normalised loss, AdamW over every parameter."""

    def __init__(self, parts, frozen: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.model = _model(parts)
        for name in frozen:
            getattr(self.model, name).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        return combine_losses(self.model(batch).terms).loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", combine_losses(self.model(batch).terms).loss, batch_size=1)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)


def _loader(batches) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def _trainer(max_steps: int, callbacks, logger=False, **kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kw,
    )


@pytest.fixture(scope="module")
def batches(tiny_parts, shapes_dicts):
    tok = tiny_parts["tokenizer"]
    return [make_batch(tok, shapes_dicts[i : i + 1], budget=256) for i in (0, 1)]


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class _Recorder(pl.Callback):
    """Parameters at train start (step 0), after every optimizer step, and around validation."""

    def __init__(self, ema: EMA | None = None) -> None:
        self.ema = ema
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}
        self.tracked: dict[int, set[str]] = {}
        self.val_start: list[dict[str, torch.Tensor]] = []
        self.val_end: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        self.by_step[0] = _params(pl_module.model)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = _params(pl_module.model)
        if self.ema is not None:
            self.tracked[trainer.global_step] = set(self.ema.averages)

    def on_validation_start(self, trainer, pl_module):
        self.val_start.append(_params(pl_module.model))

    def on_validation_end(self, trainer, pl_module):
        self.val_end.append(_params(pl_module.model))


class _Unfreeze(pl.Callback):
    """Unfreezes the connector before optimizer step `at` (what a curriculum schedule does)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.at:
            pl_module.model.connector.requires_grad_(True)


def _hand_ema(
    traj: dict[int, torch.Tensor], first: int, decay: float, every: int, start: int
) -> torch.Tensor:
    """The EMA rule written out in float64 from the parameter trajectory, starting at step `first`."""
    e = traj[first].double()
    for s in range(first + 1, max(traj) + 1):
        p = traj[s].double()
        if s <= start:
            e = p
        elif s % every == 0:
            e = decay * e + (1 - decay) * p
    return e


# ---- FLOPs ----------------------------------------------------------------------------------------


def _random_layout(rng: random.Random) -> TokenLayout:
    samples = []
    for _ in range(rng.randint(1, 4)):
        spans, img = [], 0
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.4:
                spans.append(Span(Modality.TEXT, rng.randint(1, 6)))
                continue
            n = rng.randint(1, 5)
            if rng.random() < 0.5:
                spans.append(Span(Modality.VAE_NOISY, n, img))
            if rng.random() < 0.7:
                spans.append(Span(Modality.VIT, n, img))
            spans.append(Span(Modality.VAE_CLEAN, n, img))
            img += 1
        samples.append(spans)
    return TokenLayout.from_spans(samples)


@pytest.mark.parametrize("text_sees_vae", [False, True])
def test_allowed_pairs_match_the_dense_ectf_mask(tiny_parts, batches, text_sees_vae):
    rng = random.Random(7)
    for _ in range(100):
        lay = _random_layout(rng)
        assert torch.equal(keys_per_query(lay, text_sees_vae), ectf_mask(lay, text_sees_vae).sum(1))
    model = _model(tiny_parts, text_sees_vae=text_sees_vae)
    for batch in batches:
        assert batch.image_is_target.any()
        dense = int(ectf_mask(batch.layout, text_sees_vae).sum())
        assert training_flops(model, batch).attention_pairs == dense


def test_backbone_flops_are_six_params_per_token(tiny_parts, batches):
    """The tiny Qwen2 (hidden 64, MLP 128, 4 heads of 16, 2 KV heads, q/k/v biases, 2 layers, tied head)."""
    model = _model(tiny_parts)
    batch = batches[0]
    lay = batch.layout
    h, mlp, kv, layers, vocab = 64, 128, 2 * 16, 2, model.backbone.config.vocab_size
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * mlp
    n_loss = int((batch.labels[: lay.n_und] != -100).sum())
    fc = training_flops(model, batch)
    assert fc.backbone_und == 6 * layers * per_layer * lay.n_und
    assert fc.backbone_gen == 6 * layers * per_layer * (lay.n_gen_clean + lay.n_noisy)
    assert fc.lm_head == 6 * h * vocab * n_loss
    assert fc.attention == layers * 3 * 4 * 16 * 4 * fc.attention_pairs
    assert fc.tokens == batch.num_tokens
    parts = (
        "backbone_und",
        "backbone_gen",
        "lm_head",
        "attention",
        "connector",
        "latent_proj",
        "timestep",
        "vit",
        "autoencoder",
    )
    assert fc.total == sum(getattr(fc, k) for k in parts)
    assert fc.vit > 0 and fc.autoencoder > 0 and fc.connector > 0

    # the ViT costs 3x its forward while it trains, 1x when frozen; the autoencoder is always forward only
    vit_fwd = sum(image_forward_flops(model.vit, tuple(p.shape[-2:])) for p in batch.vit_pixels)
    assert fc.vit == 3 * vit_fwd
    model.vit.requires_grad_(False)
    assert training_flops(model, batch).vit == vit_fwd


def test_vision_flops_match_the_real_modules(tiny_parts, batches):
    """The meta-device count equals FlopCounterMode on the real module (math attention, so it is counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(tiny_parts)
    image = batches[0].vit_pixels[0]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as real:
        model.vit([image])
    assert image_forward_flops(model.vit, tuple(image.shape[-2:])) == real.get_total_flops() > 0
    image = batches[0].vae_pixels[0]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as real:
        model.autoencoder.encode([image])
    assert (
        image_forward_flops(model.autoencoder, tuple(image.shape[-2:]), encoder=True)
        == real.get_total_flops()
    )


def test_peak_flops_lookup():
    assert peak_flops("cpu", torch.bfloat16) is None
    assert compute_dtype("bf16-mixed") is torch.bfloat16
    assert compute_dtype("16-mixed") is torch.float16
    assert compute_dtype("32-true") is torch.float32
    from mogao.training.flops import _dense_hopper_peak

    # dense bf16 peaks for the names CUDA reports for Hopper SXM parts (H200's plain name included)
    assert _dense_hopper_peak("NVIDIA H200", torch.bfloat16) == 989.4e12
    assert _dense_hopper_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert _dense_hopper_peak("NVIDIA H100 PCIe", torch.bfloat16) is None  # (Lightning's table has it)


# ---- EMA --------------------------------------------------------------------------------------------


def test_ema_matches_the_hand_computed_average(tiny_parts, batches):
    steps, unfreeze_at = 4, 3
    fast = EMA(decay=0.9, swap_for_validation=False, save_dir=None)
    late = EMA(decay=0.8, every_n_steps=2, start_step=2, swap_for_validation=False)
    rec = _Recorder(fast)  # after the EMAs: it sees each step's averages
    module = _Module(tiny_parts, frozen=("vit", "connector"))
    trainer = _trainer(
        steps, [_Unfreeze(unfreeze_at), fast, late, rec], default_root_dir=tiny_parts["root"] / "e1"
    )
    trainer.fit(module, _loader(batches))
    assert trainer.global_step == steps

    names = {n for n, p in module.model.named_parameters()}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    connector = {n for n in names if n.startswith("connector.")}
    assert set(fast.averages) == trainable == set(late.averages)
    assert not any(n.startswith(("vit.", "autoencoder.")) for n in fast.averages), (
        "frozen parts take no memory"
    )
    # the connector joins exactly on the step it starts training
    assert all(not (rec.tracked[s] & connector) for s in range(1, unfreeze_at))
    assert all(connector <= rec.tracked[s] for s in range(unfreeze_at, steps + 1))

    moved = 0
    for name in trainable:
        traj = {s: rec.by_step[s][name] for s in rec.by_step}
        first = unfreeze_at if name in connector else 0
        for ema, (decay, every, start) in ((fast, (0.9, 1, 0)), (late, (0.8, 2, 2))):
            e = ema.averages[name]
            assert e.dtype == torch.float32
            torch.testing.assert_close(
                e.double(), _hand_ema(traj, first, decay, every, start), rtol=1e-5, atol=1e-6
            )
        moved += int(not torch.equal(fast.averages[name], traj[steps]))
    assert moved > len(trainable) // 2, "the average lags the weights"


def test_ema_resume_is_bit_identical(tiny_parts, batches, tmp_path):
    # One batch per epoch: a plain list loader restarts its epoch on resume, so the data order must not matter
    # for the uninterrupted and the resumed run to see the same batches.
    def run(max_steps: int, ckpt: Path | None = None) -> tuple[EMA, _Module, pl.Trainer]:
        ema = EMA(decay=0.9, every_n_steps=1, save_dir=str(tmp_path / "ema_out"))
        module = _Module(tiny_parts, frozen=("vit",))
        trainer = _trainer(max_steps, [ema], default_root_dir=tmp_path)
        trainer.fit(module, _loader(batches[1:]), ckpt_path=ckpt)
        return ema, module, trainer

    whole, whole_module, _ = run(STEPS)
    _, _, first = run(STEPS // 2)
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)
    resumed, resumed_module, trainer = run(STEPS, ckpt)
    assert trainer.global_step == STEPS
    for n, p in whole_module.model.named_parameters():  # the harness itself resumes exactly
        assert torch.equal(p, dict(resumed_module.model.named_parameters())[n]), n
    assert whole.averages.keys() == resumed.averages.keys()
    for n, e in whole.averages.items():
        assert torch.equal(e, resumed.averages[n]), n


def test_ema_validation_swap_and_saved_model(tiny_parts, batches, tmp_path):
    ema = EMA(decay=0.9, save_dir=str(tmp_path / "ema"))
    before, after = _Recorder(), _Recorder()
    module = _Module(tiny_parts, frozen=("vit",))
    trainer = _trainer(
        STEPS,
        [before, ema, after],
        default_root_dir=tmp_path,
        val_check_interval=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, _loader(batches), _loader(batches[:1]))
    assert len(before.val_start) == STEPS // 2
    for train_w, swapped_start, swapped_end, restored in zip(
        before.val_start, after.val_start, before.val_end, after.val_end
    ):
        tracked = 0
        for n, w in train_w.items():
            assert torch.equal(restored[n], w), f"{n} not restored bit for bit"
            assert torch.equal(swapped_start[n], swapped_end[n])
            tracked += int(not torch.equal(swapped_start[n], w))
        assert tracked > 0, "validation ran with the EMA weights"
    final = _params(module.model)
    assert all(torch.equal(final[n], w) for n, w in after.by_step[STEPS].items()), "training weights kept"

    saved = load_model(tmp_path / "ema")
    for n, p in saved.named_parameters():
        expected = ema.averages.get(n, final[n])
        assert torch.equal(p, expected.to(p.dtype)), n


# ---- throughput -------------------------------------------------------------------------------------


def _throughput_rows(tiny_parts, batches, tmp_path, callback: Throughput, every: int = 1) -> list[dict[str, float]]:
    logger = CSVLogger(tmp_path, name="tp")
    trainer = _trainer(STEPS, [callback], logger=logger, log_every_n_steps=every)
    trainer.fit(_Module(tiny_parts, frozen=("vit",)), _loader(batches))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return [r for r in rows if "throughput/tokens_per_sec" in r]


def test_throughput_logs_rates_without_mfu_on_cpu(tiny_parts, batches, tmp_path):
    rows = _throughput_rows(tiny_parts, batches, tmp_path, Throughput(window=2))
    assert len(rows) == STEPS
    for r in rows:
        for key in ("tokens_per_sec", "samples_per_sec", "tflops_per_sec"):
            v = r[f"throughput/{key}"]
            assert math.isfinite(v) and v > 0, key
        assert 0.0 <= r["throughput/padding_fraction"] < 1.0
        assert "throughput/mfu" not in r
        assert r["throughput/tokens_per_sec"] > r["throughput/samples_per_sec"]


def test_throughput_logs_at_the_logging_steps_and_the_last_over_every_batch(tiny_parts, batches, tmp_path,
                                                                            monkeypatch):
    """Rates are computed and logged only where Lightning writes logs (every 3rd step here; the logger gets that
    row) and at the last step (for `trainer.callback_metrics`), but the window holds every batch."""
    seen = []
    original = Throughput._rates

    def spy(self, trainer, pl_module):
        seen.append((trainer.global_step, len(self._work)))
        return original(self, trainer, pl_module)

    monkeypatch.setattr(Throughput, "_rates", spy)
    rows = _throughput_rows(tiny_parts, batches, tmp_path, Throughput(window=3), every=3)
    assert [s for s, _ in seen] == [3, STEPS]
    assert [w for _, w in seen] == [3, 3]
    assert len(rows) == 1 and rows[0]["throughput/tokens_per_sec"] > 0


def test_throughput_mfu_with_a_given_peak(tiny_parts, batches, tmp_path):
    peak = 2.0e12
    rows = _throughput_rows(tiny_parts, batches, tmp_path, Throughput(window=3, peak_flops=peak))
    assert len(rows) == STEPS
    for r in rows:
        assert r["throughput/mfu"] == pytest.approx(r["throughput/tflops_per_sec"] * 1e12 / peak, rel=1e-6)
        assert 0 < r["throughput/mfu"] < 1
