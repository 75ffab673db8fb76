"""`mogao data check`: the summary, one message per class of data error (with file, line and field), and
`--fix` writing a cleaned copy plus a report while leaving the original untouched."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mogao.cli import main
from mogao.data import load_samples
from mogao.data.check import fix, summarise


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    Image.new("RGB", (32, 16), "blue").save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return tmp_path


GOOD = [{"id": "g1", "segments": [{"text": "Draw it."}, {"image": "a.png", "generate": True}]},
        {"id": "g2", "segments": [{"image": "a.png"}, {"text": "What?", "loss": False}, {"text": "A square."}]},
        {"id": "g3", "segments": [{"image": "b.png"}, {"text": "Wider.", "loss": False},
                                  {"image": "b.png", "generate": True}]}]

ERRORS = [  # (line, field, message fragment)
    ('{"segments": [{"text": "x"}', None, "invalid JSON"),
    ('{"segments": [{"image": "missing.png"}]}', "segments[0].image", "image file not found"),
    ('{"segments": [{"image": "broken.png"}]}', "segments[0].image", "cannot read image"),
    ('{"segments": []}', "segments", "'segments' is empty"),
    ('{"segments": [{"text": ""}]}', "segments[0].text", "empty text"),
    ('{"segments": [{"text": "a", "image": "a.png"}]}', "segments[0]", "exactly one of 'text' or 'image'"),
    ('{"segments": [{"text": "a", "colour": 1}]}', "segments[0].colour", "unknown key(s) 'colour'"),
    ('{"segments": [{"text": "a", "loss": 2}]}', "segments[0].loss", "must be true or false"),
    ('{"segments": [{"image": "a.png", "generate": "yes"}]}', "segments[0].generate", "'generate' must be true"),
    ('{"segments": [{"image": "a.png", "loss_weight": 0.5}]}', "segments[0].loss_weight", "a condition image has no flow loss"),
    ('{"segments": [{"image": "a.png", "generate": true, "loss": 0.5}]}', "segments[0].loss", "'loss_weight'"),
    ('{"id": "g1", "segments": [{"text": "dup"}]}', "id", "duplicate id 'g1'"),
    ('[1, 2]', None, "a sample must be a JSON object"),
]


def _write(folder, bad_lines):
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(g) + "\n" for g in GOOD) + "".join(line + "\n" for line in bad_lines))
    return path


@pytest.mark.parametrize("line, field, message", ERRORS, ids=[m for _, _, m in ERRORS])
def test_each_error_class_has_a_message_with_file_line_and_field(folder, capsys, line, field, message):
    path = _write(folder, [line])
    (problem,) = summarise(path).problems
    assert problem.line == 4 and problem.field == field and message in str(problem)
    assert main(["data", "check", str(path)]) == 1
    assert f"{path}:4" in capsys.readouterr().out


def test_summary_counts_and_histograms(folder, capsys, parts):
    path = _write(folder, [])
    assert main(["data", "check", str(path), "--tokenizer", str(parts["tokenizer"])]) == 0
    out = capsys.readouterr().out
    assert "3 samples, 4 images (2 generation targets), no problems" in out
    assert "images per sample: 1: 2, 2: 1" in out
    assert "resolutions (WxH): 16x16: 2, 32x16: 2" in out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(parts["tokenizer"])
    n = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in ("Draw it.", "What?", "A square.", "Wider."))
    assert f"text tokens: {n}" in out


def test_fix_writes_a_cleaned_copy_and_a_report_and_keeps_the_original(folder, tmp_path, capsys):
    path = _write(folder, [line for line, _, _ in ERRORS])
    original = path.read_bytes()
    assert main(["data", "check", str(path), "--fix"]) == 0
    assert path.read_bytes() == original
    clean = folder / "data.clean.jsonl"
    assert [s.id for s in load_samples(clean)] == ["g1", "g2", "g3"]
    report = json.loads((folder / "data.clean.dropped.json").read_text())
    assert report["kept"] == 3 and report["dropped"] == len(ERRORS)
    assert [p["line"] for p in report["problems"]] == list(range(4, 4 + len(ERRORS)))
    assert report["problems"][1]["field"] == "segments[0].image" and "not found" in report["problems"][1]["reason"]
    # elsewhere: image paths are rebased so the copy still loads
    out = tmp_path / "elsewhere" / "clean.jsonl"
    cleaned, _, kept, dropped = fix(path, out)
    assert (kept, dropped) == (3, len(ERRORS))
    assert [len(s.segments) for s in load_samples(cleaned)] == [2, 3, 3]
    with pytest.raises(Exception, match="original file"):
        fix(path, path)
