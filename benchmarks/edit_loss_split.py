"""Where an edit's image loss sits: the x̂₀ error of a trained model on the image tokens an edit changes and on
the ones it keeps, and whether its guess for the changed tokens is nearer the source or the reference.

    python benchmarks/edit_loss_split.py runs/demo/3-interleaved/model [--n 64] [--sigmas 0.5 0.95 1]

For validation two-image stories (caption, image, instruction, image) and edits (image, instruction, image) of
the built-in shapes world, every target is noised to the same σ; a token of the edited image is "changed" where
it differs from the same token of the image before it. Printed for each σ: the mean squared error of x̂₀ on
changed and kept tokens, the changed tokens' share of the error, and the mean distance of x̂₀ from the *source*
on the changed tokens next to the source-reference distance. A model that follows the instruction has x̂₀ far
from the source there (near the reference-source distance); one that copies has it near 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (position_probe, also when loaded by path)
from position_probe import x0_estimates  # noqa: E402

NOISE_SEED = 1


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def main(argv: list[str] | None = None) -> dict[str, dict[float, dict[str, float]]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="saved model directory (pixel autoencoder, 32-pixel images)")
    ap.add_argument("--tokenizer", type=Path, default=Path("runs/tiny/components/tokenizer"))
    ap.add_argument("--n", type=int, default=64, help="samples of each kind")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.95, 1.0])
    ap.add_argument("--seed", type=int, default=3, help="seed of the validation samples")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from mogao.data import DataConfig
    from mogao.data.builtin import make_builtin
    from mogao.model.io import load_model

    model = load_model(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    size = 32
    data = DataConfig(token_budget=1 << 20, max_image_tokens=(size // model.vae_patch) ** 2, p_drop_text=0.0,
                      p_drop_images=0.0).for_model(model)
    out: dict[str, dict[float, dict[str, float]]] = {}
    for kind, opts in (("story", {"max_objects": 2, "max_images": 2}), ("edit", {"max_objects": 2})):
        dicts = make_builtin(kind, split="validation", n=args.n, seed=args.seed, image_size=size, **opts).samples
        if kind == "edit":  # the source is a condition image: its clean tokens, drawn as a target of its own
            _, sources = x0_estimates(model, tok, data, [{"segments": [{"image": s["segments"][0]["image"],
                                                                        "generate": True}]} for s in dicts],
                                      NOISE_SEED, 1.0)
        out[kind] = {}
        for sigma in args.sigmas:
            est, clean = x0_estimates(model, tok, data, dicts, NOISE_SEED, sigma)
            if kind == "story":  # two targets a story: the first image is the second's source
                sources, est, clean = clean[0::2], est[1::2], clean[1::2]
            changed, kept, from_source, source_ref = [], [], [], []
            for pred, ref, source in zip(est, clean, sources):
                diff = ((ref - source) ** 2).mean(-1) > 1e-3
                err = ((pred - ref) ** 2).mean(-1)
                changed += err[diff].tolist()
                kept += err[~diff].tolist()
                from_source += ((pred - source) ** 2).mean(-1)[diff].tolist()
                source_ref += ((ref - source) ** 2).mean(-1)[diff].tolist()
            row = {"changed_tokens": len(changed), "kept_tokens": len(kept), "err_changed": _mean(changed),
                   "err_kept": _mean(kept), "share_changed": sum(changed) / max(1e-12, sum(changed) + sum(kept)),
                   "x0_from_source": _mean(from_source), "reference_from_source": _mean(source_ref)}
            out[kind][sigma] = row
            print(f"{kind:5s} σ={sigma:<4g} tokens changed {row['changed_tokens']} / kept {row['kept_tokens']} | "
                  f"x̂₀ error changed {row['err_changed']:.4f} kept {row['err_kept']:.4f} "
                  f"(changed share {row['share_changed']:.2f}) | changed: x̂₀ from source "
                  f"{row['x0_from_source']:.4f}, reference from source {row['reference_from_source']:.4f}")
    return out


if __name__ == "__main__":
    main()
