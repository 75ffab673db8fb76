"""What `mogao fit` prints: the run's own lines, no third-party noise, a bar counted in optimizer steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOISE = ("Failed to load CPU gemm_4bit_forward", "litlogger", "is deprecated", "Total FLOPs", "Epoch 0/-",
         "in eval mode at the start of training", "Loading weights", "Writing model shards", "Traceback")


def test_fit_prints_what_a_user_needs_and_nothing_else(parts, tmp_path):
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "mogao.cli", "fit", "--config", "tiny/t2i", "--trainer.max_steps=3",
         "--trainer.val_check_interval=1000", f"--trainer.default_root_dir={run}", "--model.init_args.tiny=null",
         f"--model.init_args.tokenizer={parts['tokenizer']}", f"--model.init_args.model.llm={parts['llm']}",
         f"--model.init_args.model.vit={parts['vit']}", "--model.init_args.model.latent_patch=8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert [n for n in NOISE if n in text] == [], text
    assert "[mogao] model:" in text and "trained in this stage" in text
    assert "3/3" in text  # the bar: steps done / max_steps
