"""Peak memory of one training step: full fine-tuning vs LoRA vs QLoRA, same model and same batch.

    python benchmarks/lora_memory.py [--hidden 1024 --layers 8 --tokens 512]
    python benchmarks/lora_memory.py --preset 1.5b --tokens 2048     # CUDA: the Qwen2.5-1.5B architecture

Each mode runs in its own child process (a fresh allocator), which builds a Mogao model with a Qwen2-style
backbone of the given size, sets up the mode and takes two optimizer steps (AdamW; QLoRA: 4-bit NF4 base and
bitsandbytes' PagedAdamW8bit). Measured: on CUDA `torch.cuda.max_memory_allocated`; on CPU the child's peak
resident set size (`ru_maxrss`), which includes the Python runtime and libraries (the "idle" row: the same
process after building the model, before any step). QLoRA needs CUDA and is marked so on CPU. Prints a markdown
table naming the machine. `measure` yields the same rows for `benchmarks/gpu_check.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

MODES = ("idle", "full", "lora", "qlora")


def _build(hidden: int, layers: int, tmp: Path, preset: str | None = None, device: str | None = None):
    """The model (a Qwen2-style backbone of `hidden` x `layers`, or a `train_throughput` preset's architecture),
    created on `device` (None: the host) and the tokenizer."""
    import torch

    from mogao.data import train_tokenizer
    from mogao.data.shapes_mini import caption_corpus
    from mogao.model.config import ModelConfig, architecture_record
    from mogao.model.io import load_model

    tok = train_tokenizer(caption_corpus(), vocab_size=300)
    if preset:
        from train_throughput import llm_config

        llm = llm_config(preset)
    else:
        llm = {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
               "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
               "num_key_value_heads": max(1, hidden // 256), "tie_word_embeddings": True,
               "max_position_embeddings": 4096}
    vit = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "patch_size": 8, "image_size": 64}
    torch.manual_seed(0)
    with torch.device(device) if device else contextlib.nullcontext():
        model = load_model(architecture_record(ModelConfig(llm="-", vit="-", latent_patch=8), llm, vit, None))
    return model, tok


def _batch(tok, tokens: int):
    from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts
    from mogao.data.builtin import make_builtin

    cfg = DataConfig(token_budget=tokens, max_image_tokens=64, vit_patch=8, vae_patch=8, p_drop_text=0.0,
                     p_drop_images=0.0)
    plans, used = [], 0
    for s in samples_from_dicts(make_builtin("t2i", n=32, image_size=64, max_objects=2).samples):
        p = lower_sample(s, tok, cfg)
        if used + p.num_tokens > tokens:
            break
        plans.append(p)
        used += p.num_tokens
    return collate_plans(plans, tokens)


def child(mode: str, hidden: int, layers: int, tokens: int, preset: str | None = None) -> dict:
    import torch

    from mogao.lora import LoraSpec, apply_lora

    cuda = torch.cuda.is_available()
    # QLoRA quantizes as the model moves to the GPU, so its base is built on the host (the path users take);
    # the other modes are built on the GPU directly (fast init), which does not change the measured peak.
    model, tok = _build(hidden, layers, Path("."), preset, "cuda" if cuda and mode != "qlora" else None)
    total = sum(p.numel() for p in model.parameters())
    batch = _batch(tok, tokens)
    spec = LoraSpec(und=["attn", "mlp"], gen=["attn", "mlp"], rank=16, quantize="nf4" if mode == "qlora" else "none")
    if mode in ("lora", "qlora"):
        apply_lora(model, spec)
    if cuda:
        model, batch = model.cuda(), batch.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode == "qlora":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(trainable, lr=1e-4)
    else:
        opt = torch.optim.AdamW(trainable, lr=1e-4)
    steps = []
    if mode != "idle":
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                t = model.train()(batch).terms
            (t.text_sum / t.text_weight.clamp(min=1) + t.image_sum / t.image_weight.clamp(min=1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "peak_bytes": peak, "params": total, "trainable": sum(p.numel() for p in trainable),
            "tokens": batch.num_tokens, "step_s": sum(steps) / 2 if steps else 0.0,
            "second_step_s": steps[-1] if steps else None, "cuda": cuda}


def measure(modes: tuple[str, ...] = MODES, hidden: int = 1024, layers: int = 8, tokens: int = 1024,
            preset: str | None = None, isolate: bool = True) -> Iterator[dict]:
    """One row per mode, yielded as measured: the child's figures, {"mode", "needs": "CUDA"} for QLoRA without
    a GPU, or {"mode", "error"} when the child failed. isolate=False runs the modes in this process (one
    allocator for all: a smoke run, not a measurement)."""
    import torch

    for mode in modes:
        if mode == "qlora" and not torch.cuda.is_available():
            yield {"mode": mode, "needs": "CUDA"}
            continue
        if not isolate:
            try:
                yield child(mode, hidden, layers, tokens, preset)
            except Exception as e:
                yield {"mode": mode, "error": f"{type(e).__name__}: {e}"}
            continue
        cmd = [sys.executable, __file__, "--child", mode, "--hidden", str(hidden), "--layers", str(layers),
               "--tokens", str(tokens)] + (["--preset", preset] if preset else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        if out.returncode != 0:
            yield {"mode": mode, "error": out.stderr[-3000:]}
            continue
        yield json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} (CPU)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--preset", choices=("0.5b", "1.5b"), default=None,
                    help="a known architecture instead of --hidden/--layers (both experts, random weights)")
    ap.add_argument("--child", choices=MODES)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.hidden, args.layers, args.tokens, args.preset)))
        return
    import torch

    rows = []
    for r in measure(MODES, args.hidden, args.layers, args.tokens, args.preset):
        if "error" in r:
            raise SystemExit(f"{r['mode']} failed:\n{r['error']}")
        rows.append((r["mode"], None if "needs" in r else r))
    what = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS of the child process"
    print(f"Machine: {machine()}. Measure: {what}.")
    first = next(r for _, r in rows if r)
    size = f"preset {args.preset}" if args.preset else f"Qwen2-style hidden {args.hidden}, {args.layers} layers"
    print(f"Model: {size}, both experts: {first['params'] / 1e6:.0f}M "
          f"parameters; batch {first['tokens']} tokens; LoRA rank 16 on attention + MLP of both experts.\n")
    print("| mode | trainable params | peak memory | s/step |")
    print("|---|---:|---:|---:|")
    for mode, r in rows:
        if r is None:
            print(f"| {mode} | - | needs CUDA | - |")
            continue
        step = "-" if mode == "idle" else f"{r['step_s']:.2f}"
        print(f"| {mode} | {r['trainable'] / 1e6:.1f}M | {r['peak_bytes'] / 2**30:.2f} GiB | {step} |")


if __name__ == "__main__":
    main()
