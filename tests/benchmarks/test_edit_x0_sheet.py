"""benchmarks/edit_x0.py: the sheet of x̂₀ per noise level for validation edits. At σ = 0 the noisy image is the
reference itself and x̂₀ = x_σ − σ·v̂ must return it exactly, whatever the model; the sheet has one row per
edit and one column per σ between the source and the reference. benchmarks/edit_loss_split.py: the same x̂₀
split into the tokens an edit changes and the ones it keeps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mogao.data.builtin import make_builtin
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.tiny import TinySpec, ensure_tiny_components

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCH / "edit_x0.py"


def _script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_model(tmp_path: Path) -> dict[str, Path]:
    d = {k: tmp_path / k for k in ("tokenizer", "llm", "vit")}
    ensure_tiny_components(TinySpec(hidden_size=32, layers=1, heads=2, kv_heads=1, vit_hidden_size=16, vit_patch_size=4),
                      **d)
    from transformers import AutoTokenizer

    cfg = ModelConfig(llm=str(d["llm"]), vit=str(d["vit"]), autoencoder="pixel", latent_patch=4, prediction="x0",
                      vocab_size=len(AutoTokenizer.from_pretrained(d["tokenizer"])))
    load_model(cfg).save_pretrained(tmp_path / "model")
    return d


def test_sheet_shows_the_reference_at_sigma_zero(tmp_path):
    d = _tiny_model(tmp_path)
    out = _script(SCRIPT).main([str(tmp_path / "model"), "--tokenizer", str(d["tokenizer"]), "--out", str(tmp_path / "x0.png"),
                    "--sigmas", "0", "1", "--n", "2"])
    sheet = np.asarray(Image.open(out).convert("RGB"))
    cell, head = 32 * 3 + 4, 14  # 32-pixel images shown 3x, 4 pixels apart, under a 14-pixel title row
    assert sheet.shape == (head + 2 * cell, 4 * cell, 3)
    refs = make_builtin("edit", split="validation", n=2, seed=0, image_size=32, max_objects=2)
    for k, sample in enumerate(refs.samples):
        def tile(j: int, k: int = k) -> np.ndarray:
            return sheet[head + k * cell: head + k * cell + 96, j * cell: j * cell + 96]

        want = np.asarray(sample["segments"][2]["image"].convert("RGB").resize((96, 96), Image.NEAREST))
        source = np.asarray(sample["segments"][0]["image"].convert("RGB").resize((96, 96), Image.NEAREST))
        assert np.array_equal(tile(0), source)
        assert np.array_equal(tile(3), want)
        assert np.abs(tile(1).astype(int) - want).max() <= 1  # x̂₀ at σ = 0: the reference (rounding apart)
        assert not np.array_equal(tile(2), want)  # at σ = 1 an untrained model cannot know it


def test_loss_split_at_sigma_zero_is_exact_and_finds_the_edited_tokens(tmp_path):
    """At σ = 0, x̂₀ is the reference: no error on any token, and x̂₀'s distance from the source on the changed
    tokens is the reference's. Every sample edits something, so changed tokens exist; most are kept. At σ = 1 an
    untrained model errs on both kinds."""
    d = _tiny_model(tmp_path)
    out = _script(BENCH / "edit_loss_split.py").main([str(tmp_path / "model"), "--tokenizer", str(d["tokenizer"]),
                                                       "--n", "4", "--sigmas", "0", "1"])
    for kind in ("story", "edit"):
        exact, noise = out[kind][0.0], out[kind][1.0]
        assert 0 < exact["changed_tokens"] < exact["kept_tokens"], kind
        assert exact["err_changed"] < 1e-10 and exact["err_kept"] < 1e-10, kind
        assert exact["x0_from_source"] == pytest.approx(exact["reference_from_source"], rel=1e-5), kind
        assert exact["reference_from_source"] > 0.01, kind
        assert noise["err_changed"] > 0.01 and noise["err_kept"] > 0.01, kind
