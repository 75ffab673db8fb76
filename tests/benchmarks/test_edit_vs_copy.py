"""benchmarks/edit_vs_copy.py: copy samples are the condition image again, phases parse, and each phase reports
the edit judge's three shares and the copies' exactness."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.tiny import TinySpec, ensure_tiny_components

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "edit_vs_copy.py"


def _script():
    spec = importlib.util.spec_from_file_location("edit_vs_copy", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _saved_model(root: Path, patch: int) -> Path:
    """A tiny random model (ViT patch and latent patch `patch`) saved with its tokenizer under root/model."""
    d = {k: root / k for k in ("tokenizer", "llm", "vit")}
    ensure_tiny_components(TinySpec(hidden_size=32, layers=1, heads=2, kv_heads=1, vit_hidden_size=16,
                               vit_patch_size=patch), **d)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d["tokenizer"])
    cfg = ModelConfig(llm=str(d["llm"]), vit=str(d["vit"]), autoencoder="pixel", latent_patch=patch, prediction="x0",
                      vocab_size=len(tok))
    load_model(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def test_copy_samples_ask_for_the_condition_image_unchanged():
    for s in _script().copy_samples(3, 0):
        cond, text, target = s["segments"]
        assert text == {"text": "Keep it.", "loss": False} and target["generate"] is True
        assert np.array_equal(np.asarray(cond["image"]), np.asarray(target["image"]))


def test_phases_train_and_report(tmp_path):
    mod = _script()
    with pytest.raises(SystemExit):
        mod.main(["--init", str(tmp_path), "--phases", "paint:3"])
    model = _saved_model(tmp_path, 4)
    lines = mod.main(["--init", str(model), "--phases", "copy:2,copy+edit:1", "--val-n", "2",
                      "--train-n", "16", "--ops", "recolour", "--threads", "1"])
    assert len(lines) == 3 and lines[1].startswith("after copy x 2 (step 2") and "copy+edit x 1 (step 3" in lines[2]
    pattern = r"changed / kept / correct = ([\d.]+) / ([\d.]+) / ([\d.]+); 32 validation scenes copied exactly ([\d.]+)"
    for line in lines:
        assert all(0.0 <= float(x) <= 1.0 for x in re.search(pattern, line).groups())


def test_one_object_edits_at_patch_8_and_a_judge_only_phase(tmp_path):
    """--max-objects 1 and a model of another latent patch (the token grid follows the model); a phase of 0
    steps judges without training."""
    mod = _script()
    model = _saved_model(tmp_path, 8)
    lines = mod.main(["--init", str(model), "--phases", "edit:0,edit:1", "--val-n", "2",
                      "--train-n", "8", "--max-objects", "1", "--threads", "1"])
    assert lines[1].startswith("after edit x 0 (step 0") and "last flow loss nan" in lines[1]
    assert lines[2].startswith("after edit x 1 (step 1") and "last flow loss nan" not in lines[2]
