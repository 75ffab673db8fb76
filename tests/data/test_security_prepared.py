"""Prepared data folders from others (SECURITY.md): a shard is read as the plain Arrow columns `mogao data prepare`
writes - never through a library's feature types, which would let a stored value fetch a URL or open a local
file - and a malformed manifest, shard or row is a `DataError` naming the file, never a traceback.

Nothing here may reach the network: the openers a stored `Image` feature would use are replaced by recorders
that fail, and a FIFO stands for a local path that would hang a reader (each read runs under a time limit).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from conftest_data import make_image, run_with_time_limit, small_config, tiny_tokenizer, write_jsonl

import mogao.data.prepared as prepared
from mogao.data import PackedDataset
from mogao.data.cli import main as data_main
from mogao.data.prepared import PreparedSamples, prepare
from mogao.errors import DataError


@pytest.fixture
def no_fetching(monkeypatch):
    """Every opener a stored `Image` feature (or fsspec, urllib, a socket) would use, recording its calls and
    failing instead of opening anything; the list of calls is what a test checks."""
    import socket
    import urllib.request

    import datasets.features.image as hf_image
    import datasets.utils.file_utils as hf_files
    import fsspec

    calls: list[str] = []

    def refuse(name):
        def opener(*args, **kwargs):
            calls.append(f"{name}{args[:1]}")
            raise OSError(f"{name} was called: no file or URL may be opened here")
        return opener

    monkeypatch.setattr(hf_image, "xopen", refuse("datasets xopen"))
    monkeypatch.setattr(hf_files, "xopen", refuse("datasets xopen"))
    monkeypatch.setattr(fsspec, "open", refuse("fsspec.open"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urlopen"))
    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    return calls


@pytest.fixture
def data(tmp_path) -> Path:
    """A prepared folder of three samples (one shard), as `mogao data prepare` writes it."""
    make_image(tmp_path / "src" / "a.png")
    src = write_jsonl(tmp_path / "src" / "d.jsonl", [
        {"id": f"s{i}", "segments": [{"text": f"caption {i}", "loss": False}, {"image": "a.png", "generate": True}]}
        for i in range(3)])
    prepare(src, tmp_path / "d.data", progress=False)
    return tmp_path / "d.data"


def _rows(data: Path, k: int = 0) -> list[dict]:
    with pa.memory_map(str(data / f"shard-{k:05d}.arrow")) as m:
        return pa.ipc.open_stream(m).read_all().to_pylist()


def _write_shard(data: Path, rows: list[dict], schema: pa.Schema, k: int = 0) -> Path:
    path = data / f"shard-{k:05d}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=schema))
    return path


def _with_image_column(data: Path, paths: list[str]) -> Path:
    """Rewrite the shard with an extra column `x` whose stored feature type is `datasets.Image`, each row's value
    a path and no bytes (what makes the library open the path, or fetch the URL, on every read)."""
    from datasets import Features, Image

    features = Features.from_arrow_schema(prepared.SCHEMA)
    features["x"] = Image()
    rows = [{**r, "x": {"bytes": None, "path": p}} for r, p in zip(_rows(data), paths)]
    return _write_shard(data, rows, features.arrow_schema)


# ---- stored feature types are never honoured ---------------------------------------------------------------


def test_a_shard_with_an_image_feature_of_urls_is_refused_without_fetching(data, no_fetching, capsys):
    shard = _with_image_column(data, ["http://example.invalid/p.png", "hf://datasets/x/y/p.png",
                                      "s3://bucket/p.png"])
    with pytest.raises(DataError, match="columns") as e:
        run_with_time_limit(lambda: [PreparedSamples(data)[i] for i in range(3)])
    assert str(shard) in str(e.value)
    rc = run_with_time_limit(lambda: data_main(["check", str(data)]))
    assert rc == 1 and str(shard) in capsys.readouterr().err
    assert no_fetching == []


def test_a_shard_with_an_image_feature_on_a_fifo_is_refused_without_hanging(data, tmp_path, no_fetching):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    shard = _with_image_column(data, [str(fifo)] * 3)
    with pytest.raises(DataError, match="columns") as e:
        run_with_time_limit(lambda: PreparedSamples(data)[0], [fifo])
    assert str(shard) in str(e.value) and no_fetching == []


# ---- malformed folders are DataErrors at open (or, for one row, a bad sample) ------------------------------


def _manifest(data: Path) -> dict:
    return json.loads((data / prepared.MANIFEST).read_text())


def _set_manifest(data: Path, manifest: dict) -> None:
    (data / prepared.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: {**m, "shards": m["shards"] * 50, "samples": m["samples"] * 50}, "each shard named once|every shard"),
    (lambda m: {**m, "shards": [{"file": "shard-00000.arrow", "rows": "3"}]}, "shard 0"),
    (lambda m: {**m, "shards": "shard-00000.arrow"}, "not a list"),
    (lambda m: {**m, "problems": [1]}, "'problems'"),
], ids=["same shard 50 times", "rows not a number", "shards not a list", "problems"])
def test_a_malformed_manifest_is_a_data_error_naming_it(data, change, message):
    _set_manifest(data, change(_manifest(data)))
    with pytest.raises(DataError, match=message) as e:
        PreparedSamples(data)
    assert str(data / prepared.MANIFEST) in str(e.value)


def test_a_manifest_nested_too_deeply_or_too_large_is_a_data_error(data):
    (data / prepared.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="unreadable manifest") as e:
        PreparedSamples(data)
    assert str(data / prepared.MANIFEST) in str(e.value)
    (data / prepared.MANIFEST).write_text(" " * (prepared.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(DataError, match="more than a manifest") as e:
        PreparedSamples(data)
    assert str(data / prepared.MANIFEST) in str(e.value)


@pytest.mark.parametrize("column, arrow_type, value", [
    ("segments", pa.list_(pa.string()), ["a caption"]),
    ("line", pa.string(), "seven"),
    ("images", pa.list_(pa.int64()), [1]),
], ids=["segments of strings", "line a string", "images of numbers"])
def test_a_shard_with_columns_of_other_types_is_a_data_error_naming_it(data, column, arrow_type, value):
    rows = [{**r, column: value} for r in _rows(data)]
    schema = prepared.SCHEMA.set(prepared.SCHEMA.get_field_index(column), pa.field(column, arrow_type))
    shard = _write_shard(data, rows, schema)
    with pytest.raises(DataError, match="columns") as e:
        PreparedSamples(data)
    assert str(shard) in str(e.value)


def test_a_shard_missing_a_column_or_not_arrow_is_a_data_error(data):
    rows = [{k: v for k, v in r.items() if k != "images"} for r in _rows(data)]
    shard = _write_shard(data, rows, prepared.SCHEMA.remove(prepared.SCHEMA.get_field_index("images")))
    with pytest.raises(DataError, match="columns") as e:
        PreparedSamples(data)
    assert str(shard) in str(e.value)
    shard.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match="not an Arrow stream") as e:
        PreparedSamples(data)
    assert str(shard) in str(e.value)


def _bad_rows(data: Path) -> Path:
    """Row 1 has no segments, row 2 points at an image the row does not hold (the schema is right)."""
    rows = _rows(data)
    rows[1]["segments"] = None
    rows[2]["segments"][1]["image"] = 5
    return _write_shard(data, rows, prepared.SCHEMA)


def test_a_malformed_row_is_a_data_error_naming_shard_and_row(data):
    shard = _bad_rows(data)
    samples = PreparedSamples(data)
    assert samples[0].id == "s0"
    for i in (1, 2):
        with pytest.raises(DataError, match=f"row {i}") as e:
            samples[i]
        assert str(shard) in str(e.value)


def test_training_skips_and_counts_a_malformed_row(data):
    _bad_rows(data)
    ds = PackedDataset(PreparedSamples(data), tiny_tokenizer(), small_config(bad_sample_grace=5), shuffle=False)
    ids = [i for batch in ds for i in batch.sample_ids]
    assert ids == ["s0"]
    assert ds.stats.bad == 2 and ds.stats.read == 3
    assert all("row" in r["reason"] for r in ds.stats.bad_reasons)


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_shard_with_compressed_batches_is_refused_before_they_are_read(data, codec):
    """Compressed buffers are decompressed into as much memory as each claims - far more than the file may hold
    (a few kilobytes of zstd stand for gigabytes of zeros) - so a shard must be as `prepare` writes it."""
    path, rows = data / "shard-00000.arrow", _rows(data)
    options = pa.ipc.IpcWriteOptions(compression=codec)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, prepared.SCHEMA, options=options) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=prepared.SCHEMA))
    with pytest.raises(DataError, match="compressed") as e:
        PreparedSamples(data)
    assert str(path) in str(e.value)


def test_data_check_lists_a_malformed_row_and_goes_on(data, capsys):
    shard = _bad_rows(data)
    assert data_main(["check", str(data)]) == 1
    out = capsys.readouterr().out
    assert f"{shard}: field 'segments[1]': row 2" in out and f"{shard}: row 1" in out
    assert "1 samples" in out
