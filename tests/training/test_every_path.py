"""Every path of the model runs in a training step, whatever the batch holds, so that every trainable parameter
is in the graph (data-parallel training needs that); a part with nothing to learn from a step is left out of
that step's update."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_batch

from mogao.model.config import ModelConfig
from mogao.training.module import InterleavedModule

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from dist_child import LOPSIDED, lopsided_samples  # noqa: E402


@pytest.fixture(scope="module")
def module_and_batches(tiny_parts):
    torch.manual_seed(0)
    cfg = ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder=tiny_parts["vae"], latent_patch=2)
    module = InterleavedModule(model=cfg, tokenizer=str(tiny_parts["root"] / "tokenizer"),
                               train=["und", "gen", "connector"],
                               optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
    module.model.all_paths_in_training = True  # (as under data-parallel training: one process needs none of it)
    dicts = lopsided_samples(len(LOPSIDED))
    kinds = [k for pair in LOPSIDED for ranks in zip(*pair) for k in ranks]  # the order lopsided_samples uses
    by_kind = {k: dicts[kinds.index(k)] for k in set(kinds)}
    batches = {k: make_batch(tiny_parts["tokenizer"], [d], vae_patch=module.model.vae_patch)
               for k, d in by_kind.items()}
    return module, batches


def _parts(module) -> dict[str, set[str]]:
    from mogao.training.parts import part_parameters

    return {part: set(ps) for part, ps in part_parameters(module.model).items()}


@pytest.mark.parametrize("kind", ["vqa", "text", "t2i", "t2i_quiet", "edit"])
def test_every_trainable_parameter_gets_a_gradient(module_and_batches, kind):
    module, batches = module_and_batches
    model = module.model.train()
    model.zero_grad(set_to_none=True)
    out = model(batches[kind])
    (out.terms.text_sum + out.terms.image_sum).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{kind}: {missing[:5]}"
    gen = _parts(module)["gen"]
    zero = {n for n, p in model.named_parameters() if p.requires_grad and not p.grad.any()}
    if kind in ("vqa", "text"):  # nothing for the generation expert: in the graph, with a zero gradient
        assert gen <= zero
    else:
        assert not gen <= zero
    model.zero_grad(set_to_none=True)


def test_paths_without_input_change_nothing(module_and_batches):
    """The zero-row paths add nothing: the loss terms are those of an evaluation forward."""
    module, batches = module_and_batches
    model = module.model
    for kind in ("vqa", "text", "t2i_quiet"):
        with torch.no_grad():
            model.train()
            model.all_paths_in_training = True
            a = model(batches[kind]).terms
        b = model.train()(batches[kind]).terms  # with grad: every path
        for x, y in ((a.text_sum, b.text_sum), (a.image_sum, b.image_sum)):
            torch.testing.assert_close(x, y.detach(), rtol=0, atol=0)


class _Watch(pl.Callback):
    """The parameters of each part before and after every step."""

    def __init__(self) -> None:
        self.changed: list[set[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = dict(pl_module.model.named_parameters())
        self.changed.append({n for n, v in self.before.items() if not torch.equal(now[n], v)})


def test_a_part_without_data_in_a_step_is_not_updated(module_and_batches, tmp_path):
    """After text-to-image steps gave the generation expert AdamW momentum, a step of questions (nothing for
    it) leaves it exactly as it was - no momentum step, no weight decay - while the understanding expert
    trains; the ViT connector likewise waits out the step without an image. (At the first step only the
    velocity head moves: it starts at zero, so nothing upstream of it has a gradient yet; the timestep
    embedding waits one step more for the zero-initialised AdaLN.)"""
    module, batches = module_and_batches
    seq = [batches["t2i"]] * 3 + [batches["vqa"], batches["text"], batches["edit"]]
    watch = _Watch()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=len(seq), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[watch], default_root_dir=str(tmp_path))
    module.save_dir = str(tmp_path / "model")
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(seq, batch_size=None, collate_fn=lambda b: b))
    parts = _parts(module)
    first, _, t2i, vqa, text, edit = watch.changed
    assert {n for n in parts['gen'] if 'proj_out' in n} <= first and parts['gen'] - first
    assert parts["gen"] <= t2i and not (parts["gen"] & vqa) and not (parts["gen"] & text) and parts["gen"] <= edit
    # (a generated image is read back through the ViT for what follows it: text-to-image batches train it too)
    assert parts["connector"] <= vqa and not (parts["connector"] & text) and parts["connector"] <= edit
    assert parts["und"] & vqa and parts["und"] & text


def test_one_process_trains_the_same_with_every_path_or_only_the_batchs(tiny_parts, module_and_batches, tmp_path):
    """Without a process group a training forward runs only the batch's paths (the default, "data_parallel");
    with every path the unused parts get zero gradients instead of none, and are left out of the update all the
    same: the weights after the same steps are identical."""
    _, batches = module_and_batches
    seq = [batches[k] for k in ("t2i", "t2i", "vqa", "text", "edit")]
    weights = []
    for every in (True, "data_parallel"):
        torch.manual_seed(0)
        cfg = ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder=tiny_parts["vae"], latent_patch=2)
        module = InterleavedModule(model=cfg, tokenizer=str(tiny_parts["root"] / "tokenizer"),
                                   train=["und", "gen", "connector"], save_dir=str(tmp_path / str(every)),
                                   optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1))
        module.model.all_paths_in_training = every
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=len(seq), logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(tmp_path))
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(seq, batch_size=None,
                                                                          collate_fn=lambda b: b))
        weights.append({k: v.detach().clone() for k, v in module.model.state_dict().items()})
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k
