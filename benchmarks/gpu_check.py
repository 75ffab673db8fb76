"""Every GPU figure of the project from one prepared command, sized for a short loan of one CUDA GPU (<= 9 min).

    python benchmarks/gpu_check.py --out runs/gpu_check              # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check    # CPU, toy sizes, < 1 min: the same code
    python benchmarks/gpu_check.py --wheels                          # what to pip-download for a bare machine

Parts, most valuable first, each with its own time budget (seconds):
  tests       the GPU tests (every test file with `pytest.mark.gpu`), pass/fail per test          72
  attention   flash_varlen vs flex vs sdpa_dense vs plain causal FA2: fwd+bwd time, peak memory,
              error vs an fp32 dense reference; bf16 packs of 8k/16k/32k tokens, 1-8 targets      95
  train       training throughput and MFU, 0.5b and 1.5b presets, bf16, 8k tokens, act. ckpt
              off/on (FLOPs of mogao.training.flops, peak of callbacks.Throughput)                 55
  ectf        ECTF one pass vs naive teacher forcing at 1/2/4/8 targets                           30
  generation  cached vs recomputed image step at 256/1024/4096 context, batched 3-branch CFG vs
              sequential, text tokens/s                                                           33
  lora        QLoRA vs LoRA vs full fine-tuning on the 0.5b preset: peak memory, step time        65
  bagel       each recipes/bagel-7b recipe that runs on one GPU, trained 3 steps through `mogao fit`'s
              code on BAGEL-7B-MoT with random weights made on the GPU: peak memory vs the computed
              figure (benchmarks/bagel_memory.py), step time, QLoRA on a 24 GB card            100
  export      `mogao eval --export geneval` on the 0.5b preset, bf16, 256 px: images/s at batch 1 and
              8, batched vs one-at-a-time pixel difference                                        33
  fsdp2       with 2+ GPUs: the 2-rank FSDP2 equivalence run (tests/dist_child.py) on NCCL        50

Each part runs in its own process (a crash, an OOM or a hang costs that part only; it is killed at its budget)
and writes `parts/<part>.json` after every row; the report (`gpu_check.json`, `gpu_check.md`: device, torch /
CUDA / flash_attn versions, date, command, then one table per part) is rewritten as rows arrive. A part that
fails is recorded with its error and the next one starts. `--dry-run` runs the same parts in one process on
the CPU at toy sizes; parts that need CUDA keep their full table skeleton, marked "needs CUDA".

Only the standard library is imported up front; each part imports what it needs when it starts, and a part
whose packages are missing is reported as such (see `--wheels`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from gpu_check_parts import (
    Recorder,
    fsdp_child,
    gpu_test_files,
    part_attention,
    part_bagel,
    part_ectf,
    part_export,
    part_fsdp2,
    part_generation,
    part_lora,
    part_tests,
    part_train,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TOTAL_BUDGET_S = 540

# ------------------------------------------------------------------------------------------- parts and sizes


@dataclass(frozen=True)
class Col:
    key: str
    header: str
    fmt: str = "{}"
    scale: float = 1.0


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    budget_s: float
    cols: tuple[Col, ...]
    keys: tuple[str, ...]  # the columns that name a row (skeleton rows have only these)
    requires: tuple[str, ...]  # import names
    gpu_only: bool = False
    gpus: int = 1


_MS = dict(fmt="{:.2f}", scale=1e3)
BASE = ("torch", "numpy", "transformers", "tokenizers", "safetensors", "diffusers", "PIL")
PARTS = (
    Part("tests", "GPU tests (pytest -m gpu)", 72,
         (Col("test", "test"), Col("outcome", "outcome"), Col("seconds", "s", "{:.1f}"), Col("message", "message")),
         ("test",), ("pytest", "hypothesis", *BASE, "peft", "bitsandbytes", "lightning")),
    Part("attention", "ECTF attention backends, bf16, same tokens", 95,
         (Col("tokens", "tokens"), Col("backend", "backend"), Col("samples", "samples"),
          Col("fwd_bwd_s", "fwd+bwd ms", **_MS), Col("peak_mib", "peak MiB", "{:.0f}"),
          Col("first_call_s", "first call s", "{:.2f}"), Col("err_out", "err out", "{:.2e}"),
          Col("err_dq", "err dq", "{:.2e}"), Col("err_dk", "err dk", "{:.2e}"), Col("err_dv", "err dv", "{:.2e}"),
          Col("ratio", "ratio (<=1 ok)", "{:.2f}")),
         ("tokens", "backend"), ("torch",)),
    Part("train", "Training throughput and MFU", 55,
         (Col("preset", "preset"), Col("ckpt", "act. ckpt"), Col("attention", "attention"), Col("params", "params (M)", "{:.1f}", 1e-6),
          Col("tokens_per_step", "tokens/step", "{:.0f}"), Col("step_s", "step ms", **_MS),
          Col("tokens_per_s", "tokens/s", "{:.0f}"), Col("tflops", "TFLOP/s", "{:.1f}"),
          Col("mfu", "MFU (Lightning peak)", "{:.1%}"), Col("mfu_dense", "MFU (dense bf16 peak)", "{:.1%}"),
          Col("peak_gib", "peak GiB", "{:.1f}")),
         ("preset", "ckpt"), (*BASE, "lightning")),
    Part("ectf", "ECTF one pass vs naive teacher forcing (training step)", 30,
         (Col("targets", "targets"), Col("attention", "attention"), Col("ectf_tokens", "ECTF tokens"), Col("naive_tokens", "naive tokens"),
          Col("ectf_s", "ECTF ms", **_MS), Col("naive_s", "naive ms", **_MS),
          Col("naive_over_ectf", "naive/ECTF", "{:.2f}")),
         ("targets",), BASE),
    Part("generation", "Generation: KV cache vs recompute, batched vs sequential CFG", 33,
         (Col("measurement", "measurement"), Col("fast", "cached / batched"), Col("slow", "recompute / sequential"),
          Col("speedup", "speed-up", "{:.2f}x")),
         ("measurement",), BASE),
    Part("lora", "QLoRA vs LoRA vs full fine-tuning (bf16 autocast)", 65,
         (Col("mode", "mode"), Col("params", "params (M)", "{:.0f}", 1e-6),
          Col("trainable", "trainable (M)", "{:.1f}", 1e-6), Col("tokens", "tokens"),
          Col("peak_gib", "peak GiB", "{:.2f}"), Col("second_step_s", "step ms", **_MS)),
         ("mode",), (*BASE, "peft", "bitsandbytes")),
    Part("bagel", "BAGEL-7B-MoT recipes on one GPU: measured peak memory (random weights, real size)", 105,
         (Col("recipe", "recipe"), Col("trainable", "trainable (M)", "{:.2f}", 1e-6),
          Col("tokens", "tokens (largest step)", "{:.0f}"),
          Col("peak_gib", "peak GiB (allocated)", "{:.2f}"), Col("reserved_gib", "peak GiB (reserved)", "{:.2f}"),
          Col("computed_gib", "computed GiB (budget)", "{:.1f}"), Col("ratio", "measured / computed (same tokens)", "{:.2f}"),
          Col("step_s", "step s", "{:.2f}"), Col("fits_24gb", "fits 24 GB")),
         ("recipe",), (*BASE, "lightning", "jsonargparse", "peft", "bitsandbytes")),
    Part("export", "Benchmark export (mogao eval --export geneval)", 33,
         (Col("batch", "batch"), Col("images", "images"), Col("wall_s", "s", "{:.2f}"),
          Col("images_per_s", "images/s", "{:.2f}"), Col("max_diff", "max pixel diff vs batch 1"),
          Col("complete", "complete")),
         ("batch",), BASE),
    Part("fsdp2", "FSDP2 on NCCL, 2 ranks vs 1 process (same global batches)", 50,
         (Col("step", "step"), Col("single", "1 process loss", "{:.6f}"), Col("sharded", "2-rank loss", "{:.6f}"),
          Col("diff", "abs diff", "{:.1e}"), Col("within", "within 1e-5")),
         ("step",), (*BASE, "lightning", "peft"), gpu_only=True, gpus=2),
)
PART = {p.name: p for p in PARTS}

SIZES = {  # GPU sizes, then the dry run's toy sizes
    "attention": ({"tokens": [8192, 16384, 32768], "repeats": 3, "image_tokens": 256, "vit_tokens": 256,
                   "text_tokens": 32, "max_targets": 8},
                  {"tokens": [128], "repeats": 1, "image_tokens": 8, "vit_tokens": 8, "text_tokens": 4,
                   "max_targets": 3}),
    "train": ({"presets": ["0.5b", "1.5b"], "tokens": 8192, "steps": 8, "warmup": 3, "attention": "flash_varlen"},
              {"presets": ["tiny"], "tokens": 256, "steps": 1, "warmup": 0, "attention": "sdpa_dense"}),
    "ectf": ({"targets": [1, 2, 4, 8], "repeats": 3, "hidden": 1024, "layers": 8, "image_px": 64},
             {"targets": [1, 2], "repeats": 1, "hidden": 64, "layers": 2, "image_px": 16}),
    "generation": ({"contexts": [256, 1024, 4096], "repeat": 10, "n_new": 32, "hidden": 1024, "layers": 8},
                   {"contexts": [16, 32], "repeat": 1, "n_new": 2, "hidden": 64, "layers": 2}),
    "lora": ({"preset": "0.5b", "hidden": 0, "layers": 0, "tokens": 2048, "modes": ["qlora", "lora", "full"]},
             {"preset": None, "hidden": 64, "layers": 2, "tokens": 512, "modes": ["qlora", "lora", "full"]}),
    "bagel": ({"arch": "7b", "steps": 3, "one_process": True, "dtype": "bfloat16", "args": []},
              {"arch": "tiny", "steps": 2, "one_process": True, "dtype": "float32",
               "args": ["--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.data.max_image_tokens=16",
                        "--data.data.max_grid=4", "--data.data.token_budget=256"]}),
    "export": ({"preset": "0.5b", "resolution": 256, "steps": 30, "prompts": 4, "samples": 4, "batch_sizes": [1, 8]},
               {"preset": "tiny", "resolution": 32, "steps": 2, "prompts": 2, "samples": 2, "batch_sizes": [1, 3]}),
    "fsdp2": ({"steps": 4}, {"steps": 4}),
    "tests": ({}, {}),
}


def sizes(part: str, dry: bool) -> dict:
    return SIZES[part][1 if dry else 0]


def skeleton(part: str, dry: bool) -> list[dict]:
    """The rows a part will fill, named by its key columns."""
    s = sizes(part, dry)
    if part == "attention":
        return ([{"tokens": t, "backend": b} for t in s["tokens"] for b in ("sdpa_dense", "flash_varlen", "causal FA2")]
                + [{"tokens": t, "backend": "flex"} for t in s["tokens"]])
    if part == "train":
        return [{"preset": p, "ckpt": c} for p in s["presets"] for c in ("off", "on")]
    if part == "ectf":
        return [{"targets": r} for r in s["targets"]]
    if part == "generation":
        return ([{"measurement": f"image step, {c}-token context, 256-token image"} for c in s["contexts"]]
                + [{"measurement": "3-branch CFG step (batched vs sequential)"},
                   {"measurement": f"text decoding, {s['contexts'][0]}-token context (tokens/s)"}])
    if part == "lora":
        return [{"mode": m} for m in s["modes"]]
    if part == "fsdp2":
        return [{"step": k} for k in range(1, s["steps"] + 1)]
    if part == "export":
        return [{"batch": b} for b in s["batch_sizes"]]
    if part == "bagel":
        return [{"recipe": r} for r in sorted(p.stem for p in BAGEL_RECIPES.glob("*.yaml"))]
    return [{"test": "(the tests marked gpu in " + ", ".join(gpu_test_files()) + ")"}]


# ------------------------------------------------------------------------------------------- estimates

ASSUME = {
    "startup_s": 15.0,  # a part's process: python + torch + mogao imports on the GPU machine
    "bf16_tflops": 400.0,  # sustained bf16 matmul throughput in training steps (~40% of an H100/H200 dense peak)
    "attn_tflops": 150.0,  # FA2-class attention kernels, forward + backward
    "fp32_tflops": 30.0,  # fp32 without TF32 (reference attention, generation model)
    "compile_s": 25.0,  # one torch.compile of flex_attention (forward + backward) per padded length
    "host_init_gb_s": 1.0,  # random init of fp32 weights on the host (QLoRA builds there)
    "per_test_s": 1.0,  # one GPU test, tiny tensors
    "gpu_fill_gb_s": 200.0,  # random weights drawn on the GPU
    "bagel_recipe_s": 15.0,  # a BAGEL recipe besides its steps: BAGEL-7B-MoT built on the meta device, adapters
    # (NF4: quantized), synthetic data lowered, CLI and FSDP2 set up, first-step warm-up, freed afterwards
}
BAGEL_RECIPES = ROOT / "recipes" / "bagel-7b"


def bagel_runs() -> list[dict]:
    """The bagel-7b recipes the bagel part trains on one GPU, one per setting (recipes whose YAML differs only in
    comments and the run folder share a run), with what the estimate needs; read from the YAML text (this
    script imports only the standard library up front)."""
    runs: dict[str, dict] = {}
    for path in sorted(BAGEL_RECIPES.glob("*.yaml")):
        text = path.read_text()
        lines = [ln.split("#", 1)[0].rstrip() for ln in text.splitlines()]
        key = "\n".join(ln for ln in lines if ln.strip() and not ln.strip().startswith("default_root_dir:"))
        devices = int(re.search(r"^\s*devices:\s*(\d+)", text, re.M).group(1))
        if devices == 1 and key not in runs:
            runs[key] = {"recipe": path.stem, "tokens": int(re.search(r"token_budget:\s*(\d+)", text).group(1)),
                         "nf4": re.search(r"quantize:\s*nf4", text) is not None}
    return list(runs.values())


def _qwen_params(preset: str) -> tuple[float, float]:
    """(parameters of both experts, parameters a token passes through) of a preset, from its config."""
    from_cfg = {"0.5b": (896, 4864, 24, 14, 2, 151936), "1.5b": (1536, 8960, 28, 12, 2, 151936),
                "7b": (3584, 18944, 28, 28, 4, 152064)}  # (Qwen2.5-7B: BAGEL-7B-MoT's experts)
    h, inter, layers, heads, kv, vocab = from_cfg.get(preset, (64, 128, 2, 4, 2, 512))
    per_layer = 2 * h * h + 2 * h * (h * kv // heads) + 3 * h * inter
    return 2 * layers * per_layer + vocab * h, layers * per_layer + vocab * h


def estimate(part: str) -> tuple[float, str]:
    """Seconds this part should take on the GPU at its GPU sizes, and how that was reckoned."""
    s, a = sizes(part, False), ASSUME
    if part == "tests":
        n = 45
        return a["startup_s"] + 10 + n * a["per_test_s"], f"~{n} tests x {a['per_test_s']:.0f} s + collection"
    if part == "attention":
        total = 0.0
        for t in s["tokens"]:
            pair_flops = 4 * 12 * 128 * 3.5  # fwd 4*H*D per (q, k) pair; bwd ~2.5x the forward
            per_sample = 6.4e3 if t >= 8192 else t  # the longest sample (8 targets) bounds the causal pairs
            pairs = t * per_sample / 2
            call = pairs * pair_flops / (a["attn_tflops"] * 1e12)
            ref = 2 * pairs * pair_flops / (a["fp32_tflops"] * 1e12)
            total += 4 * (s["repeats"] + 1) * call + ref + a["compile_s"]
        return a["startup_s"] + total, ("4 backends x (repeats + 1) calls at assumed attention TFLOP/s, fp32 "
                                        "reference, one flex compile per length")
    if part == "train":
        total = 0.0
        for p in s["presets"]:
            params, active = _qwen_params(p)
            for ckpt in (False, True):
                flops = 6 * active * s["tokens"] * (4 / 3 if ckpt else 1)
                total += 8 + (s["steps"] + s["warmup"]) * flops / (a["bf16_tflops"] * 1e12)
        return a["startup_s"] + total, "6 x active params x tokens per step (+1/3 with ckpt), 8 s build per cell"
    if part == "ectf":
        active = s["layers"] * 12 * s["hidden"] ** 2
        tokens = sum(r * 3 * (s["image_px"] // 4) ** 2 * (1 + r) for r in s["targets"])
        flops = 6 * active * tokens * (s["repeats"] + 1)
        return a["startup_s"] + 5 + flops / (a["bf16_tflops"] * 1e12) + 2 * len(s["targets"]), \
            "6 x params x tokens (ECTF + naive), 2 s launch overhead per row"
    if part == "generation":
        active = s["layers"] * 12 * s["hidden"] ** 2
        fwd = sum(2 * active * (c + 256) for c in s["contexts"]) * (s["repeat"] + 2)
        return a["startup_s"] + 5 + fwd / (a["fp32_tflops"] * 1e12) + 0.004 * s["n_new"] * 2 * 40, \
            "recompute forwards at fp32 TFLOP/s; decoding at ~4 ms per forward"
    if part == "lora":
        params, active = _qwen_params(s["preset"])
        step = 6 * active * s["tokens"] / (a["bf16_tflops"] * 1e12)
        host = params * 4 / 1e9 / a["host_init_gb_s"]
        return 3 * (a["startup_s"] + 5 + 2 * step) + host, \
            f"3 processes; QLoRA's base built on the host at {a['host_init_gb_s']:.0f} GB/s"
    if part == "bagel":
        params, active = _qwen_params("7b")
        runs = bagel_runs()
        processes = 1 if s["one_process"] else len(runs)
        total = (1 + processes) * a["startup_s"]  # the part's own process (it writes the folder), the measuring one(s)
        for r in runs:  # frozen base: forward, recomputed forward and input gradients, ~6 x params x tokens
            total += a["bagel_recipe_s"] + params * 2 / 1e9 / a["gpu_fill_gb_s"]
            total += s["steps"] * 6 * active * r["tokens"] / (a["bf16_tflops"] * 1e12)
        return total, (f"{len(runs)} runs ({', '.join(r['recipe'] for r in runs)}) in {processes} process(es): "
                       f"{a['bagel_recipe_s']:.0f} s each + weights drawn at {a['gpu_fill_gb_s']:.0f} GB/s + "
                       f"{s['steps']} steps of 6 x active params x tokens")
    if part == "fsdp2":
        return 2 * a["startup_s"] + 20, "tiny model, 4 steps, 1 + 2 processes; only with 2+ GPUs"
    if part == "export":
        params, active = _qwen_params(s["preset"])
        images = s["prompts"] * s["samples"]
        tokens = (s["resolution"] // 8) ** 2  # (the pixel autoencoder, latent patch 8)
        flops = len(s["batch_sizes"]) * (images + 1) * s["steps"] * 2 * 2 * active * tokens
        forwards = sum(-(-images // b) for b in s["batch_sizes"]) * (s["steps"] + 2) + s["steps"]
        return a["startup_s"] + 8 + flops / (a["bf16_tflops"] * 1e12) + 0.004 * forwards, \
            "2 branches x steps x 2 x active params x image tokens per image; ~4 ms per forward; 8 s build"
    raise KeyError(part)


def estimate_lines() -> list[str]:
    rows = [(p.name, p.budget_s, *estimate(p.name)) for p in PARTS]
    total = sum(e for _, _, e, _ in rows)
    out = ["GPU time ESTIMATE per part (computed from each part's GPU sizes, not measured). Assumed: "
           + ", ".join(f"{k}={v:g}" for k, v in ASSUME.items()) + ".", "",
           "| part | budget s | estimate s | reckoned as |", "|---|---:|---:|---|"]
    out += [f"| {n} | {b:.0f} | {e:.0f} | {how} |" for n, b, e, how in rows]
    out.append(f"| total | {sum(p.budget_s for p in PARTS):.0f} | {total:.0f} | budget cap {TOTAL_BUDGET_S} s |")
    return out


# ------------------------------------------------------------------------------------------- packages

WHEELS = {  # import name -> distribution (the top-level packages the parts import; pip resolves the rest)
    "pytest": "pytest", "hypothesis": "hypothesis", "numpy": "numpy", "transformers": "transformers",
    "tokenizers": "tokenizers", "safetensors": "safetensors", "diffusers": "diffusers", "PIL": "pillow",
    "peft": "peft", "bitsandbytes": "bitsandbytes", "lightning": "lightning", "torch": "torch",
    "jsonargparse": "jsonargparse",
}
PLATFORM_WHEELS = {"numpy", "tokenizers", "safetensors", "pillow", "bitsandbytes"}  # built per platform/Python
TORCH_OWN = ("torch", "nvidia-[a-z0-9-]*", "triton", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock",
             "fsspec", "typing-extensions", "typing_extensions", "setuptools")  # come with the torch install


def missing(part: Part) -> list[str]:
    return [m for m in part.requires if importlib.util.find_spec(m) is None]


def wheels_text() -> str:
    top = sorted({WHEELS[m] for p in PARTS for m in p.requires if m != "torch"})
    pure = [d for d in top if d not in PLATFORM_WHEELS]
    return "\n".join([
        "The parts import (besides torch):",
        "  pure Python: " + " ".join(pure + ["accelerate", "torchmetrics", "huggingface_hub"]),
        "  platform wheels (manylinux, the GPU machine's Python): " + " ".join(sorted(PLATFORM_WHEELS))
        + " pyyaml regex psutil",
        "and their dependencies. To bring those and the rest of pyproject.toml's dependencies (omegaconf, "
        "jsonargparse, ... for the recipes), on a networked machine with the GPU machine's Python:",
        "  python -m venv /tmp/w && /tmp/w/bin/pip install 'torch==2.11.*' --index-url "
        "https://download.pytorch.org/whl/cpu",
        "  /tmp/w/bin/pip install -e '.[dev]'",
        "  /tmp/w/bin/pip freeze --exclude-editable | grep -viE '^(" + "|".join(TORCH_OWN) + ")==' > wheels.txt",
        "  /tmp/w/bin/pip download --no-deps -r wheels.txt -d wheels/",
        "then on the GPU machine (torch 2.11 already there; the project itself needs no install):",
        "  pip install --no-index --no-deps wheels/*.whl",
        "flash-attn is optional (it must match the machine's torch and CUDA): without it flash_varlen runs "
        "torch's bundled FA2 kernels.",
    ])


RUNNERS = {"tests": part_tests, "attention": part_attention, "train": part_train, "ectf": part_ectf,
           "generation": part_generation, "lora": part_lora, "bagel": part_bagel, "export": part_export,
           "fsdp2": part_fsdp2}


def run_part(name: str, out: Path, dry: bool, budget: float, fail: bool = False, on_write=None) -> None:
    """Run one part here, recording into out/parts/<name>.json; an exception is recorded, not raised."""
    sys.path[:0] = [str(BENCH), str(ROOT)]
    # the project needs no install: its processes (pytest, the LoRA modes, FSDP2 ranks) find it on the path
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")])
    rec = Recorder(out / "parts" / f"{name}.json", time.monotonic() + budget, on_write=on_write)
    rec.write(started=True)
    try:
        if fail:
            raise RuntimeError("failure injected by --inject-failure")
        if dry:  # toy sizes: one thread is faster than two fighting over a small shared machine
            import torch

            torch.set_num_threads(1)
        if "transformers" in PART[name].requires and name != "tests":
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        RUNNERS[name](rec, sizes(name, dry), dry, out)
        rec.write(done=True)
    except BaseException as e:
        rec.write(error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-3000:])
        if isinstance(e, KeyboardInterrupt):
            raise


# ------------------------------------------------------------------------------------------- the report


def environment(argv: list[str], dry: bool) -> dict:
    import torch

    try:
        from importlib.metadata import version

        fa = version("flash-attn")
    except Exception:
        fa = "not installed"
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
            "gpus": torch.cuda.device_count() if cuda else 0, "torch": torch.__version__,
            "cuda": torch.version.cuda if cuda else None, "flash_attn": fa, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", _shown(Path(__file__)), *argv]), "dry_run": dry}


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _cell(col: Col, value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return col.fmt.format(value * col.scale) if col.scale != 1 else col.fmt.format(value)
    return str(value).replace("|", "/").replace("\n", " ")


def _matches(row: dict, planned: dict) -> bool:
    return all(str(row.get(k, "")).startswith(str(v)) for k, v in planned.items())


def part_result(p: Part, out: Path, dry: bool, status: str | None, elapsed: float | None) -> dict:
    """A part's entry in the report: its rows so far (the skeleton where none came), status, notes, error."""
    path = out / "parts" / f"{p.name}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    rows = list(data.get("rows", []))
    plan = skeleton(p.name, dry)
    if status is None:  # it ran: decide from what it wrote
        if data.get("error"):
            status = "failed: " + data["error"].splitlines()[0][:200]
        elif not data.get("done"):
            status = "running" if elapsed is None else "stopped (no result written)"
        else:
            bad = sum(not str(r.get("status", "ok")).startswith(("ok", "needs", "same settings")) for r in rows)
            status = "ok" if not bad else f"{bad} of {len(rows)} rows not ok"
        fill = "not reached" if rows or data.get("done") or elapsed is not None else "pending"
    else:
        fill = status
    if p.name != "tests" or not rows:
        rows += [dict(q, status=fill) for q in plan if not any(_matches(r, q) for r in rows)]
    return {"name": p.name, "title": p.title, "status": status, "budget_s": p.budget_s,
            "elapsed_s": elapsed, "estimate_s": round(estimate(p.name)[0]), "notes": data.get("notes", []),
            "error": data.get("error"), "trace": data.get("trace"), "rows": rows,
            "columns": [c.key for c in p.cols]}


def write_report(out: Path, env: dict, results: dict[str, dict]) -> None:
    report = {"environment": env, "estimate": estimate_lines(), "parts": list(results.values())}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out / "gpu_check.json")
    md = [f"### GPU check: {env['device']}", "",
          f"torch {env['torch']}, CUDA {env['cuda'] or '-'}, flash_attn {env['flash_attn']}, Python "
          f"{env['python']}; {env['gpus']} GPU(s); {env['date']}" + (" — DRY RUN (CPU, toy sizes: the numbers "
                                                                       "are not measurements)" if env["dry_run"] else ""),
          f"`{env['command']}`", "", "| part | status | s | budget s | estimate s |", "|---|---|---:|---:|---:|"]
    for r in results.values():
        took = "-" if r["elapsed_s"] is None else f"{r['elapsed_s']:.0f}"
        md.append(f"| {r['name']} | {_cell(Col('', ''), r['status'])} | {took} | {r['budget_s']:.0f} | "
                  f"{r['estimate_s']} |")
    for r in results.values():
        p = PART[r["name"]]
        md += ["", f"#### {p.name}: {p.title} — {r['status']}", ""]
        md += [f"- {n}" for n in r["notes"]] + ([""] if r["notes"] else [])
        md.append("| " + " | ".join(c.header for c in p.cols) + " | status |")
        md.append("|" + "---|" * (len(p.cols) + 1))
        for row in r["rows"]:
            md.append("| " + " | ".join(_cell(c, row.get(c.key)) for c in p.cols) + " | "
                      + _cell(Col("", ""), row.get("status", "")) + " |")
    if env["dry_run"]:  # the dry run's rows are toy sizes; these are the rows the GPU run will fill
        md += ["", "#### The rows each table holds on the GPU (GPU sizes)", ""]
        for r in results.values():
            rows = skeleton(r["name"], dry=False)
            keys = " · ".join(" ".join(str(v) for v in q.values()) for q in rows)
            md.append(f"- {r['name']} ({len(rows)} rows; {', '.join(PART[r['name']].keys)}): {keys}")
    (out / "gpu_check.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="folder for the report")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, parts in this process")
    ap.add_argument("--parts", nargs="+", choices=list(PART), default=list(PART), help="parts to run, in order")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="one process per part (auto: yes on CUDA, no in a dry run)")
    ap.add_argument("--budget", nargs="+", default=[], metavar="PART=SECONDS", help="override parts' budgets")
    ap.add_argument("--inject-failure", nargs="+", default=[], metavar="PART",
                    help="make these parts fail at their start (tests the report's failure path)")
    ap.add_argument("--wheels", action="store_true", help="print what to bring to a bare torch machine and exit")
    ap.add_argument("--run-part", help=argparse.SUPPRESS)
    ap.add_argument("--part-budget", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--fsdp-child", help=argparse.SUPPRESS)
    ap.add_argument("--accelerator", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.wheels:
        print(wheels_text())
        return 0
    if args.fsdp_child:
        fsdp_child(args.fsdp_child, args.accelerator)
        return 0
    if args.run_part:
        run_part(args.run_part, args.out, args.dry_run, args.part_budget, args.run_part in args.inject_failure)
        return 0
    budgets = {p.name: p.budget_s for p in PARTS}
    budgets.update({k: float(v) for k, v in (b.split("=", 1) for b in args.budget)})
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    for stale in (args.out / "parts").glob("*.json"):
        stale.unlink()
    print("\n".join(estimate_lines()) + "\n", flush=True)
    env = environment(argv, args.dry_run)
    cuda, gpus = env["gpus"] > 0, env["gpus"]
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.dry_run)
    selected = [PART[n] for n in args.parts]
    results = {p.name: part_result(p, args.out, args.dry_run, "pending", None) for p in selected}
    write_report(args.out, env, results)
    for p in selected:
        status = None
        if p.gpu_only and not cuda:
            status = "needs CUDA"
        elif cuda and gpus < p.gpus:
            status = f"not run ({gpus} GPU)"
        elif need := missing(p):
            status = "missing packages: pip install " + " ".join(WHEELS.get(m, m) for m in need)
        if status:
            results[p.name] = part_result(p, args.out, args.dry_run, status, None)
            write_report(args.out, env, results)
            print(f"[{p.name}] {status}", flush=True)
            continue
        print(f"[{p.name}] running (budget {budgets[p.name]:.0f} s) ...", flush=True)
        t0 = time.monotonic()

        def refresh(p=p, t0=t0) -> None:
            results[p.name] = part_result(p, args.out, args.dry_run, None, None)
            write_report(args.out, env, results)

        if isolate:
            # the part stops itself at its budget less a grace; the kill at the full budget is the backstop,
            # so the parts together never take longer than their budgets add up to
            grace = min(10.0, 0.2 * budgets[p.name])
            cmd = [sys.executable, __file__, "--run-part", p.name, "--out", str(args.out), "--part-budget",
                   str(budgets[p.name] - grace), *(["--dry-run"] if args.dry_run else []),
                   *(["--inject-failure", *args.inject_failure] if args.inject_failure else [])]
            log = open(args.out / "parts" / f"{p.name}.log", "w")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            while proc.poll() is None and time.monotonic() - t0 < budgets[p.name]:
                time.sleep(min(2.0, grace))
                refresh()
            if proc.poll() is None:  # past its budget (and the grace): the whole process group goes
                os.killpg(proc.pid, 9)
                proc.wait()
                status = f"timed out at {budgets[p.name]:.0f} s (rows so far kept)"
            elif proc.returncode != 0:
                tail = (args.out / "parts" / f"{p.name}.log").read_text()[-300:].strip().splitlines()
                status = f"crashed (exit {proc.returncode}): {tail[-1] if tail else ''}"
        else:
            run_part(p.name, args.out, args.dry_run, budgets[p.name], p.name in args.inject_failure, refresh)
        results[p.name] = part_result(p, args.out, args.dry_run, None, time.monotonic() - t0)
        if status:
            results[p.name]["status"] = status
        write_report(args.out, env, results)
        print(f"[{p.name}] {results[p.name]['status']} ({time.monotonic() - t0:.0f} s)", flush=True)
    print((args.out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
