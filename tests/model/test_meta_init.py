"""Meta-device initialisation (`meta_init: true`): the model is built without weights and each rank reads only
its own FSDP2 shards from the safetensors files. Against the model built the normal way with the same seed:
the same full state dict (bit-equal) and the same first-step loss; no rank ever holds or reads more than its
shards of the LLM and ViT.

The 2-rank runs (gloo, launched as torchrun would) happen once in a module-scoped fixture
(tests/meta_init_child.py); the tests read what they wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed import _launch
from test_distributed import _wait as wait_for_ranks

from mogao.model.config import ModelConfig
from mogao.model.io import load_model

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "meta_init_child.py"
WORLD = 2


@pytest.fixture(scope="module")
def saved(tiny_parts, tmp_path_factory) -> Path:
    """A saved mogao model whose generation expert differs from the understanding expert."""
    torch.manual_seed(1)
    model = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"],
                                   autoencoder=tiny_parts["vae"], latent_patch=2))
    with torch.no_grad():
        for p in model.backbone.generation_parameters():
            p.add_(0.01 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("saved") / "model"
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def runs(tiny_parts, saved, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta_init")
    spec = {"out": str(out), "tokenizer": str(tiny_parts["root"] / "tokenizer"), "llm": tiny_parts["llm"],
            "vit": tiny_parts["vit"], "vae": tiny_parts["vae"], "saved": str(saved),
            "runs": ["normal", "meta", "saved_meta"]}
    wait_for_ranks(_launch(spec, WORLD, CHILD), str(out), relaunch=lambda: _launch(spec, WORLD, CHILD))
    return out


def _report(out: Path, run: str, rank: int) -> dict:
    return json.loads((out / f"{run}.rank{rank}.json").read_text())


def _assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_per_shard_load_equals_normal_build(runs):
    normal = torch.load(runs / "state.normal.pt", weights_only=True)
    meta = torch.load(runs / "state.meta.pt", weights_only=True)
    _assert_same_state(meta, normal)
    for rank in range(WORLD):  # the same first step: each rank's loss bit-equal; the same parameters (ties)
        got, want = _report(runs, "meta", rank), _report(runs, "normal", rank)
        assert got["loss"] == want["loss"] and got["params"] == want["params"]


def test_per_shard_load_from_saved_model(runs, saved):
    want = load_model(saved).state_dict()
    got = torch.load(runs / "state.saved_meta.pt", weights_only=True)
    _assert_same_state(got, want)
    reads = [_report(runs, "saved_meta", r)["reads"] for r in range(WORLD)]
    assert all(None not in ranges for rd in reads for ranges in rd.values())  # only slices, never whole


@pytest.mark.parametrize("run", ["meta", "saved_meta"])
def test_no_rank_holds_the_whole_model(runs, run):
    normal = _report(runs, "normal", 0)
    assert normal["after_init_bytes"] == normal["total_bytes"]  # the normal build: everything, on every rank
    for rank in range(WORLD):
        r = _report(runs, run, rank)
        assert r["after_init_bytes"] == 0  # __init__ allocates no parameter
        # after setup: this rank's shards only (dim-0 chunks: at most one row more than an even split each)
        assert 0 < r["after_setup_bytes"] <= r["total_bytes"] / WORLD + r["row_bytes"]


def test_each_rank_reads_only_its_rows(runs):
    reads = [_report(runs, "meta", r)["reads"] for r in range(WORLD)]
    assert set(reads[0]) == set(reads[1])
    from safetensors import safe_open

    spec = json.loads(Path(f"{runs}.json").read_text())  # (where `_launch` wrote it)
    shapes = {}
    for part in ("llm", "vit"):
        with safe_open(str(Path(spec[part]) / "model.safetensors"), "pt") as f:
            shapes[part] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # every tensor of both checkpoints but SigLIP's pooling head (removed: only patch features are used)
    assert set(reads[0]) == set(shapes["llm"]) | {k for k in shapes["vit"] if not k.startswith("head.")}

    def rows(key: str) -> int:
        return (shapes["llm"].get(key) or shapes["vit"][key])[0]

    for key in reads[0]:
        ranges = []
        for rank in range(WORLD):
            mine = {tuple(x) for x in reads[rank][key] if x is not None}
            assert None not in reads[rank][key], f"rank {rank} read all of {key}"
            assert len(mine) == 1, (key, mine)  # the same rows each time (und and gen copies share a key)
            ranges += mine
        ranges.sort()
        assert ranges[0][0] == 0 and ranges[-1][1] == rows(key), (key, ranges)  # together: every row once
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), (key, ranges)
    whole = _report(runs, "meta", 0)["whole"]
    assert whole and all(n.split(".")[0] in ("autoencoder", "time_embed", "connector", "latent_proj")
                         for n in whole)


# ---- one process: whole tensors through the same reader -------------------------------------------------
@pytest.mark.parametrize("family,extra,conditioning", [("llama", 7, "adaln"), ("qwen2", 5, "additive")])
def test_whole_load_equals_from_parts(tiny_parts, tmp_path, family, extra, conditioning):
    """Untied LM head (llama), tied (qwen2), grown vocabulary and both timestep conditionings."""
    from mogao.model.tiny import save_tiny_llm
    from mogao.training.shard_load import load_weights, plan_weights

    llm = str(save_tiny_llm(tmp_path / family, vocab_size=100, hidden_size=32, family=family))
    cfg = ModelConfig(llm=llm, vit=tiny_parts["vit"], autoencoder=tiny_parts["vae"], vocab_size=100 + extra,
                      timestep_conditioning=conditioning)
    torch.manual_seed(3)
    want = load_model(cfg).state_dict()
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    model = load_model(cfg, meta=True)
    plan = plan_weights(model, rng_state=rng)
    assert all(p.is_meta for p in model.parameters())
    load_weights(model, plan)
    _assert_same_state(model.state_dict(), want)
    head, emb = model.backbone.lm_head.weight, model.backbone.embed_tokens.weight
    assert (head is emb) == (family == "qwen2")  # a tied checkpoint stays tied


def test_meta_init_module_without_sharding(tiny_parts):
    from mogao.training.module import InterleavedModule

    cfg = ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder=tiny_parts["vae"])
    tok = str(tiny_parts["root"] / "tokenizer")
    torch.manual_seed(0)
    want = InterleavedModule(model=cfg, tokenizer=tok).model.state_dict()
    torch.manual_seed(0)
    module = InterleavedModule(model=cfg, tokenizer=tok, meta_init=True)
    assert all(p.is_meta for p in module.model.parameters())
    module.configure_model()  # no sharding strategy: the whole model, by the same reader
    _assert_same_state(module.model.state_dict(), want)
    assert module.model.backbone.lm_head.weight is module.model.backbone.embed_tokens.weight


def test_meta_init_refuses_lora(tiny_parts):
    from mogao.errors import ConfigError
    from mogao.lora import LoraSpec
    from mogao.training.module import InterleavedModule

    cfg = ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"])
    with pytest.raises(ConfigError, match="meta_init"):
        InterleavedModule(model=cfg, tokenizer=str(tiny_parts["root"] / "tokenizer"), meta_init=True,
                          lora=LoraSpec())
