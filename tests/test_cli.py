"""The console script's verbs run end to end."""

from __future__ import annotations

import json

from PIL import Image

from mogao.cli import main


def test_data_check_reports_problems_with_file_and_line(tmp_path, capsys):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"segments": [{"text": "hi"}, {"image": "a.png", "generate": True}]}) + "\n")
    assert main(["data", "check", str(good)]) == 0
    assert "1 samples, 1 images (1 generation targets)" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"segments": [{"image": "missing.png"}]}) + "\n" + "{not json\n")
    assert main(["data", "check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "bad.jsonl:1" in out and "missing.png" in out and "bad.jsonl:2" in out


def test_demo_writes_curves_summary_and_model(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "run"), "--steps", "3", "--samples", "8"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["summary"]
    assert summary["steps"] == 3
    assert (tmp_path / "run" / "losses.png").stat().st_size > 1000
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
