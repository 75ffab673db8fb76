"""How fast a model learns to copy a condition image, and what training on edits does to that.

Trains a saved model (default: the demo's t2i stage) in phases on built-in data and, after each phase, judges
48 validation edits (image + instruction -> image, drawn through `mogao.inference.edit_image` with 20 Euler
steps and CFG 2) with the edit judge: changed (the instructed change is there), kept (everything else is as
before), correct (both); and asks it to copy 32 validation scenes ("Keep it."): the share parsed as exactly
the scene, and the pixel MSE.

Phases: `copy` ("Keep it.": the target is the condition image, scenes of the train split), `edit` (the built-in
edit task), or a mixture such as `copy+edit` (half of each pack's samples from each), with a step count each:

    python benchmarks/edit_vs_copy.py --phases copy:300,edit:300
    python benchmarks/edit_vs_copy.py --init runs/demo/2-t2i/model --phases edit:600
    python benchmarks/edit_vs_copy.py --init runs/demo/3-interleaved/model --phases edit:0   # judge only

`--max-objects 1` draws training and validation edits of one centred object (recolour, reshape, resize).
Images are 32 pixels a side, one token per latent patch (8x8 tokens at patch 4, 4x4 at patch 8).

One AdamW run over all phases (warm-up 10 steps, cosine to 10 %), packs of `--budget` tokens, no condition
dropout. The model on disk is not changed.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE_SIZE = 32  # pixels a side of every image drawn, trained on and generated


def copy_samples(n: int, seed: int) -> list[dict]:
    """`n` "Keep it." samples: a train-split scene as the condition and, unchanged, as the target."""
    from mogao.data.builtin import make_builtin

    src = make_builtin("caption", split="train", n=n, seed=seed, image_size=IMAGE_SIZE, max_objects=2)
    return [{"id": f"copy{i}", "segments": [{"image": s["segments"][0]["image"]}, {"text": "Keep it.", "loss": False},
                                          {"image": s["segments"][0]["image"], "generate": True}]}
            for i, s in enumerate(src.samples)]


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="runs/demo/2-t2i/model", help="saved model to start from")
    ap.add_argument("--phases", default="copy:300,edit:300", help="kind:steps,... (kinds: copy, edit, copy+edit)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--budget", type=int, default=1536, help="tokens per pack")
    ap.add_argument("--val-n", type=int, default=48, help="validation edits judged after each phase")
    ap.add_argument("--train-n", type=int, default=2000,
                    help="training copies (and twice as many training edits) to draw from (default 2000)")
    ap.add_argument("--ops", default="", help="train only on edits of these kinds, e.g. recolour,reshape "
                    "(default: all six); the validation edits stay all kinds")
    ap.add_argument("--max-objects", type=int, default=2, help="most objects in a training or validation edit scene")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts
    from mogao.data.builtin import make_builtin
    from mogao.data.builtin.shapes import Scene
    from mogao.eval.edit_judge import judge_edit
    from mogao.eval.shapes_judge import parse_image
    from mogao.inference import GenerationConfig, Guidance
    from mogao.inference.tasks import edit_image
    from mogao.model.io import load_model
    from mogao.training.objectives import combine_losses

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    phases = []
    for part in args.phases.split(","):
        kind, _, steps = part.partition(":")
        if not steps.isdigit() or not set(kind.split("+")) <= {"copy", "edit"}:
            ap.error(f"bad phase {part!r}: want kind:steps with kind copy, edit or copy+edit")
        phases.append((kind.split("+"), int(steps)))
    tok = AutoTokenizer.from_pretrained(args.init)
    model = load_model(args.init)
    grid = IMAGE_SIZE // model.vae_patch  # one token a patch
    data = DataConfig(token_budget=1 << 20, max_image_tokens=grid * grid, vit_patch=model.vit_patch,
                      vae_patch=model.vae_patch, p_drop_text=0.0, p_drop_images=0.0,
                      drop_unread_vae=not model.cfg.text_sees_vae)
    edits = make_builtin("edit", n=2 * args.train_n, seed=0, image_size=IMAGE_SIZE, max_objects=args.max_objects)
    ops = set(filter(None, args.ops.split(",")))
    pools = {"copy": copy_samples(args.train_n, 0),
             "edit": [s for s, m in zip(edits.samples, edits.meta) if not ops or m["op"]["op"] in ops]}
    if not pools["edit"]:
        ap.error(f"no edit of kinds {sorted(ops)}; kinds: recolour, reshape, resize, move, remove, add")
    plans = {k: [lower_sample(s, tok, data) for s in samples_from_dicts(v)] for k, v in pools.items()}
    val = make_builtin("edit", split="validation", n=args.val_n, seed=3, image_size=IMAGE_SIZE,
                       max_objects=args.max_objects)
    before = [s["segments"][0]["image"] for s in val.samples]
    instructions = [seg["text"] for s in val.samples for seg in s["segments"] if "text" in seg]

    scenes = make_builtin("caption", split="validation", n=32, seed=5, image_size=IMAGE_SIZE, max_objects=2)
    to_copy = [s["segments"][0]["image"] for s in scenes.samples]

    def judge() -> str:
        model.eval()
        config, guidance = GenerationConfig(steps=20, seed=0, image_size=IMAGE_SIZE), Guidance(text_scale=2.0, image_scale=2.0)
        after = edit_image(model, tok, before, instructions, config=config, guidance=guidance)
        copied = edit_image(model, tok, to_copy, ["Keep it."] * len(to_copy), config=config, guidance=guidance)
        model.train()
        verdicts = [judge_edit(parse_image(a), parse_image(b), m["op"]) for a, b, m in zip(before, after, val.meta)]
        shares = " / ".join(f"{np.mean([getattr(v, k) for v in verdicts]):.3f}" for k in ("changed", "kept", "correct"))
        exact = np.mean([parse_image(c).matches(Scene.from_dict(m["scenes"][0]))
                         for c, m in zip(copied, scenes.meta)])
        mse = np.mean([np.mean((np.asarray(c, np.float32) - np.asarray(i.convert("RGB"), np.float32)) ** 2) / 255**2
                       for c, i in zip(copied, to_copy)])
        return (f"validation edits changed / kept / correct = {shares}; 32 validation scenes copied exactly "
                f"{exact:.3f} (pixel MSE {mse:.4f})")

    total = sum(n for _, n in phases)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / max(total, 1)))))
    rng = random.Random(0)
    lines = [f"{args.init}, before training: {judge()}"]
    print(lines[-1], flush=True)
    model.train()
    step, t0, last = 0, time.perf_counter(), float("nan")
    for kinds, n in phases:
        for _ in range(n):
            pick, used = [], 0
            while True:
                pool = plans[kinds[rng.randrange(len(kinds))]]
                plan = pool[rng.randrange(len(pool))]
                if used + plan.num_tokens > args.budget:
                    break
                pick.append(plan)
                used += plan.num_tokens
            batch = collate_plans(pick, args.budget)
            batch.image_seed = batch.image_seed + step * 1000003  # a new noise draw every step
            out = combine_losses(model(batch).terms)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            sched.step()
            step += 1
            last = float(out.image_loss)
        lines.append(f"after {'+'.join(kinds)} x {n} (step {step}, {time.perf_counter() - t0:.0f} s, last flow loss "
                     f"{last:.4f}): {judge()}")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
