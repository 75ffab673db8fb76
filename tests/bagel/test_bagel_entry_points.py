"""A BAGEL folder through mogao's entry points, as a user takes it: settings read from the weight headers,
`mogao generate --ckpt BAGEL_DIR`, a LoRA fit with `init_from: BAGEL_DIR`, and `mogao export bagel` (with the
adapter merged) that reads back into the same model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_bagel import tiny_settings, write_tiny_bagel

from mogao.bagel.folder import infer_settings, is_bagel_folder
from mogao.bagel.load import load_any_model, load_bagel_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    return write_tiny_bagel(tmp_path_factory.mktemp("bagel-cli") / "BAGEL-tiny")


def test_the_settings_are_read_from_the_weight_headers(tiny, tmp_path):
    assert infer_settings(tiny.path) == tiny_settings(tiny)
    assert is_bagel_folder(tiny.path) and not is_bagel_folder(tmp_path)
    a = load_any_model(tiny.path)  # no settings given: those of the headers
    b, _ = load_bagel_model(tiny.path, settings=tiny_settings(tiny))
    assert a.cfg == b.cfg
    for (k, v), (k2, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k


def test_generate_from_a_bagel_folder(tiny, tmp_path):
    from mogao.cli import main

    out = tmp_path / "gen"
    # (the tiny folder's latent position table is 4 x 4 tokens: 16 px at 2 x 2 patches of a /2 autoencoder)
    assert main(["generate", "--ckpt", str(tiny.path), "--prompt", "A red circle.", "--draw", "--steps", "2",
                 "--image-size", "16", "--out", str(out)]) == 0
    assert list(out.glob("*.png")) and (out / "conversation.html").is_file()


def test_lora_fit_from_a_bagel_folder_then_export_with_the_adapter_merged(tiny, tmp_path):
    """`mogao fit --config lora/tiny-interleaved` with init_from and tokenizer the BAGEL folder, 2 steps on a
    user's JSONL; `mogao export bagel --lora` writes a BAGEL folder that loads back as the merged model."""
    run = tmp_path / "run"
    data = ROOT / "tests" / "data" / "lora" / "interleaved.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mogao.cli", "fit", "--config", "lora/tiny-interleaved",
                           "--trainer.max_steps=2", "--trainer.val_check_interval=1000",
                           f"--trainer.default_root_dir={run}", f"--model.init_args.init_from={tiny.path}",
                           f"--model.init_args.tokenizer={tiny.path}", f"--data.path={data}",
                           "--model.init_args.exact_match_samples=0", "--data.data.max_image_tokens=16"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()

    from mogao.cli import main

    out = tmp_path / "exported"
    assert main(["export", "bagel", str(tiny.path), "--lora", str(adapter), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"llm_config.json", "vit_config.json", "ema.safetensors",
                                                "ae.safetensors", "tokenizer.json"}
    from mogao.lora import load_adapter
    from mogao.lora.adapter import merge_lora

    want = merge_lora(load_adapter(load_any_model(tiny.path), adapter)).state_dict()
    got = load_any_model(out).state_dict()
    assert got.keys() == want.keys()
    changed = 0
    for k, v in want.items():
        torch.testing.assert_close(got[k].float(), v.float(), rtol=0, atol=1e-2, msg=k)  # (bf16 files)
        changed += not torch.equal(got[k], load_any_model(tiny.path).state_dict()[k]) if "q_proj.weight" in k else 0
    assert changed  # the adapter's change is in the exported weights
    assert main(["export", "bagel", str(tiny.path), "--out", str(out)]) == 2  # not empty: refused


def test_export_without_changes_gives_the_same_files(tiny, tmp_path):
    from mogao.cli import main

    out = tmp_path / "same"
    assert main(["export", "bagel", str(tiny.path), "--out", str(out)]) == 0
    for name in ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (tiny.path / name).read_bytes(), name
