"""`SampleLogger` inside a real Lightning run: files, TensorBoard images, and no effect on training."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_batch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader

from callbacks.samples import SampleLogger
from mogao.errors import ConfigError
from mogao.inference import image_grid
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel
from mogao.training.objectives import combine_losses

PROMPTS = ["Draw a red circle.", "Draw a blue square."]
# the frozen autoencoder stays in eval mode on purpose
pytestmark = [pytest.mark.filterwarnings(r"ignore:Found 1 module\(s\) in eval mode"),
              pytest.mark.usefixtures("one_thread")]



class _Module(pl.LightningModule):
    """Holds `.model` and `.tokenizer` and trains on a fixed list of packed batches."""

    def __init__(self, model: MogaoModel, tokenizer, batches: list) -> None:
        super().__init__()
        self.model, self.tokenizer, self.batches = model, tokenizer, batches
        self.record: list[tuple[float, float, bool]] = []

    def training_step(self, batch, batch_idx):
        total = combine_losses(self.model(batch).terms)
        # a draw from the global RNG: any draw the callback leaked into training would change it
        probe = float(torch.rand(()))
        self.record.append((float(total.loss.detach()), probe, self.model.training))
        return total.loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=3e-3)

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, collate_fn=lambda b: b)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)


def _fit(parts, shapes_dicts, tmp_path, callback: SampleLogger | None, max_steps: int = 2):
    torch.manual_seed(0)
    model = load_model(
        ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder="pixel", latent_patch=4)
    )
    model.train()
    tok = parts["tokenizer"]
    batches = [
        make_batch(tok, shapes_dicts[:2], vae_patch=model.vae_patch),
        make_batch(tok, shapes_dicts[2:], vae_patch=model.vae_patch),
    ]
    module = _Module(model, tok, batches)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[callback] if callback else [],
    )
    trainer.fit(module)
    return module, logger


def test_sample_logger_writes_grids_and_leaves_training_unchanged(tiny_parts, shapes_dicts, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    baseline, _ = _fit(tiny_parts, shapes_dicts, tmp_path / "plain", None)
    cb = SampleLogger(PROMPTS, every_n_steps=1, steps=3, image_size=32, cols=2)
    module, logger = _fit(tiny_parts, shapes_dicts, tmp_path / "logged", cb)
    assert len(module.record) == 2
    assert module.record == baseline.record, "losses, global RNG draws and train mode as without the callback"
    assert all(training for _, _, training in module.record)

    samples = sorted(p.name for p in (tmp_path / "logged" / "run" / "version_0" / "samples").iterdir())
    assert samples == ["step_000001.png", "step_000002.png"]  # the end-of-training hook saw step 2 logged
    assert cb.last_path is not None and cb.last_path.name == "step_000002.png"
    expected = image_grid([Image.new("RGB", (32, 32))] * 2, PROMPTS, cols=2).size
    with Image.open(cb.last_path) as png:
        assert png.size == expected and png.mode == "RGB"

    acc = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    acc.Reload()
    assert "samples" in acc.Tags()["images"]
    events = acc.Images("samples")
    assert [e.step for e in events] == [1, 2]
    assert (events[-1].width, events[-1].height) == expected


def test_sample_logger_logs_at_the_end_of_training(tiny_parts, shapes_dicts, tmp_path):
    cb = SampleLogger(PROMPTS[:1], every_n_steps=50, steps=2, image_size=16)
    _fit(tiny_parts, shapes_dicts, tmp_path, cb, max_steps=1)
    assert cb.last_path is not None and cb.last_path.name == "step_000001.png"
    with Image.open(cb.last_path) as png:
        assert png.size == image_grid([Image.new("RGB", (16, 16))], PROMPTS[:1]).size


def test_sample_logger_config_errors(tiny_parts, shapes_dicts, tmp_path):
    with pytest.raises(ConfigError, match="prompts"):
        SampleLogger([])
    with pytest.raises(ConfigError, match="every_n_steps"):
        SampleLogger(PROMPTS, every_n_steps=-1)
    with pytest.raises(ConfigError, match="multiple of the model's VAE patch"):
        _fit(tiny_parts, shapes_dicts, tmp_path, SampleLogger(PROMPTS, image_size=30), max_steps=1)
