"""benchmarks/gpu_check.py: the dry run (CPU, toy sizes) writes every part's table, the failure and time-out
paths are recorded without stopping the run, and (on CUDA only) bitsandbytes' 8-bit AdamW steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PARTS = ["tests", "attention", "train", "ectf", "generation", "lora", "bagel", "export", "fsdp2"]


def _run(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU check; on CUDA run the real one")
def test_dry_run_writes_every_part(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ESTIMATE" in proc.stdout and "Assumed:" in proc.stdout and "bf16_tflops=" in proc.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    env = report["environment"]
    assert env["dry_run"] and env["gpus"] == 0 and env["torch"] == torch.__version__
    assert set(env) >= {"device", "cuda", "flash_attn", "date", "command"}
    parts = {p["name"]: p for p in report["parts"]}
    assert [p["name"] for p in report["parts"]] == PARTS
    for name in PARTS[:-1]:  # everything but fsdp2 runs on the CPU at toy sizes
        assert parts[name]["status"] == "ok", (name, parts[name]["status"], parts[name].get("trace"))
        assert parts[name]["rows"] and parts[name]["elapsed_s"] > 0
        assert parts[name]["estimate_s"] > 0 and parts[name]["budget_s"] > 0
    assert sum(p["budget_s"] for p in report["parts"]) <= 540  # the 9-minute cap
    assert parts["fsdp2"]["status"] == "needs CUDA"
    assert [r["step"] for r in parts["fsdp2"]["rows"]] == [1, 2, 3, 4]
    assert all(r["status"] == "needs CUDA" for r in parts["fsdp2"]["rows"])

    tests = parts["tests"]["rows"]  # every GPU test collected and skipped on the CPU, none failed
    assert len(tests) >= 30 and all(r["outcome"] == "skipped" for r in tests)
    assert any("test_attention_gpu.py" in r["test"] for r in tests)
    assert any("test_qlora_on_cuda" in r["test"] for r in tests)
    assert any("test_adamw8bit" in r["test"] for r in tests)
    assert (tmp_path / "gpu_tests.xml").exists()

    backends = [r["backend"] for r in parts["attention"]["rows"]]
    assert [b.split(" ")[0] for b in backends] == ["sdpa_dense", "flash_varlen", "causal", "flex"]
    for r in parts["attention"]["rows"]:
        assert r["status"].startswith("ok") and r["fwd_bwd_s"] > 0
    for r in parts["attention"]["rows"][:2]:  # the ECTF backends with a backward: compared to fp32
        assert {"err_out", "err_dq", "err_dk", "err_dv", "ratio"} <= set(r)
    assert [(r["preset"], r["ckpt"]) for r in parts["train"]["rows"]] == [("tiny", "off"), ("tiny", "on")]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in parts["train"]["rows"])
    assert [r["targets"] for r in parts["ectf"]["rows"]] == [1, 2]
    assert len(parts["generation"]["rows"]) == 4
    assert {r["mode"]: r["status"] for r in parts["lora"]["rows"]} == {"full": "ok", "lora": "ok",
                                                                        "qlora": "needs CUDA"}
    bagel = {r["recipe"]: r for r in parts["bagel"]["rows"]}  # the LoRA recipes trained on the tiny folder
    assert set(bagel) == {p.stem for p in (ROOT / "recipes" / "bagel-7b").glob("*.yaml")}
    assert bagel["lora-edit"]["status"].startswith("ok") and bagel["lora-t2i"]["status"].startswith("ok")
    assert bagel["lora-interleaved"]["status"].startswith("same settings as lora-edit")
    assert all(bagel[n]["status"].startswith("needs CUDA") for n in ("qlora-edit", "qlora-t2i", "qlora-interleaved"))
    assert bagel["full"]["status"].startswith("needs 8 GPUs")
    export = parts["export"]["rows"]  # `mogao eval --export geneval` at batch 1 and 3: every image made
    assert [r["batch"] for r in export] == [1, 3]
    assert all(r["images"] == 4 and r["images_per_s"] > 0 and r["complete"] and r["max_diff"] <= 1 for r in export)

    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and env["device"] in md
    for name in PARTS:
        assert f"#### {name}:" in md
    assert "| 1 | - | - | - | - | needs CUDA |" in md  # fsdp2's skeleton row
    assert "32768 flex" in md and "1.5b on" in md  # the rows the GPU run fills, at GPU sizes
    assert "export (2 rows; batch): 1 · 8" in md


def test_every_part_fits_its_budget_and_the_budgets_the_cap():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bagel_memory
    import gpu_check

    for p in gpu_check.PARTS:
        assert gpu_check.estimate(p.name)[0] <= p.budget_s, p.name
    assert sum(p.budget_s for p in gpu_check.PARTS) <= gpu_check.TOTAL_BUDGET_S <= 540
    # the estimate reads the recipe files without a YAML parser: it must see the runs the part makes
    plan = bagel_memory.measurement_plan(bagel_memory.recipe_names())
    one_gpu = {run for run, _ in plan if bagel_memory.read_recipe(run)["devices"] == 1}
    runs = gpu_check.bagel_runs()
    assert {r["recipe"] for r in runs} == one_gpu and len(runs) == len(one_gpu)
    for r in runs:
        recipe = bagel_memory.read_recipe(r["recipe"])
        assert r["tokens"] == recipe["tokens"] and r["nf4"] == ((recipe["lora"] or {}).get("quantize") == "nf4")


def test_the_bagel_part_trains_a_recipe_through_its_yaml(tmp_path):
    """The bagel part's dry run: lora-edit trained 2 steps on the tiny BAGEL folder through the recipe's own CLI
    config, its twin lora-interleaved not run again, QLoRA waiting for CUDA, full fine-tuning for 8 GPUs."""
    import time

    import yaml

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    import bagel_memory
    import gpu_check
    from gpu_check_parts import Recorder, part_bagel
    from tiny_bagel import write_tiny_bagel

    (tmp_path / "parts").mkdir()
    rec = Recorder(tmp_path / "parts" / "bagel.json", time.monotonic() + 300)
    s = {**gpu_check.sizes("bagel", dry=True), "recipes": ["lora-edit", "lora-interleaved", "qlora-t2i", "full"]}
    part_bagel(rec, s, True, tmp_path)
    rows = {r["recipe"]: r for r in rec.rows}
    assert list(rows) == ["lora-edit", "lora-interleaved", "qlora-t2i", "full"]
    edit = rows["lora-edit"]
    assert edit["status"] == "ok (no GPU: peak not measured)", edit
    # exactly the adapters the YAML asks for, on the tiny model's shapes
    llm = write_tiny_bagel(tmp_path / "tiny").llm
    h, i, d = llm["hidden_size"], llm["intermediate_size"], llm["hidden_size"] // llm["num_attention_heads"]
    kv = llm["num_key_value_heads"] * d
    dims = {"q_proj": h + h, "k_proj": h + kv, "v_proj": h + kv, "o_proj": h + h, "gate_proj": h + i,
            "up_proj": h + i, "down_proj": i + h}
    lora = yaml.safe_load((ROOT / "recipes" / "bagel-7b" / "lora-edit.yaml").read_text())["model"]["init_args"]["lora"]
    assert edit["trainable"] == llm["num_hidden_layers"] * lora["rank"] * sum(dims[m] for m in lora["und"] + lora["gen"])
    assert 0 < edit["tokens"] <= 256 and edit["step_s"] > 0
    assert edit["computed_gib"] == bagel_memory.recipe_memory("lora-edit")["total"] and "peak_gib" not in edit
    assert rows["lora-interleaved"]["status"].startswith("same settings as lora-edit")
    assert rows["qlora-t2i"]["status"].startswith("needs CUDA") and rows["full"]["status"].startswith("needs 8 GPUs")
    assert not list((tmp_path / "parts").glob("bagel_*"))  # its work folder is gone


def test_a_failing_or_slow_part_is_recorded_and_the_rest_go_on(tmp_path):
    proc = _run(tmp_path, "--isolate", "yes", "--parts", "attention", "ectf", "fsdp2", "--budget", "attention=0.5",
                "--inject-failure", "ectf", timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = {p["name"]: p for p in json.loads((tmp_path / "gpu_check.json").read_text())["parts"]}
    assert parts["attention"]["status"].startswith("timed out")
    assert [r["status"] for r in parts["attention"]["rows"]] == ["not reached"] * 4
    assert parts["ectf"]["status"].startswith("failed: RuntimeError: failure injected")
    assert "failure injected" in parts["ectf"]["trace"]
    assert parts["fsdp2"]["status"] == "needs CUDA"
    md = (tmp_path / "gpu_check.md").read_text()
    assert "timed out" in md and "failure injected" in md


def test_wheels_lists_what_a_bare_torch_machine_needs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--wheels"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for dist in ("lightning", "peft", "diffusers", "transformers", "omegaconf", "jsonargparse", "bitsandbytes"):
        assert dist in out.stdout
    assert "pip download --no-deps" in out.stdout and "torch|" in out.stdout  # torch itself is not brought


@pytest.mark.gpu
def test_adamw8bit_steps_on_cuda():
    from mogao.training.optim import AdamW8bit

    p = torch.nn.Parameter(torch.randn(64, 128, device="cuda"))  # >= 4096 elements: 8-bit state
    opt = AdamW8bit([p], lr=1e-2)
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(before, p.detach())
    assert opt.state[p]["state1"].dtype == torch.uint8
