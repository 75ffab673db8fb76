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
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict[str, dict[float, dict[str, float]]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="saved model directory (pixel autoencoder, 32-pixel images)")
    ap.add_argument("--tokenizer", type=Path, default=Path("runs/tiny/components/tokenizer"))
    ap.add_argument("--n", type=int, default=64, help="samples of each kind")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 0.95, 1.0])
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts
    from mogao.data.builtin import make_builtin
    from mogao.diffusion.flow import add_noise
    from mogao.model.io import load_model
    from mogao.model.mogao import NoisyState

    model = load_model(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    size = 32
    data = DataConfig(token_budget=1 << 20, max_image_tokens=(size // model.vae_patch) ** 2,
                      vit_patch=model.vit_patch, vae_patch=model.vae_patch, p_drop_text=0.0, p_drop_images=0.0)
    out: dict[str, dict[float, dict[str, float]]] = {}
    for kind, opts in (("story", {"max_objects": 2, "max_images": 2}), ("edit", {"max_objects": 2})):
        src = make_builtin(kind, split="validation", n=args.n, seed=args.seed, image_size=size, **opts)
        batch = collate_plans([lower_sample(s, tok, data) for s in samples_from_dicts(src.samples)],
                              data.token_budget)
        x0 = model.image_tokens(batch.vae_pixels)
        targets = batch.image_is_target.nonzero().flatten().tolist()
        per = x0[targets[0]].shape[0]
        clean = torch.cat([x0[i] for i in targets])
        # each sample's last image is the edited one; the image just before it (a target in a story, a
        # condition in an edit) is its source
        pairs = [(targets[k] - 1, k) for k in range(len(targets))
                 if kind == "edit" or k % 2 == 1]
        out[kind] = {}
        for sigma in args.sigmas:
            gen = torch.Generator().manual_seed(1)
            noisy = add_noise(clean, torch.randn(clean.shape, generator=gen), sigma)
            with torch.no_grad():
                v = model(batch, noisy=NoisyState(torch.full((len(targets),), sigma), noisy)).velocity
            x0_hat = noisy - sigma * v
            changed, kept, from_source, source_ref = [], [], [], []
            for s, k in pairs:
                pred, ref, source = x0_hat[k * per:(k + 1) * per], x0[targets[k]], x0[s]
                diff = ((ref - source) ** 2).mean(-1) > 1e-3
                err = ((pred - ref) ** 2).mean(-1)
                changed += err[diff].tolist()
                kept += err[~diff].tolist()
                from_source += ((pred - source) ** 2).mean(-1)[diff].tolist()
                source_ref += ((ref - source) ** 2).mean(-1)[diff].tolist()

            def mean(xs: list[float]) -> float:
                return sum(xs) / max(1, len(xs))

            row = {"changed_tokens": len(changed), "kept_tokens": len(kept), "err_changed": mean(changed),
                   "err_kept": mean(kept), "share_changed": sum(changed) / max(1e-12, sum(changed) + sum(kept)),
                   "x0_from_source": mean(from_source), "reference_from_source": mean(source_ref)}
            out[kind][sigma] = row
            print(f"{kind:5s} σ={sigma:<4g} tokens changed {row['changed_tokens']} / kept {row['kept_tokens']} | "
                  f"x̂₀ error changed {row['err_changed']:.4f} kept {row['err_kept']:.4f} "
                  f"(changed share {row['share_changed']:.2f}) | changed: x̂₀ from source "
                  f"{row['x0_from_source']:.4f}, reference from source {row['reference_from_source']:.4f}")
    return out


if __name__ == "__main__":
    main()
