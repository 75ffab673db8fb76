"""`DataConfig.drop_unread_vit`: the ViT copy of a generation target that ends its sample is left out. Only that
image loses its copy, no remaining token moves, every flow-loss term and every text prediction but the one at
that image's <|vision_end|> stays the same, packs of mixed samples index their copies consistently, and the
option is refused where it does not apply."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest_data import make_image, small_config, tiny_tokenizer

from mogao.bagel import rules
from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts
from mogao.data.builtin.shapes import Obj, Scene, render
from mogao.data.tokenizer import SpecialTokens
from mogao.errors import ConfigError, DataError
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.sequence.modality import Modality
from mogao.training.objectives import combine_losses

N, V, C = Modality.VAE_NOISY, Modality.VIT, Modality.VAE_CLEAN
BLUE = (30, 30, 200)

# plan-level samples: 16x16 images, a 4x4 grid at max_image_tokens 16
STORY = [{"text": "draw a red circle", "loss": False}, {"image": make_image(size=(16, 16)), "generate": True},
         {"text": "now make it blue", "loss": False},
         {"image": make_image(size=(16, 16), color=BLUE), "generate": True}]
EDIT = [{"image": make_image(size=(16, 16))}, {"text": "make it blue", "loss": False},
        {"image": make_image(size=(16, 16), color=BLUE), "generate": True}]
STORY_TEXT_END = [*STORY, {"text": "the blue circle"}]  # ends in text: it reads the last image's ViT copy
VQA = [{"image": make_image(size=(16, 16))}, {"text": "the red square"}]


def _lower(segments, sample_id="s", **cfg):
    (sample,) = samples_from_dicts([{"id": sample_id, "segments": segments}])
    return lower_sample(sample, tiny_tokenizer(), small_config(**cfg))


def _copies(plan) -> list[list[Modality]]:
    return [sorted(starts, key=starts.get) for starts in plan.copy_start]


def _without_last_vit(plan) -> torch.Tensor:
    """(L,) bool: every token of `plan` but those of its last image's ViT copy."""
    keep = torch.ones(plan.num_tokens, dtype=torch.bool)
    start = plan.copy_start[-1][V]
    gh, gw = plan.images[-1].grid
    keep[start:start + gh * gw] = False
    return keep


# ---- the lowering ----------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["il_rope", "mrope", "bagel"])
@pytest.mark.parametrize("drop_vae", [False, True])
@pytest.mark.parametrize(("segments", "full_copies"), [
    (STORY, [[N, V, C], [N, V, C]]),
    (EDIT, [[V, C], [N, V, C]]),
])
def test_the_last_generated_image_loses_its_vit_copy_and_nothing_moves(segments, full_copies, drop_vae, positions):
    full = _lower(segments, positions=positions, drop_unread_vae=drop_vae)
    slim = _lower(segments, positions=positions, drop_unread_vae=drop_vae, drop_unread_vit=True)
    want = [[k for k in copies if not (drop_vae and k == C and n == len(full_copies) - 1)]
            for n, copies in enumerate(full_copies)]
    assert _copies(full) == want
    assert _copies(slim) == [*want[:-1], [k for k in want[-1] if k != V]]  # earlier images keep theirs
    gh, gw = slim.images[-1].grid
    assert full.num_tokens - slim.num_tokens == gh * gw == 16
    keep = _without_last_vit(full)
    assert torch.equal(slim.position_ids, full.position_ids[:, keep])  # every remaining token keeps its position
    for name in ("input_ids", "labels", "modality"):
        assert torch.equal(getattr(slim, name), getattr(full, name)[keep]), name
    assert [im.seed for im in slim.images] == [im.seed for im in full.images]
    if positions == "bagel":  # the left-out copy takes its one position, as the written rule has it
        kinds = {Modality.TEXT: "text", V: "vit", C: "vae", N: "noisy"}
        spans = [(kinds[s.kind], s.length) if s.length else ("skipped", 0) for s in slim.spans]
        assert slim.position_ids[0].tolist() == rules.position_ids(spans)[0]


@pytest.mark.parametrize("segments", [STORY_TEXT_END, VQA, [*EDIT[:2], {"image": make_image(size=(16, 16))}]])
def test_a_sample_that_does_not_end_in_a_generated_image_keeps_every_copy(segments):
    full, slim = _lower(segments), _lower(segments, drop_unread_vit=True)
    assert _copies(slim) == _copies(full) and torch.equal(slim.input_ids, full.input_ids)
    assert torch.equal(slim.position_ids, full.position_ids)


def test_the_kept_sample_decides_dropout_and_truncation_included():
    """Text dropout that makes a target the last segment, and truncation that stops at one, leave its copy out;
    the budget counts the copies that are kept."""
    dropped = _lower(STORY_TEXT_END, p_drop_text=1.0, drop_unread_vit=True)
    assert dropped.dropped == ("text",) and _copies(dropped) == [[N, V, C], [N, C]]
    # STORY_TEXT_END over the budget: truncation keeps STORY (its 4 segments), whose target then ends it
    whole = _lower(STORY_TEXT_END, token_budget=4096).num_tokens
    cut = _lower(STORY_TEXT_END, token_budget=whole - 1, too_long="truncate", drop_unread_vit=True)
    assert cut.truncated and _copies(cut) == [[N, V, C], [N, C]]
    assert cut.num_tokens == _lower(STORY, drop_unread_vit=True).num_tokens
    # the budget: the slim sample fits exactly where the full one does not
    slim = _lower(STORY, drop_unread_vit=True).num_tokens
    assert _lower(STORY, token_budget=slim, drop_unread_vit=True).num_tokens == slim
    with pytest.raises(DataError, match="token budget"):
        _lower(STORY, token_budget=slim)


# ---- packs mixing samples with and without the copy -------------------------------------------------


@pytest.mark.parametrize("positions", ["il_rope", "mrope", "bagel"])
def test_a_mixed_pack_indexes_its_copies_consistently(positions):
    samples = [STORY, VQA, EDIT, STORY_TEXT_END]
    plans = [_lower(s, sample_id=f"s{n}", positions=positions, drop_unread_vit=True, drop_unread_vae=True,
                    token_budget=512) for n, s in enumerate(samples)]
    batch = collate_plans(plans, 2048)
    assert batch.image_has_vit.tolist() == [True, False, True, True, False, True, True]
    assert batch.image_is_target.tolist() == [True, True, False, False, True, True, True]
    grids = batch.image_grid
    counts = grids[:, 0] * grids[:, 1]
    has = batch.image_has_vit
    assert len(batch.vit_pixels) == int(has.sum()) and len(batch.vae_pixels) == batch.num_images
    assert batch.vit_index.numel() == int(counts[has].sum())
    images = [im for p in plans for im in p.images]
    kept = [im for im, h in zip(images, has.tolist()) if h]
    assert all(torch.equal(px, im.tensors.vit) for px, im in zip(batch.vit_pixels, kept, strict=True))
    assert batch.layout.modality[batch.vit_index].eq(int(V)).all()
    # the cells of each ViT copy are its image's grid, row-major
    cells = batch.grid_cells
    for index, (gh, gw) in zip(batch.vit_index.split(counts[has].tolist()), grids[has].tolist(), strict=True):
        rows = torch.arange(gh).repeat_interleave(gw)
        assert torch.equal(cells[:, index], torch.stack((rows, torch.arange(gw).repeat(gh))))
    every = torch.cat((batch.vit_index, batch.vae_clean_index, batch.noisy_index))
    assert every.unique().numel() == every.numel()
    if positions == "il_rope":  # the cells are rows 1 and 2 of the positions
        assert torch.equal(cells[:, every], batch.position_ids[1:, every])
    assert cells[:, batch.layout.modality == int(Modality.TEXT)].eq(0).all()
    assert batch.to("cpu").image_has_vit.tolist() == has.tolist()


# ---- the model: same flow-loss terms, same text predictions but one ---------------------------------


def _img(shape="circle", colour="red"):
    return render(Scene((Obj(shape, colour, "large"),)), 16)


M_STORY = {"segments": [{"text": "Draw a circle."}, {"image": _img(), "generate": True},
                        {"text": "Now a square."}, {"image": _img("square"), "generate": True}]}
M_EDIT = {"segments": [{"image": _img()}, {"text": "Make it blue.", "loss": False},
                       {"image": _img(colour="blue"), "generate": True}]}
M_T2I = {"segments": [{"text": "A red circle.", "loss": False}, {"image": _img("square", "green"), "generate": True}]}
M_VQA = {"segments": [{"image": _img()}, {"text": "What colour is it?", "loss": False}, {"text": "red"}]}
M_STORY_TEXT = {"segments": [*M_STORY["segments"], {"text": "Done."}]}
MODEL_SAMPLES = [M_STORY, M_VQA, M_EDIT, M_T2I, M_STORY_TEXT]
ENDS_IN_TARGET = 3  # M_STORY, M_EDIT, M_T2I


def _model(parts, positions: str):
    torch.manual_seed(0)
    model = load_model(ModelConfig(llm=parts["llm"], vit=parts["vit"], autoencoder="pixel", latent_patch=4,
                                   positions=positions))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # zero-initialised projections would hide the generation side's gradients
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(tok, model, drop: bool):
    cfg = replace(DataConfig(token_budget=4096, max_image_tokens=16, p_drop_text=0.0, p_drop_images=0.0)
                  .for_model(model), drop_unread_vit=drop)
    plans = [lower_sample(s, tok, cfg) for s in samples_from_dicts(MODEL_SAMPLES)]
    return collate_plans(plans, 4096)


def _forward(model, batch, masked: torch.Tensor | None = None):
    """The output with text logits, and the parameters' gradients of the loss with the labels at `masked`
    (understanding rows) left out."""
    model.zero_grad()
    if masked is not None:
        batch = replace(batch, labels=batch.labels.clone())
        batch.labels[:batch.layout.n_und][masked] = -100
    out = model(batch, return_logits=True)
    combine_losses(out.terms).loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("positions", ["il_rope", "mrope"])
def test_only_the_stop_prediction_after_the_last_generated_image_changes(tiny_parts, positions):
    from mogao.training.flops import training_flops

    tok = tiny_parts["tokenizer"]
    special = SpecialTokens.from_tokenizer(tok)
    model = _model(tiny_parts, positions)
    full, slim = _batch(tok, model, False), _batch(tok, model, True)
    assert full.num_tokens - slim.num_tokens == ENDS_IN_TARGET * 16
    assert int((~slim.image_has_vit).sum()) == ENDS_IN_TARGET and bool(full.image_has_vit.all())
    assert torch.equal(slim.image_seed, full.image_seed)

    # the flow-matching targets and terms: the same, image by image
    _, flow_full = model.batch_inputs(full)
    _, flow_slim = model.batch_inputs(slim)
    assert torch.equal(flow_slim.velocity, flow_full.velocity) and torch.equal(flow_slim.weights, flow_full.weights)
    a, grads_a = _forward(model, full)
    b, grads_b = _forward(model, slim)
    counts = (full.image_grid[full.image_is_target]).prod(1).tolist()
    per_image = [[((v - t) ** 2).mean() for v, t in zip(out.velocity.float().split(counts),
                                                       flow_full.velocity.float().split(counts), strict=True)]
                 for out in (a, b)]
    assert len(per_image[0]) == 6 and float(a.terms.image_sum.detach()) > 0
    torch.testing.assert_close(torch.stack(per_image[1]), torch.stack(per_image[0]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b.velocity, a.velocity, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.terms.image_sum, a.terms.image_sum, rtol=1e-5, atol=1e-7)
    assert torch.equal(b.terms.image_weight, a.terms.image_weight)
    assert torch.equal(b.terms.text_weight, a.terms.text_weight)

    # the text predictions: the labelled rows pair up in order; all but the stops after a final target agree
    rows = []
    for batch, out in ((full, a), (slim, b)):
        labels, ids = batch.labels[:batch.layout.n_und], batch.input_ids[:batch.layout.n_und]
        sel = labels != -100
        stop = (ids == special.vision_end_id) & (labels == special.eos_id)
        rows.append((out.text_logits[sel], labels[sel], stop[sel], stop))
    (la, ya, sa, stop_a), (lb, yb, sb, stop_b) = rows
    assert torch.equal(ya, yb) and torch.equal(sa, sb) and int(sa.sum()) == ENDS_IN_TARGET
    torch.testing.assert_close(lb[~sb], la[~sa], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lb[sb], la[sa], rtol=1e-5, atol=1e-5)  # (that one prediction no longer sees the copy)

    # backward: with the stop labels left out in both, the same gradients
    assert grads_b.keys() == grads_a.keys() and any(n.startswith("vit.") for n in grads_a)
    assert all(torch.isfinite(g).all() for g in grads_b.values())
    _, ga = _forward(model, full, stop_a)
    _, gb = _forward(model, slim, stop_b)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)

    # the FLOP count follows the ViT copies that are there
    fa, fb = training_flops(model, full), training_flops(model, slim)
    assert fb.vit < fa.vit and fb.connector * full.vit_index.numel() == fa.connector * slim.vit_index.numel()


# ---- options -----------------------------------------------------------------------------------------


def test_the_option_is_refused_with_bagels_format_and_kept_by_for_model():
    with pytest.raises(ConfigError, match="drop_unread_vit"):
        DataConfig(drop_unread_vit=True, sequence_format="bagel")
    DataConfig(drop_unread_vit=True, positions="bagel")  # BAGEL's positions in Mogao's format: handled exactly

    def model(fmt: str, sees: bool = False):
        return SimpleNamespace(vit_patch=4, vae_patch=4, cfg=SimpleNamespace(
            text_sees_vae=sees, positions="il_rope", sequence_format=fmt))

    for drop in (False, True):
        for sees in (False, True):
            assert DataConfig(drop_unread_vit=drop).for_model(model("mogao", sees)).drop_unread_vit is drop
    assert DataConfig().for_model(model("bagel")).drop_unread_vit is False
    with pytest.raises(ConfigError, match="drop_unread_vit"):
        DataConfig(drop_unread_vit=True).for_model(model("bagel"))


def test_a_recipe_turns_it_on(tmp_path):
    import yaml
    from conftest import shrunk_recipe

    from mogao.recipes import build_cli

    path = shrunk_recipe(tmp_path, "t2i")
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["data"]["drop_unread_vit"] = True
    path.write_text(yaml.safe_dump(cfg))
    for args, want in (([], True), (["--data.data.drop_unread_vit=false"], False)):
        cli = build_cli(["--config", str(path), *args], run=False, instantiate=False)
        data = cli.config["data"]["data"]
        data = data.as_dict() if hasattr(data, "as_dict") else dict(data)
        assert DataConfig(**data).drop_unread_vit is want
