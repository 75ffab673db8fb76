"""A small end-to-end run of the model core on CPU: tiny random parts, built-in shapes samples packed into a
token budget, a few dozen optimizer steps on text CE + flow loss. Writes a loss-curve PNG and a summary JSON.

    python -m mogao.demo --out runs/demo [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader
from transformers.utils import logging as hf_logging

from mogao.data import DataConfig, PackedDataset, samples_from_dicts, train_tokenizer
from mogao.data.shapes_mini import caption_corpus, interleaved_samples
from mogao.model.mogao import ModelConfig, MogaoModel
from mogao.model.tiny import save_tiny_llm, save_tiny_vit
from mogao.training.objectives import combine_losses


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["step"] for h in history]
    ax[0].plot(steps, [h["text_loss"] for h in history])
    ax[0].set_title("text cross-entropy")
    ax[1].plot(steps, [h["image_loss"] for h in history], color="tab:orange")
    ax[1].set_title("flow-matching MSE")
    for a in ax:
        a.set_xlabel("step")
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--attention", default="sdpa_dense")
    args = ap.parse_args(argv)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    out = args.out
    parts = out / "parts"
    tok = train_tokenizer(caption_corpus(), vocab_size=300)
    tok.save_pretrained(parts / "tokenizer")
    llm = save_tiny_llm(parts / "llm", vocab_size=len(tok), hidden_size=96, layers=3, heads=4, kv_heads=2)
    vit = save_tiny_vit(parts / "vit", patch_size=4)
    model = MogaoModel.from_parts(ModelConfig(llm=str(llm), vit=str(vit), autoencoder="pixel", latent_patch=4,
                                              attention=args.attention))
    data_cfg = DataConfig(token_budget=args.budget, max_image_tokens=16, vit_patch=model.vit_patch,
                          vae_patch=model.vae_patch)
    dataset = PackedDataset(samples_from_dicts(interleaved_samples(args.samples, seed=0, max_targets=3)), tok, data_cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    history: list[dict] = []
    step, epoch, t0 = 0, 0, time.perf_counter()
    columns = (TextColumn("[bold]training"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=args.steps, info="")
        while step < args.steps:
            dataset.set_epoch(epoch)
            for batch in DataLoader(dataset, batch_size=None):
                total = combine_losses(model(batch).terms)
                opt.zero_grad(set_to_none=True)
                total.loss.backward()
                opt.step()
                step += 1
                rec = {"step": step, "text_loss": float(total.text_loss), "image_loss": float(total.image_loss),
                       "tokens": batch.num_tokens, "padding": batch.padding_fraction}
                history.append(rec)
                progress.update(task, advance=1, info=f"CE {rec['text_loss']:.3f}  flow {rec['image_loss']:.3f}")
                if step >= args.steps:
                    break
            epoch += 1
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    _plot(history, out / "losses.png")
    model.save_pretrained(out / "model")
    k = max(1, len(history) // 10)
    summary = {
        "steps": step, "seconds": round(seconds, 1),
        "tokens_per_second": round(sum(h["tokens"] for h in history) / seconds, 1),
        "padding_fraction": round(dataset.stats.padding_fraction, 4),
        "text_loss_first": round(sum(h["text_loss"] for h in history[:k]) / k, 4),
        "text_loss_last": round(sum(h["text_loss"] for h in history[-k:]) / k, 4),
        "image_loss_first": round(sum(h["image_loss"] for h in history[:k]) / k, 4),
        "image_loss_last": round(sum(h["image_loss"] for h in history[-k:]) / k, 4),
    }
    (out / "summary.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"loss curves: {out / 'losses.png'}\nmodel:       {out / 'model'}")
    return summary


if __name__ == "__main__":
    main()
