"""Export speed of `mogao eval --export` (images/s), batched vs one image at a time, and the computed figure for
a 7B model on one H100.

    .venv/bin/python benchmarks/export_speed.py                             # CPU: the tiny recipe's model
    .venv/bin/python benchmarks/export_speed.py --ckpt MODEL --device cuda  # any saved model
    .venv/bin/python benchmarks/export_speed.py --computed                  # only the computed 7B figures

`measure` exports a GenEval-format input (`geneval_rows`: prompts in the benchmark's own format, made up here)
through `mogao.eval.export.export_benchmark` - what `mogao eval --export` runs - once per batch size, after
an untimed one-image warm-up, and reads the images/s each run recorded in its manifest; it also gives the
largest pixel difference of every run's images from the first run's (the same seeds: batch composition only).
`benchmarks/gpu_check.py` (part "export") runs it on a random 0.5B-preset model in bf16.

`computed_7b` is arithmetic, not a measurement: the FLOPs of one exported image of a Qwen2.5-7B MoT model
(FLUX-class VAE, latent patch 2: 16 pixels a token) - every Euler step runs the noisy block through the
generation expert once per guidance branch, then the finished image is committed (ViT + clean VAE copies) to
the three cache rows - divided by an assumed sustained bf16 throughput on one H100.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

OBJECTS = ("bench", "cat", "dog", "car", "umbrella", "cup", "bicycle", "apple", "clock", "vase")
COLOURS = ("red", "blue", "green", "yellow", "purple", "black")


def geneval_rows(n: int) -> list[dict[str, Any]]:
    """`n` prompts in GenEval's evaluation_metadata.jsonl format (tags cycling through its task kinds)."""
    rows = []
    for i in range(n):
        a, b, c = OBJECTS[i % 10], OBJECTS[(i + 3) % 10], COLOURS[i % 6]
        rows.append([
            {"tag": "single_object", "include": [{"class": a, "count": 1}], "prompt": f"a photo of a {a}"},
            {"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
             "prompt": f"a photo of a {a} and a {b}"},
            {"tag": "counting", "include": [{"class": a, "count": 3}], "exclude": [{"class": a, "count": 4}],
             "prompt": f"a photo of three {a}s"},
            {"tag": "colors", "include": [{"class": a, "count": 1, "color": c}], "prompt": f"a photo of a {c} {a}"},
        ][i % 4])
    return rows


def measure(model: Any, tokenizer: Any, root: Path, *, prompts: int = 8, samples: int = 4, steps: int = 30,
            resolution: int | None = None, batch_sizes: tuple[int, ...] = (1, 8), cfg: float = 7.5,
            run_info: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """One row per batch size, as each is done: images, wall_s, images_per_s, max_diff (0-255) from the first
    batch size's images, complete."""
    from PIL import Image

    from mogao.eval.export import ExportOptions, export_benchmark

    src = root / "evaluation_metadata.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in geneval_rows(prompts)))

    def opts(out: Path, batch: int, limit: int | None = None) -> ExportOptions:
        return ExportOptions("geneval", str(src), str(out), samples=samples, steps=steps, resolution=resolution,
                             cfg=cfg, batch_size=batch, limit=limit)

    export_benchmark(model, tokenizer, opts(root / "warm-up", 1, limit=1), model_name="m")  # (first calls)
    first = None
    for batch in batch_sizes:
        out = root / f"batch{batch}"
        result = export_benchmark(model, tokenizer, opts(out, batch), model_name="m", run_info=run_info)
        images = {p.relative_to(out): np.asarray(Image.open(p), np.int16) for p in sorted(out.rglob("*.png"))}
        first = first or images
        diff = max(int(np.abs(images[k] - first[k]).max()) for k in first)
        yield {"batch": batch, "images": result.made, "wall_s": result.wall_s,
               "images_per_s": result.images_per_s, "max_diff": diff, "complete": result.complete}


def computed_7b(resolution: int = 512, steps: int = 30, branches: int = 2, prompt_tokens: int = 32,
                sustained_tflops: float = 0.40 * 989.0) -> dict[str, float]:
    """FLOPs of one exported image of a Qwen2.5-7B MoT model and the images/s they allow (see the docstring).
    branches: 2 for text-to-image (full, none), 3 for an edit. sustained_tflops: 40% of the H100 SXM's dense
    bf16 peak (989 TFLOP/s), the project's training MFU target."""
    from mogao.model.known import KNOWN_LLMS

    c = KNOWN_LLMS["Qwen/Qwen2.5-7B-Instruct"]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = h * c["num_key_value_heads"] // c["num_attention_heads"]
    expert = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # weights one token passes through (one expert)
    n = (resolution // 16) ** 2  # tokens of the image
    prefix = prompt_tokens + (2 * n if branches == 3 else 0)  # an edit's context holds the condition's 2 copies
    ctx = prefix + 2 * n  # what the commit attends to, at most (the context, the image's ViT and VAE copies)
    step = branches * (2 * expert * n + 4 * layers * h * n * (prefix + n))
    commit = 3 * (2 * expert * 2 * n + 4 * layers * h * 2 * n * ctx)
    flops = steps * step + commit
    seconds = flops / (sustained_tflops * 1e12)
    return {"resolution": resolution, "image_tokens": n, "steps": steps, "branches": branches,
            "expert_params": expert, "tflop_per_image": flops / 1e12, "s_per_image": seconds,
            "images_per_s": 1 / seconds, "sustained_tflops": sustained_tflops}


def computed_lines() -> list[str]:
    out = ["COMPUTED (arithmetic, not measured): Qwen2.5-7B MoT on one H100, bf16, at an assumed sustained "
           f"{computed_7b()['sustained_tflops']:.0f} TFLOP/s (40% of 989)", "",
           "| resolution | image tokens | steps | branches | TFLOP/image | s/image | images/s |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for res, steps, branches in ((512, 30, 2), (512, 50, 2), (1024, 30, 2), (512, 30, 3)):
        r = computed_7b(res, steps, branches)
        out.append(f"| {res} | {r['image_tokens']} | {steps} | {branches} | {r['tflop_per_image']:.0f} | "
                   f"{r['s_per_image']:.2f} | {r['images_per_s']:.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="saved model (default: the tiny recipe's untrained model)")
    ap.add_argument("--recipe", default="tiny/t2i")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--computed", action="store_true", help="print only the computed 7B figures")
    args = ap.parse_args()
    if not args.computed:
        import torch

        from mogao.eval.models import load_checkpoint, untrained_model

        torch.set_num_threads(args.threads)
        model, tok = load_checkpoint(args.ckpt) if args.ckpt else untrained_model(args.recipe)
        model = model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
        params = sum(p.numel() for p in model.parameters())
        root = Path(tempfile.mkdtemp(prefix="export_speed_"))
        try:
            rows = list(measure(model, tok, root, prompts=args.prompts, samples=args.samples, steps=args.steps,
                                resolution=args.resolution, batch_sizes=tuple(args.batch_sizes)))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"### Export speed: {args.ckpt or 'untrained ' + args.recipe} ({params / 1e6:.1f}M parameters), "
              f"{args.device} {args.dtype}, {args.threads} thread(s), {platform.machine()}; GenEval layout, "
              f"{args.prompts} prompts x {args.samples} samples, {args.steps} steps\n")
        print("| batch | images | wall s | images/s | max pixel diff vs first |\n|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['batch']} | {r['images']} | {r['wall_s']:.2f} | {r['images_per_s']:.2f} | {r['max_diff']} |")
        print()
    print("\n".join(computed_lines()))


if __name__ == "__main__":
    main()
