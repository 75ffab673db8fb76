"""Peak memory of one training step: full fine-tuning vs LoRA vs QLoRA, same model and same batch.

    python benchmarks/lora_memory.py [--hidden 1024 --layers 8 --tokens 512]

Each mode runs in its own child process (a fresh allocator), which builds a Mogao model with a Qwen2-style
backbone of the given size, sets up the mode and takes two optimizer steps (AdamW; QLoRA: 4-bit NF4 base and
bitsandbytes' PagedAdamW8bit). Measured: on CUDA `torch.cuda.max_memory_allocated`; on CPU the child's peak
resident set size (`ru_maxrss`), which includes the Python runtime and libraries (the "idle" row: the same
process after building the model, before any step). QLoRA needs CUDA and is marked so on CPU. Prints a markdown
table naming the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("idle", "full", "lora", "qlora")


def _build(hidden: int, layers: int, tmp: Path):
    import torch

    from mogao.data import train_tokenizer
    from mogao.data.shapes_mini import caption_corpus
    from mogao.model.mogao import ModelConfig, MogaoModel

    tok = train_tokenizer(caption_corpus(), vocab_size=300)
    llm = {"model_type": "qwen2", "vocab_size": 4096, "hidden_size": hidden, "intermediate_size": hidden * 11 // 4,
           "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": max(1, hidden // 256),
           "tie_word_embeddings": True, "max_position_embeddings": 4096}
    vit = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "patch_size": 8, "image_size": 64}
    torch.manual_seed(0)
    model = MogaoModel.from_configs(ModelConfig(llm="-", vit="-", latent_patch=8), llm, vit, None)
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


def child(mode: str, hidden: int, layers: int, tokens: int) -> dict:
    import torch

    from mogao.lora import LoraSpec, apply_lora

    cuda = torch.cuda.is_available()
    model, tok = _build(hidden, layers, Path("."))
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
    t0 = time.perf_counter()
    if mode != "idle":
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                t = model.train()(batch).terms
            (t.text_sum / t.text_weight.clamp(min=1) + t.image_sum / t.image_weight.clamp(min=1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "peak_bytes": peak, "params": total, "trainable": sum(p.numel() for p in trainable),
            "tokens": batch.num_tokens, "step_s": (time.perf_counter() - t0) / 2, "cuda": cuda}


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
    ap.add_argument("--child", choices=MODES)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.hidden, args.layers, args.tokens)))
        return
    import torch

    rows = []
    for mode in MODES:
        if mode == "qlora" and not torch.cuda.is_available():
            rows.append((mode, None))
            continue
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--hidden", str(args.hidden), "--layers",
                              str(args.layers), "--tokens", str(args.tokens)], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
        if out.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows.append((mode, json.loads(out.stdout.strip().splitlines()[-1])))
    what = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS of the child process"
    print(f"Machine: {machine()}. Measure: {what}.")
    first = next(r for _, r in rows if r)
    print(f"Model: Qwen2-style hidden {args.hidden}, {args.layers} layers, both experts: {first['params'] / 1e6:.0f}M "
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
