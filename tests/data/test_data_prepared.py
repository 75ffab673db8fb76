"""Prepared data sets (`mogao data prepare`): the round trip from JSONL, resumable and byte-identical preparation,
refusals, `data check` on a folder, lazy reading in training (same batches as the JSONL, exact resume, a damaged
stored image skipped and counted) and a recipe source `path: DATA_DIR` trained through `mogao fit`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pytest
from conftest_data import tiny_tokenizer
from test_runtime_faults import _dm, _take, args, corrupt, write_source

import mogao.data.prepared as prepared
from mogao.data import DataConfig, PackedDataset, load_samples
from mogao.data.cli import main as data_main
from mogao.data.prepared import ImageBytes, PreparedSamples, prepare
from mogao.data.samples import ImageSegment
from mogao.errors import ConfigError, DataError
from mogao.recipes import build_cli
from mogao.training.datamodule import MogaoDataModule, Source


def _source(root: Path, n: int = 14, bad_line: bool = True) -> Path:
    """`write_source` plus a text-only sample and (optionally) a line that is not JSON."""
    src = write_source(root, n=n)
    extra = [json.dumps({"id": "txt", "segments": [{"text": "a red square", "loss": True}]})]
    if bad_line:
        extra.append("{not json")
    with src.open("a") as f:
        f.write("\n".join(extra) + "\n")
    return src


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _damage_stored_image(data: Path, sample_id: str) -> None:
    """Replace the stored bytes of `sample_id`'s image with garbage (as damage on disk would)."""
    for f in sorted(data.glob("shard-*.arrow")):
        with pa.memory_map(str(f)) as m:
            table = pa.ipc.open_stream(m).read_all()
        rows = table.to_pylist()
        if not any(r["id"] == sample_id for r in rows):
            continue
        for r in rows:
            if r["id"] == sample_id:
                r["images"] = [b"\x89PNG\r\n\x1a\n" + bytes(range(7, 71))]
        with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_stream(sink, prepared.SCHEMA) as w:
            w.write_table(pa.Table.from_pylist(rows, schema=prepared.SCHEMA))
        return
    raise AssertionError(sample_id)


def test_prepare_round_trip_gives_the_jsonl_samples(tmp_path):
    src = _source(tmp_path / "d")
    summary = prepare(src, tmp_path / "out", shard_size=4, progress=False)
    assert (summary.samples, summary.images, summary.bad, summary.shards) == (15, 14, 1, 4)
    assert "pics.jsonl:16" in summary.problems[0] and "invalid JSON" in summary.problems[0]
    want = load_samples(src, strict=False)
    got = PreparedSamples(tmp_path / "out")
    assert len(got) == len(want) == 15
    for a, b in zip(want, list(got)):
        assert (a.id, a.line, Path(a.file).resolve()) == (b.id, b.line, Path(b.file))
        assert len(a.segments) == len(b.segments)
        for sa, sb in zip(a.segments, b.segments):
            if isinstance(sa, ImageSegment):
                assert isinstance(sb.image, ImageBytes) and sb.image.getvalue() == Path(sa.image).read_bytes()
                assert (sa.generate, sa.loss_weight) == (sb.generate, sb.loss_weight)
            else:
                assert sa == sb
    assert got[3].id == got[-12].id == "s3"  # random access, negative indices too
    with pytest.raises(IndexError):
        got[15]


def test_interrupted_prepare_resumes_to_byte_identical_output(tmp_path, monkeypatch):
    src = _source(tmp_path / "d")
    prepare(src, tmp_path / "once", shard_size=4, progress=False)
    real, calls = prepared._ShardWriter.finish, []

    def finish_then_fail(self):
        if calls:
            raise KeyboardInterrupt  # stopped while the second shard was being written
        calls.append(self.k)
        return real(self)

    monkeypatch.setattr(prepared._ShardWriter, "finish", finish_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "twice", shard_size=4, progress=False)
    left = sorted(p.name for p in (tmp_path / "twice").iterdir())
    assert left == [".prepare.json", "shard-00000.arrow", "shard-00000.json"]  # no partial shard, no manifest
    with pytest.raises(ConfigError, match="interrupted"):
        Source(name="x", path=str(tmp_path / "twice")).check_files()
    monkeypatch.setattr(prepared._ShardWriter, "finish", real)
    summary = prepare(src, tmp_path / "twice", shard_size=4, progress=False)
    assert summary.resumed_shards == 1
    assert _files(tmp_path / "twice") == _files(tmp_path / "once")
    again = prepare(src, tmp_path / "twice", shard_size=4, progress=False)  # finished: nothing to do
    assert again.samples == 15 and _files(tmp_path / "twice") == _files(tmp_path / "once")
    with pytest.raises(DataError, match="other data or options"):
        prepare(src, tmp_path / "twice", shard_size=5, progress=False)


def test_prepare_refuses_to_overwrite_its_input_or_other_files(tmp_path):
    src = _source(tmp_path / "d")
    before = src.read_bytes()
    for out, why in [(src, "input file"), (tmp_path / "d", "input file or a folder holding it"),
                     (tmp_path / "d" / "img" / "0.png", "existing file")]:
        with pytest.raises(DataError, match=why):
            prepare(src, out, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="holds other files"):
        prepare(src, tmp_path / "other", progress=False)
    assert data_main(["prepare", str(src), "--out", str(src), "--no-progress"]) == 1
    assert src.read_bytes() == before and (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_data_check_on_a_prepared_folder(tmp_path, capsys):
    src = _source(tmp_path / "d")
    assert data_main(["prepare", str(src), "--out", str(tmp_path / "out"), "--shard-size", "4",
                      "--no-progress"]) == 0
    assert "15 samples, 14 images" in capsys.readouterr().out
    assert data_main(["check", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "15 samples, 14 images (14 generation targets), no problems" in out and "1 bad line(s) left out" in out
    _damage_stored_image(tmp_path / "out", "s5")
    assert data_main(["check", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "pics.jsonl:6: field 'segments[1].image': cannot read image img/5.png (stored in" in out
    assert data_main(["check", str(tmp_path / "d")]) == 1  # a folder that is not a prepared set
    assert "not a prepared data directory" in capsys.readouterr().err


def test_a_prepared_source_gives_the_jsonl_sources_batches_and_resumes_exactly(parts, tmp_path):
    src = write_source(tmp_path / "d", n=16)
    prepare(src, tmp_path / "pics.data", shard_size=5, progress=False)
    data = tmp_path / "pics.data"
    full = _take(_dm(parts["tokenizer"], data), 14)  # 8 batches an epoch: crosses an epoch boundary
    assert full == _take(_dm(parts["tokenizer"], src), 14)
    dm = _dm(parts["tokenizer"], data)
    first = _take(dm, 5)
    resumed = _dm(parts["tokenizer"], data)
    resumed.load_state_dict(dm.state_dict())
    assert first + _take(resumed, 9) == full


def test_exact_resume_with_dataloader_workers_on_a_prepared_source(parts, tmp_path):
    src = write_source(tmp_path / "d", n=12)
    prepare(src, tmp_path / "pics.data", progress=False)
    data = tmp_path / "pics.data"
    full = _take(_dm(parts["tokenizer"], data, num_workers=2), 9)
    dm = _dm(parts["tokenizer"], data, num_workers=2)
    first = _take(dm, 4)
    resumed = _dm(parts["tokenizer"], data, num_workers=2)
    resumed.load_state_dict(dm.state_dict())
    assert first + _take(resumed, 5) == full


def _ranked_dm(tok, data: Path, rank: int, world: int, num_workers: int = 0) -> MogaoDataModule:
    cfg = DataConfig(token_budget=48, max_image_tokens=4, vit_patch=4, vae_patch=4, lookahead=3, seed=1)
    dm = MogaoDataModule(str(tok), [Source(name="pics", path=str(data))], cfg, num_workers=num_workers,
                         worker_timeout=30)
    dm._rank = lambda: (rank, world)  # (what the trainer of a multi-process run gives each rank)
    dm.setup("fit")
    return dm


def _take_with_epochs(dm: MogaoDataModule, k: int) -> list[tuple[int, tuple[str, ...]]]:
    out = []
    for batch in dm.train_dataloader():
        dm.consumed(batch)
        out.append((batch.data_state["sources"]["pics"]["epoch"], tuple(batch.sample_ids)))
        if len(out) == k:
            return out
    raise AssertionError("the stream ended")


def _saved(dms: list[MogaoDataModule]) -> dict:
    """The checkpointed data state of a run of len(dms) ranks (`state_dict` gathers "ranks" under
    torch.distributed; here the ranks are in one process)."""
    state = dms[0].state_dict()
    if len(dms) > 1:
        state["ranks"] = {str(r): {"workers": dm.state_dict()["workers"]} for r, dm in enumerate(dms)}
    return state


@pytest.mark.parametrize(("saved", "now", "k", "workers"), [(2, 1, 3, 0), (1, 2, 4, 0), (2, 1, 3, 2)])
def test_resume_on_another_number_of_ranks_reads_every_sample_once(parts, tmp_path, saved, now, k, workers):
    src = write_source(tmp_path / "d", n=20)
    prepare(src, tmp_path / "pics.data", shard_size=6, progress=False)
    data = tmp_path / "pics.data"
    before = [_ranked_dm(parts["tokenizer"], data, r, saved, workers) for r in range(saved)]
    seen = [i for dm in before for _, ids in _take_with_epochs(dm, k) for i in ids]
    state = _saved(before)
    runs = []
    for _ in range(2):  # resuming twice from one checkpoint gives the same batches
        after = [_ranked_dm(parts["tokenizer"], data, r, now, workers) for r in range(now)]
        for dm in after:
            dm.load_state_dict(state)
        runs.append([_take_with_epochs(dm, 12) for dm in after])
    assert runs[0] == runs[1]
    rest = [i for rank in runs[0] for epoch, ids in rank if epoch == 0 for i in ids]
    assert len(seen) + len(rest) == len(set(seen) | set(rest)) == 20  # the epoch: every sample once
    for rank in runs[0]:  # then whole new epochs, sharded over the new ranks
        assert [e for e, _ in rank] == sorted(e for e, _ in rank)
    epoch1 = [i for rank in runs[0] for epoch, ids in rank if epoch == 1 for i in ids]
    assert len(epoch1) == len(set(epoch1))


@pytest.mark.parametrize(("saved", "now"), [(2, 1), (1, 2)])
def test_a_packed_dataset_alone_refuses_a_position_of_another_world_size(tmp_path, saved, now):
    src = write_source(tmp_path / "d", n=12)
    prepare(src, tmp_path / "pics.data", progress=False)
    samples = PreparedSamples(tmp_path / "pics.data")
    cfg = DataConfig(token_budget=48, max_image_tokens=4, vit_patch=4, vae_patch=4, lookahead=3, seed=1)
    before = PackedDataset(samples, tiny_tokenizer(), cfg, rank=0, world_size=saved)
    it = iter(before)
    next(it), next(it)
    after = PackedDataset(samples, tiny_tokenizer(), cfg, rank=0, world_size=now)
    after.load_state_dict(before.state_dict())
    with pytest.raises(ConfigError, match="resume with the same world size"):
        next(iter(after))


def test_a_damaged_image_inside_a_prepared_set_is_skipped_and_counted(parts, tmp_path):
    src = write_source(tmp_path / "d", n=12)
    prepare(src, tmp_path / "pics.data", shard_size=5, progress=False)
    _damage_stored_image(tmp_path / "pics.data", "s7")
    dm = _dm(parts["tokenizer"], tmp_path / "pics.data")
    batches = _take(dm, 6)  # the whole epoch: 11 good samples
    assert sorted(i for b in batches for i in b) == sorted(f"s{i}" for i in range(12) if i != 7)
    report = dm.fault_report()["train"]
    assert report["bad"] == 1 and report["read"] == 12
    (bad,) = report["sources"]["pics"]["bad_samples"]
    assert (bad["id"], bad["line"], Path(bad["file"])) == ("s7", 8, src.resolve())
    assert "cannot read image img/7.png (stored in" in bad["reason"]


def test_a_folder_that_is_not_prepared_is_refused_with_the_fix(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(ConfigError, match="is a folder but not a prepared data directory.*mogao data prepare"):
        MogaoDataModule("tok", path=str(tmp_path / "stuff"))


def test_a_million_sample_shuffle_is_cheap():
    class Many:
        def __len__(self) -> int:
            return 1_000_000

    ds = PackedDataset(Many(), tiny_tokenizer(), DataConfig(), rank=1, world_size=2)  # type: ignore[arg-type]
    start = time.perf_counter()
    order = ds.shard_indices(3)
    assert time.perf_counter() - start < 2.0  # (a list of Python ints shuffled by random: several seconds)
    assert len(order) == 500_000 and isinstance(order[0], int)
    assert sorted(order[:1000]) != list(order[:1000])  # shuffled
    other = PackedDataset(Many(), tiny_tokenizer(), DataConfig(), rank=0, world_size=2)  # type: ignore[arg-type]
    both = set(order.array.tolist()) | set(other.shard_indices(3).array.tolist())
    assert len(both) == 1_000_000


def test_a_recipe_source_on_a_prepared_folder_trains_through_mogao_fit(parts, tmp_path, one_thread):
    src = write_source(tmp_path / "d", n=8)
    corrupt(tmp_path / "d" / "img" / "2.png")  # left out by prepare
    prepare(src, tmp_path / "pics.data", progress=False)
    cli = build_cli(args(parts, tmp_path / "run", tmp_path / "pics.data", 2))
    assert cli.trainer.global_step == 2
    report = json.loads((tmp_path / "run" / "data_faults.json").read_text())
    assert report["train"]["bad"] == 0 and report["train"]["read"] >= 4


def test_a_second_resume_during_the_re_split_pass_still_reads_every_sample_once(parts, tmp_path):
    src = write_source(tmp_path / "d", n=20)
    prepare(src, tmp_path / "pics.data", shard_size=6, progress=False)
    data = tmp_path / "pics.data"
    two = [_ranked_dm(parts["tokenizer"], data, r, 2) for r in range(2)]
    seen = [i for dm in two for _, ids in _take_with_epochs(dm, 3) for i in ids]
    one = _ranked_dm(parts["tokenizer"], data, 0, 1)
    one.load_state_dict(_saved(two))
    seen += [i for _, ids in _take_with_epochs(one, 2) for i in ids]  # (still in the re-split pass)
    three = [_ranked_dm(parts["tokenizer"], data, r, 3) for r in range(3)]
    for dm in three:
        dm.load_state_dict(_saved([one]))
    rest = [i for dm in three for epoch, ids in _take_with_epochs(dm, 6) if epoch == 0 for i in ids]
    assert len(seen) + len(rest) == len(set(seen) | set(rest)) == 20


def test_an_imported_caption_folder_prepares_and_validation_samples_decode(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (12, 8), colour).save(photos / f"{i}.png")
        (photos / f"{i}.txt").write_text(f"a {colour} square")
    out = tmp_path / "data" / "mine.jsonl"
    out.parent.mkdir()
    assert data_main(["import", "captions", str(photos), "--out", str(out)]) == 0
    assert data_main(["prepare", str(out), "--out", str(tmp_path / "mine.data"), "--no-progress"]) == 0
    dm = MogaoDataModule("tok", path=str(tmp_path / "mine.data"), val_path=str(tmp_path / "mine.data"))
    assert dm.sources[0].name == "mine"
    val = dm.val_samples("mine")  # (what exact-match validation hands to the generation loop: PIL images)
    assert [s.segments[0].text for s in val] == ["a red square", "a blue square", "a green square"]
    assert all(s.segments[1].image.size == (12, 8) for s in val)
