"""What a trained model predicts for edits at each noise level: a grid of x̂₀ (the model's clean-image estimate)
for validation edits of the built-in shapes world, one row per edit: the source image, x̂₀ at each σ, the
reference edit.

    python benchmarks/edit_x0.py runs/demo/3-interleaved/model [--out benchmarks/edit_x0.png] [--sigmas 0.3 0.6 0.9 1]

The sampler starts at σ = 1, where the noisy image carries nothing: what x̂₀ shows there is what the model takes
from the condition image and the instruction alone. A model that copies the source but ignores the instruction
shows the unedited source at σ = 1; one that does not use the condition shows a blur of likely colours. At low σ
the noisy image already holds the reference, so x̂₀ is right there whether or not the model can edit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="saved model directory (pixel autoencoder, 32-pixel images)")
    ap.add_argument("--tokenizer", type=Path, default=Path("runs/tiny/components/tokenizer"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/edit_x0.png"))
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 0.6, 0.9, 1.0])
    ap.add_argument("--n", type=int, default=6, help="edits (rows)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts
    from mogao.data.builtin import make_builtin
    from mogao.diffusion.flow import add_noise
    from mogao.inference import tensor_to_pil
    from mogao.model.io import load_model
    from mogao.model.mogao import NoisyState

    model = load_model(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    size = 32
    src = make_builtin("edit", split="validation", n=args.n, seed=args.seed, image_size=size, max_objects=2)
    data = DataConfig(token_budget=1 << 20, max_image_tokens=(size // model.vae_patch) ** 2, p_drop_text=0.0,
                      p_drop_images=0.0).for_model(model)  # (its patch sizes, position scheme and sequence format)
    batch = collate_plans([lower_sample(s, tok, data) for s in samples_from_dicts(src.samples)], data.token_budget)
    x0 = model.image_tokens(batch.vae_pixels)
    targets = batch.image_is_target.nonzero().flatten().tolist()
    clean = torch.cat([x0[i] for i in targets])
    per = clean.shape[0] // len(targets)
    grid = tuple(int(g) for g in batch.image_grid[targets[0]])
    gen = torch.Generator().manual_seed(args.seed)
    columns = []
    for sigma in args.sigmas:
        noise = torch.randn(clean.shape, generator=gen)
        x_sigma = add_noise(clean, noise, sigma)
        with torch.no_grad():
            v = model(batch, noisy=NoisyState(torch.full((len(targets),), sigma), x_sigma)).velocity
        columns.append(x_sigma - sigma * v)  # x̂₀ = x_σ − σ·v̂ (what the sampler's last step would land on)

    def image(tokens: torch.Tensor) -> Image.Image:
        return tensor_to_pil(model.decode_tokens(tokens, grid))

    scale, pad, head = 3, 4, 14
    cell = size * scale + pad
    sheet = Image.new("RGB", (cell * (len(args.sigmas) + 2), head + cell * len(targets)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, title in enumerate(["source", *[f"x0 at {s:g}" for s in args.sigmas], "reference"]):
        draw.text((j * cell + 2, 1), title, fill="black")
    for k in range(len(targets)):
        row = [src.samples[k]["segments"][0]["image"], *[image(c[k * per:(k + 1) * per]) for c in columns],
               src.samples[k]["segments"][2]["image"]]
        for j, img in enumerate(row):
            sheet.paste(img.convert("RGB").resize((size * scale,) * 2, Image.NEAREST), (j * cell, head + k * cell))
        print(f"row {k + 1}: {src.meta[k]['instruction']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
