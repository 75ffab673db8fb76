"""The mixture data stream: weights and schedules pick sources by batch index, and a saved position resumes the
exact stream - in the training process and with DataLoader workers."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from mogao.data import DataConfig
from mogao.errors import ConfigError
from mogao.training.datamodule import MogaoDataModule, Source


def _dm(tiny_parts, weights=(1.0, 1.0), num_workers=0, n=24) -> MogaoDataModule:
    tok_dir = tiny_parts["root"] / "tokenizer"
    srcs = [Source(name="t2i", builtin="t2i", n=n, weight=weights[0], options={"max_objects": 1}),
            Source(name="digits", builtin="digits_t2i", n=n, weight=weights[1])]
    cfg = DataConfig(token_budget=200, max_image_tokens=4, vit_patch=4, vae_patch=4, seed=3)
    dm = MogaoDataModule(str(tok_dir), srcs, cfg, num_workers=num_workers)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def builtin_tokenizer(tmp_path_factory):
    """A tokenizer covering the built-in vocabulary."""
    from mogao.data.builtin import builtin_corpus
    from mogao.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("dm")
    train_tokenizer(builtin_corpus(), vocab_size=400).save_pretrained(root / "tokenizer")
    return {"root": root}


def _take(dm: MogaoDataModule, k: int, consume: bool = True) -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for batch in dm.train_dataloader():
        if consume:
            dm.consumed(batch)
        out.append((batch.data_state["source"], tuple(batch.sample_ids)))
        if len(out) == k:
            break
    return out


def test_sources_follow_the_weights(builtin_tokenizer):
    picks = [s for s, _ in _take(_dm(builtin_tokenizer, weights=(3.0, 1.0)), 200)]
    share = picks.count("t2i") / len(picks)
    assert 0.65 < share < 0.85
    assert picks == [s for s, _ in _take(_dm(builtin_tokenizer, weights=(3.0, 1.0)), 200)]  # deterministic


def test_mixture_schedule_switches_sources_at_its_step(builtin_tokenizer):
    dm = _dm(builtin_tokenizer)
    dm.set_schedules(mixture=[(0, {"t2i": 1.0}), (10, {"digits": 1.0})])
    picks = [s for s, _ in _take(dm, 20)]
    assert picks == ["t2i"] * 10 + ["digits"] * 10


def test_mixture_schedule_naming_an_unknown_source_fails(builtin_tokenizer):
    dm = _dm(builtin_tokenizer)
    dm.set_schedules(mixture=[(0, {"nope": 1.0})])
    with pytest.raises(ConfigError, match="nope"):
        _take(dm, 1)


def test_resolution_schedule_changes_image_tokens(builtin_tokenizer):
    dm = _dm(builtin_tokenizer)
    dm.set_schedules(resolution=[(3, 1)])
    grids = []
    for batch in dm.train_dataloader():
        grids.append(int(batch.image_grid.prod(1).max()))
        if len(grids) == 8:
            break
    assert grids[:2] == [4, 4] and grids[-1] == 1


@pytest.mark.parametrize(("workers", "k"), [(0, 17), (2, 17), (2, 1)])
def test_saved_position_resumes_the_exact_stream(builtin_tokenizer, workers, k):
    # epochs of 24 samples end inside the 40 batches: the position also crosses epoch boundaries
    full = _take(_dm(builtin_tokenizer, num_workers=workers), 40)
    dm = _dm(builtin_tokenizer, num_workers=workers)
    first = _take(dm, k)
    state = dm.state_dict()
    resumed = _dm(builtin_tokenizer, num_workers=workers)
    resumed.load_state_dict(state)
    rest = _take(resumed, 40 - k)
    assert first + rest == full


def test_source_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        Source(name="x", builtin="t2i", path="a.jsonl")
    # a missing file is named when the data module is built from the sources (a recipe's placeholder source
    # may be replaced on the command line after its list was parsed)
    missing = Source(name="x", path=str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(ConfigError, match="nowhere.jsonl"):
        MogaoDataModule("tok", [missing])
    with pytest.raises(ConfigError, match="duplicate"):
        MogaoDataModule("tok", [Source(name="a", builtin="t2i"), Source(name="a", builtin="vqa")])


def test_validation_batches_are_fixed_and_per_source(builtin_tokenizer):
    srcs = [Source(name="t2i", builtin="t2i", n=8, val_n=6), Source(name="vqa", builtin="vqa", n=8, val_n=0)]
    dm = MogaoDataModule(str(builtin_tokenizer["root"] / "tokenizer"), srcs,
                         DataConfig(token_budget=400, max_image_tokens=4, vit_patch=4, vae_patch=4))
    dm.setup("validate")
    assert dm.val_names == ["t2i"]
    loaders = dm.val_dataloader()
    ids = [tuple(b.sample_ids) for b in loaders[0]]
    assert sorted(i for b in ids for i in b) == sorted(f"t2i-validation-0-{i}" for i in range(6))
    assert ids == [tuple(b.sample_ids) for b in dm.val_dataloader()[0]]
    assert isinstance(loaders[0], DataLoader)


def test_data_path_is_one_source_and_val_path_needs_it(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"id": "a", "segments": [{"text": "hello"}]}\n')
    dm = MogaoDataModule("tok", sources=[Source(name="x", builtin="t2i")], path=str(f), val_path=str(f))
    assert [(s.name, s.path, s.val_path) for s in dm.sources] == [("mine", str(f), str(f))]
    with pytest.raises(ConfigError, match="val_path needs data.path"):
        MogaoDataModule("tok", sources=[Source(name="x", builtin="t2i")], val_path=str(f))
    with pytest.raises(ConfigError, match="--data.path"):
        MogaoDataModule("tok")
    with pytest.raises(ConfigError, match="file not found"):
        MogaoDataModule("tok", path=str(tmp_path / "missing.jsonl"))
