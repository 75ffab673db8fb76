"""The lowering's position scheme and sequence format options: the default path unchanged (grid cells equal
IL-RoPE's (H, W), the model reads the same numbers either way), BAGEL's positions in Mogao's format against the
written rule, the options reaching the data side from the model, and the combinations refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import make_batch
from conftest_data import make_image, small_config, tiny_tokenizer

from mogao.bagel import rules
from mogao.data import lower_sample, samples_from_dicts
from mogao.errors import ConfigError
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import SequenceInputs
from mogao.sequence.modality import Modality

SAMPLE = [{"image": make_image(size=(8, 8))}, {"text": "make it green", "loss": False},
          {"image": make_image(size=(16, 8), color=(0, 90, 0)), "generate": True}, {"text": "the dog"}]


def _lower(segments, **cfg):
    (sample,) = samples_from_dicts([{"id": "s", "segments": segments}])
    return lower_sample(sample, tiny_tokenizer(), small_config(**cfg))


def test_bagels_positions_in_mogaos_format_follow_the_written_rule():
    """Markers are text (+1 each); the noisy copy takes no position, the ViT and clean VAE copies one each; an
    unread clean copy left out still takes its one."""
    for drop in (False, True):
        plan = _lower(SAMPLE, max_image_tokens=4, positions="bagel", drop_unread_vae=drop)
        il = _lower(SAMPLE, max_image_tokens=4, drop_unread_vae=drop)
        assert torch.equal(plan.input_ids, il.input_ids) and torch.equal(plan.labels, il.labels)
        kinds = {Modality.TEXT: "text", Modality.VIT: "vit", Modality.VAE_CLEAN: "vae", Modality.VAE_NOISY: "noisy"}
        spans = [(kinds[s.kind], s.length) if s.length else ("skipped", 0) for s in plan.spans]
        want, _ = rules.position_ids(spans)
        assert plan.position_ids[0].tolist() == want and torch.equal(plan.position_ids[2], plan.position_ids[0])
        assert ("skipped", 0) in spans if drop else ("skipped", 0) not in spans
        # the clean copy of the first image (read by the target) is there; the target's only without drop
        assert plan.layout_spans() == [s for s in il.layout_spans()]


def test_the_default_path_reads_the_same_cells_whatever_carries_them(tiny_parts):
    tok = tiny_parts["tokenizer"]
    batch = make_batch(tok, [{"id": "a", "segments": SAMPLE}], max_image_tokens=4)
    cells = batch.grid_cells
    for index in (batch.vit_index, batch.vae_clean_index, batch.noisy_index):
        assert torch.equal(cells[:, index], batch.position_ids[1:, index])
    assert cells[:, batch.layout.modality == Modality.TEXT].eq(0).all()
    torch.manual_seed(0)
    model = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder=tiny_parts["vae"]))
    inputs, _ = model.batch_inputs(batch)
    assert inputs.grid_cells is None  # (IL-RoPE: rows 1 and 2 of the positions, as ever)
    with torch.no_grad():
        x, _ = model.embed_inputs(inputs)
        y, _ = model.embed_inputs(replace(inputs, grid_cells=cells))
    assert torch.equal(x, y)
    bagel = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder=tiny_parts["vae"],
                                   positions="bagel"))
    assert bagel.batch_inputs(batch)[0].grid_cells is not None
    with pytest.raises(ValueError, match="grid_cells"):
        bagel.embed_inputs(SequenceInputs(inputs.input_ids, inputs.position_ids, inputs.n_und,
                                          clean_tokens=inputs.clean_tokens, clean_index=inputs.clean_index))


def test_the_options_reach_the_data_side_from_the_model_and_bad_combinations_are_refused(tiny_parts):
    model = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder="pixel",
                                   latent_patch=4, positions="bagel", sequence_format="bagel", text_sees_vae=True))
    cfg = small_config().for_model(model)
    assert (cfg.positions, cfg.sequence_format, cfg.vit_patch, cfg.vae_patch, cfg.drop_unread_vae) == (
        "bagel", "bagel", model.vit_patch, 4, False)
    assert small_config() == replace(small_config(), positions="il_rope", sequence_format="mogao")
    with pytest.raises(ConfigError, match="flash_varlen"):
        load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], sequence_format="bagel",
                               attention="flash_varlen"))
    with pytest.raises(ConfigError, match="positions"):
        load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], positions="alibi"))
    with pytest.raises(ConfigError, match="data.positions"):
        small_config(positions="alibi")

