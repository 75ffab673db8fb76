"""What the data pipeline logs about bad samples quotes the data (ids, image paths, unknown keys, the source a
prepared folder names): control and format characters are escaped, so a data file cannot drive the terminal
the log is shown on (SECURITY.md)."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
from conftest_data import make_image, small_config, tiny_tokenizer, write_jsonl

from mogao.data import PackedDataset, load_samples
from mogao.data.prepared import MANIFEST, SCHEMA, PreparedSamples, prepare

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202e"
ESCAPED = "\\x1b]0;pwned\\x07\\x1b[2J\\u202e"


def _clean(records) -> list[str]:
    messages = [r.getMessage() for r in records]
    for m in messages:
        assert "\x1b" not in m and "\x07" not in m and "\u202e" not in m, m
    return messages


def test_the_packer_escapes_the_image_path_and_source_it_logs(tmp_path, caplog):
    make_image(tmp_path / "ok.png")
    src = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "s0", "segments": [{"text": "a red square"}, {"image": "ok.png", "generate": True}]},
        {"id": "s1", "segments": [{"text": "a red square"}, {"image": f"{HOSTILE}.png", "generate": True}]}])
    ds = PackedDataset(load_samples(src, check_images=False), tiny_tokenizer(), small_config(), shuffle=False)
    with caplog.at_level(logging.WARNING):
        assert [i for b in ds for i in b.sample_ids] == ["s0"]
    (message,) = [m for m in _clean(caplog.records) if "skipping bad sample" in m]
    assert f"{ESCAPED}.png" in message
    # a prepared folder's manifest names the source file its errors point at
    prepare(src, tmp_path / "d.data", progress=False)
    manifest = json.loads((tmp_path / "d.data" / MANIFEST).read_text())
    (tmp_path / "d.data" / MANIFEST).write_text(json.dumps({**manifest, "source": f"{HOSTILE}.jsonl"}))
    shard = tmp_path / "d.data" / "shard-00000.arrow"
    with pa.memory_map(str(shard)) as m:
        rows = pa.ipc.open_stream(m).read_all().to_pylist()
    rows[0]["images"] = [b"not an image"]
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as w:
        w.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
    caplog.clear()
    ds = PackedDataset(PreparedSamples(tmp_path / "d.data"), tiny_tokenizer(), small_config(), shuffle=False)
    with caplog.at_level(logging.WARNING):
        assert [i for b in ds for i in b.sample_ids] == []
    (message,) = [m for m in _clean(caplog.records) if "skipping bad sample" in m]
    assert f"{ESCAPED}.jsonl" in message


def test_loading_samples_escapes_the_keys_it_logs(tmp_path, caplog):
    src = write_jsonl(tmp_path / "d.jsonl", [{"id": "s0", "segments": [{"text": "hi", HOSTILE: 1}]}])
    with caplog.at_level(logging.WARNING):
        assert load_samples(src, strict=False) == []
    messages = _clean(caplog.records)
    assert any(f"field 'segments[0].{ESCAPED}'" in m for m in messages), messages
