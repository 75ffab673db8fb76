"""A published BAGEL folder filled shard by shard (`meta_bagel_model`, `mogao.training.shard_load`): the same
model as `load_bagel_model` gives (in the float32 of a full fine-tuning), bit for bit, with each of 2 FSDP2
ranks (gloo) reading only the rows of its own shards of every tensor whose rows stay rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed import _launch
from test_distributed import _wait as wait_for_ranks
from tiny_bagel import write_tiny_bagel

from mogao.bagel.load import load_bagel_model, meta_bagel_model
from mogao.training.shard_load import load_weights, plan_bagel_weights

CHILD = Path(__file__).resolve().parent / "shard_load_child.py"
WORLD = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_bagel(tmp_path_factory.mktemp("bagel-shards") / "BAGEL-tiny")


def _same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_one_process_fills_the_model_load_bagel_model_gives(tiny):
    want = load_bagel_model(tiny.path)[0].float()
    model, info = meta_bagel_model(tiny.path)
    assert all(p.is_meta for p in model.parameters())
    assert model.bagel_source == want.bagel_source and model.source_path == want.source_path
    report = load_weights(model, plan_bagel_weights(model, info), "cpu")
    _same(model.state_dict(), want.state_dict())
    assert "vit.model.embeddings.patch_embedding.weight" in report.whole  # (reshaped: read whole)


@pytest.mark.slow  # (2 processes)
def test_each_rank_reads_only_its_rows(tiny, tmp_path):
    out = str(tmp_path / "shards")
    spec = {"out": out, "folder": str(tiny.path)}
    wait_for_ranks(_launch(spec, WORLD, CHILD), out, relaunch=lambda: _launch(spec, WORLD, CHILD))
    _same(torch.load(out + ".state.pt", weights_only=True), load_bagel_model(tiny.path)[0].float().state_dict())
    reports = [json.loads(Path(out + f".rank{r}.json").read_text()) for r in range(WORLD)]
    vocab = tiny.llm["vocab_size"]
    embed = "language_model.model.embed_tokens.weight"
    assert [r["reads"][embed] for r in reports] == [[[0, vocab // 2]], [[vocab // 2, vocab]]]
    layer = "language_model.model.layers.1.mlp_moe_gen.down_proj.weight"
    assert [r["reads"][layer] for r in reports] == [[[0, 16]], [[16, 32]]]  # (hidden 32 rows)
    for r in reports:
        whole = {k for k, ranges in r["reads"].items() if None in ranges}
        assert not any(k.startswith("language_model.") for k in whole)  # every LLM tensor by its rows
        assert r["local_bytes"] <= 0.55 * r["total_bytes"]  # each rank holds about half the parameters
