"""`DataConfig.drop_unread_vae`: clean VAE copies that no token reads are left out of training sequences, and
that changes no loss and no gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

from mogao.data import DataConfig, lower_sample, samples_from_dicts
from mogao.data.builtin.shapes import Obj, Scene, render
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel
from mogao.sequence.modality import Modality
from mogao.training.objectives import combine_losses

GRID = 16  # tokens a copy: 16x16-pixel images at patch 4


def _img(shape="circle", colour="red"):
    return render(Scene((Obj(shape, colour, "large"),)), 16)


VQA = {"segments": [{"image": _img()}, {"text": "What colour is it?", "loss": False}, {"text": "red"}]}
T2I = {"segments": [{"text": "A red circle.", "loss": False}, {"image": _img(), "generate": True}]}
EDIT = {"segments": [{"image": _img()}, {"text": "Make it blue.", "loss": False},
                     {"image": _img(colour="blue"), "generate": True}]}
STORY = {"segments": [{"text": "Draw a circle.", "loss": False}, {"image": _img(), "generate": True},
                      {"text": "Now a square.", "loss": False}, {"image": _img("square"), "generate": True},
                      {"text": "Done."}]}


def _copies(sample: dict, tok, drop: bool) -> tuple[list[list[Modality]], int]:
    cfg = DataConfig(token_budget=4096, max_image_tokens=GRID, vit_patch=4, vae_patch=4, p_drop_text=0.0,
                     p_drop_images=0.0, drop_unread_vae=drop)
    plan = lower_sample(samples_from_dicts([sample])[0], tok, cfg)
    return [sorted(starts, key=starts.get) for starts in plan.copy_start], plan.num_tokens


N, V, C = Modality.VAE_NOISY, Modality.VIT, Modality.VAE_CLEAN


@pytest.mark.parametrize(("sample", "kept"), [
    (VQA, [[V]]),  # read only by text: the ViT copy
    (T2I, [[N, V]]),  # the last image of a sample: nothing reads its clean copy
    (EDIT, [[V, C], [N, V]]),  # the condition's clean copy feeds the target's noisy copy
    (STORY, [[N, V, C], [N, V]]),
])
def test_only_the_clean_copies_a_later_target_reads_are_kept(tiny_parts, sample, kept):
    tok = tiny_parts["tokenizer"]
    full, n_full = _copies(sample, tok, drop=False)
    assert full == [[N, V, C] if N in k else [V, C] for k in kept]
    got, n = _copies(sample, tok, drop=True)
    assert got == kept
    assert n_full - n == GRID * sum(C not in k for k in kept)


def _perturbed_model(parts) -> MogaoModel:
    torch.manual_seed(0)
    cfg = ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder="pixel", latent_patch=4)
    model = load_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised projections would hide the generation side's gradients
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _loss_and_grads(model, batch):
    model.zero_grad()
    total = combine_losses(model(batch).terms)
    total.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return total, grads


def test_dropping_unread_copies_changes_no_loss_and_no_gradient(tiny_parts, shapes_dicts):
    tok = tiny_parts["tokenizer"]
    model = _perturbed_model(tiny_parts)
    samples = [VQA, T2I, EDIT, STORY, *shapes_dicts]
    full = make_batch(tok, samples, max_image_tokens=GRID, p_drop=0.0)
    slim = make_batch(tok, samples, max_image_tokens=GRID, p_drop=0.0, drop_unread_vae=True)
    assert slim.num_tokens < full.num_tokens and not bool(slim.image_has_clean.all())
    assert full.image_has_clean.all()
    a, ga = _loss_and_grads(model, full)
    b, gb = _loss_and_grads(model, slim)
    assert float(a.text_loss) > 0 and float(a.image_loss) > 0
    torch.testing.assert_close(b.text_loss, a.text_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.image_loss, a.image_loss, rtol=1e-5, atol=1e-6)
    assert ga.keys() == gb.keys() and any(n.startswith("vit.") for n in ga)
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)


def test_training_drops_unread_copies_unless_text_sees_vae(tiny_parts, tmp_path):
    from types import SimpleNamespace

    from mogao.training.datamodule import MogaoDataModule

    dm = MogaoDataModule.__new__(MogaoDataModule)
    for sees, drop in ((False, True), (True, False)):
        dm.data = DataConfig()
        model = SimpleNamespace(vit_patch=4, vae_patch=4, cfg=SimpleNamespace(text_sees_vae=sees, positions="il_rope",
                                                                         sequence_format="mogao"))
        dm.connect(model)
        assert dm.data.drop_unread_vae is drop
