"""ECTF in one pass vs naive complete teacher forcing (one forward per generation target).

For a sample with R generation targets, ECTF trains every target in ONE forward + backward over the packed
sequence (each noisy copy sees the clean past). Naive complete teacher forcing runs R forward + backward
passes, pass r holding the clean prefix up to image r plus image r's noisy copy - quadratic in R.
Tiny random model, CPU, `sdpa_dense` attention. Prints a table and, last, the naive/ECTF ratio at the largest R.

    python benchmarks/ectf_scaling.py [--targets 1 2 4 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts, train_tokenizer
from mogao.data.shapes_mini import COLOURS, SHAPES, caption_corpus, draw_shape
from mogao.model.mogao import ModelConfig, MogaoModel
from mogao.model.tiny import save_tiny_llm, save_tiny_vit
from mogao.training.objectives import combine_losses


def story(r: int) -> list[dict]:
    """Caption + r (instruction, generated image) turns."""
    colours = list(COLOURS)
    segs: list[dict] = [{"text": f"Draw a red {SHAPES[0]}."}]
    for i in range(r):
        c = colours[i % len(colours)]
        if i:
            segs.append({"text": f"Now make it {c}."})
        segs.append({"image": draw_shape(SHAPES[i % 3], c, (32, 32)), "generate": True})
    return segs


def naive_passes(r: int) -> list[list[dict]]:
    """Pass k: the story up to image k, earlier images as clean conditions, only image k generated."""
    segs = story(r)
    image_pos = [i for i, s in enumerate(segs) if "image" in s]
    out = []
    for pos in image_pos:
        prefix = [dict(s, generate=False) if "image" in s else s for s in segs[:pos]]
        out.append(prefix + [segs[pos]])
    return out


def step_time(model: MogaoModel, batches: list, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        for b in batches:
            model.zero_grad(set_to_none=True)
            combine_losses(model(b).terms).loss.backward()
        if i:  # first round is warm-up
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tok = train_tokenizer(caption_corpus(), vocab_size=300)
        llm = save_tiny_llm(Path(d) / "llm", vocab_size=len(tok), hidden_size=args.hidden, layers=args.layers,
                            heads=4, kv_heads=2)
        vit = save_tiny_vit(Path(d) / "vit", patch_size=4)
        model = MogaoModel.from_parts(ModelConfig(llm=str(llm), vit=str(vit), autoencoder="pixel", latent_patch=4))
    cfg = DataConfig(token_budget=100_000, max_image_tokens=64, vit_patch=4, vae_patch=4,
                     p_drop_text=0.0, p_drop_images=0.0)

    def batch_of(segs: list[dict], sid: str):
        sample = samples_from_dicts([{"id": sid, "segments": segs}])[0]
        return collate_plans([lower_sample(sample, tok, cfg)], cfg.token_budget)

    print(f"# machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; model hidden {args.hidden}, {args.layers} layers; 8x8 tokens per image copy")
    print(f"{'targets':>7} {'ECTF tokens':>11} {'naive tokens':>12} {'ECTF s':>8} {'naive s':>8} {'naive/ECTF':>10}")
    ratio = float("nan")
    for r in args.targets:
        ectf = [batch_of(story(r), f"ectf{r}")]
        naive = [batch_of(p, f"naive{r}-{k}") for k, p in enumerate(naive_passes(r))]
        t_e, t_n = step_time(model, ectf, args.repeats), step_time(model, naive, args.repeats)
        ratio = t_n / t_e
        print(f"{r:>7} {ectf[0].num_tokens:>11} {sum(b.num_tokens for b in naive):>12} {t_e:>8.3f} {t_n:>8.3f} "
              f"{ratio:>10.2f}")
    print(f"naive/ECTF training-step time ratio at {args.targets[-1]} targets: {ratio:.2f}")


if __name__ == "__main__":
    main()
