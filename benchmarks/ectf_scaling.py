"""ECTF in one pass vs naive complete teacher forcing (one forward per generation target).

For a sample with R generation targets, ECTF trains every target in ONE forward + backward over the packed
sequence (each noisy copy sees the clean past). Naive complete teacher forcing runs R forward + backward
passes, pass r holding the clean prefix up to image r plus image r's noisy copy - quadratic in R.
Tiny random model, CPU, `sdpa_dense` attention. Prints a table and, last, the naive/ECTF ratio at the largest R.
`measure` is the same measurement on any device and size (`benchmarks/gpu_check.py` runs it on CUDA: bf16
autocast, `flash_varlen`).

    python benchmarks/ectf_scaling.py [--targets 1 2 4 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts, train_tokenizer
from mogao.data.shapes_mini import COLOURS, SHAPES, caption_corpus, draw_shape
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel
from mogao.model.tiny import save_tiny_llm, save_tiny_vit
from mogao.training.objectives import combine_losses


def story(r: int, image_px: int = 32) -> list[dict]:
    """Caption + r (instruction, generated image) turns."""
    colours = list(COLOURS)
    segs: list[dict] = [{"text": f"Draw a red {SHAPES[0]}."}]
    for i in range(r):
        c = colours[i % len(colours)]
        if i:
            segs.append({"text": f"Now make it {c}."})
        segs.append({"image": draw_shape(SHAPES[i % 3], c, (image_px, image_px)), "generate": True})
    return segs


def naive_passes(r: int, image_px: int = 32) -> list[list[dict]]:
    """Pass k: the story up to image k, earlier images as clean conditions, only image k generated."""
    segs = story(r, image_px)
    image_pos = [i for i, s in enumerate(segs) if "image" in s]
    out = []
    for pos in image_pos:
        prefix = [dict(s, generate=False) if "image" in s else s for s in segs[:pos]]
        out.append(prefix + [segs[pos]])
    return out


def step_time(model: MogaoModel, batches: list, repeats: int, autocast: torch.dtype | None = None) -> float:
    """Median seconds of one round of forward + backward over `batches` (after one warm-up round)."""
    dev = next(model.parameters()).device
    times = []
    for i in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        for b in batches:
            model.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = combine_losses(model(b).terms).loss
            loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:  # first round is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(hidden: int, layers: int, device: torch.device | str = "cpu", attention: str = "sdpa_dense"):
    """A random Mogao model (pixel autoencoder, latent patch 4) on `device` and the tokenizer it reads."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(caption_corpus(), vocab_size=300)
        llm = save_tiny_llm(Path(d) / "llm", vocab_size=len(tok), hidden_size=hidden, layers=layers,
                            heads=max(4, hidden // 128), kv_heads=2)
        vit = save_tiny_vit(Path(d) / "vit", patch_size=4)
        model = load_model(ModelConfig(llm=str(llm), vit=str(vit), autoencoder="pixel", latent_patch=4,
                                       attention=attention))
    return model.to(device), tok


def measure(targets: list[int], repeats: int = 3, hidden: int = 128, layers: int = 4, image_px: int = 32,
            device: torch.device | str = "cpu", attention: str = "sdpa_dense", autocast: torch.dtype | None = None
            ) -> Iterator[dict]:
    """One row per target count R: tokens and training-step seconds of ECTF (one pass) and naive teacher
    forcing (R passes). Rows are yielded as they are measured."""
    model, tok = build(hidden, layers, device, attention)
    dev = next(model.parameters()).device
    cfg = DataConfig(token_budget=1_000_000, max_image_tokens=(image_px // 4) ** 2, vit_patch=4, vae_patch=4,
                     p_drop_text=0.0, p_drop_images=0.0)

    def batch_of(segs: list[dict], sid: str):
        sample = samples_from_dicts([{"id": sid, "segments": segs}])[0]
        return collate_plans([lower_sample(sample, tok, cfg)], cfg.token_budget).to(dev)

    for r in targets:
        ectf = [batch_of(story(r, image_px), f"ectf{r}")]
        naive = [batch_of(p, f"naive{r}-{k}") for k, p in enumerate(naive_passes(r, image_px))]
        t_e, t_n = step_time(model, ectf, repeats, autocast), step_time(model, naive, repeats, autocast)
        yield {"targets": r, "ectf_tokens": ectf[0].num_tokens, "naive_tokens": sum(b.num_tokens for b in naive),
               "ectf_s": t_e, "naive_s": t_n, "naive_over_ectf": t_n / t_e}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model hidden {args.hidden}, {args.layers} layers; 8x8 tokens per image copy")
    print(f"{'targets':>7} {'ECTF tokens':>11} {'naive tokens':>12} {'ECTF s':>8} {'naive s':>8} {'naive/ECTF':>10}")
    ratio = float("nan")
    for row in measure(args.targets, args.repeats, args.hidden, args.layers):
        ratio = row["naive_over_ectf"]
        print(f"{row['targets']:>7} {row['ectf_tokens']:>11} {row['naive_tokens']:>12} {row['ectf_s']:>8.3f} "
              f"{row['naive_s']:>8.3f} {ratio:>10.2f}")
    print(f"naive/ECTF training-step time ratio at {args.targets[-1]} targets: {ratio:.2f}")


if __name__ == "__main__":
    main()
