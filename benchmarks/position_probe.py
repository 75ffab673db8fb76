"""How a trained model's image edits depend on where in the sequence they sit, and on older images in a story.

    python benchmarks/position_probe.py runs/demo/3-interleaved/model [--offsets 0 15 40] [--n 24] [--json out.json]

No training. For each offset o, every sample starts at position o instead of 0 (`DataConfig.position_offset`,
`GenerationConfig.position_offset`) and the model is measured on:

- x̂₀ MSE at σ = 0.95 on validation edits (the model's clean-image estimate against the target, with the
  condition image in context and with it left out): where the layout of the edited image is decided;
- teacher-forced story edit turns (`mogao eval --suite interleaved`'s edit_changed / edit_kept / edit_correct:
  turn k drawn from the reference images of turns < k; `first_turn_correct`: turn 1 alone), free-running
  stories, one-object edits of the edit task (validation, a centred object: correct share) and VQA exact match.

Under a shift-invariant position scheme ("mrope", "mrope_aligned", "bagel") every figure is the same at every offset (up to
float noise). Under IL-RoPE an image token's (H, W) does not move with o while text does, so a model whose
figures change with o has learnt angles that depend on absolute depth.

`--caption-swap`: the teacher-forced first turns of the same stories drawn twice, with the story's own first
caption and with the caption of another story's first scene (the condition image and the instruction kept): the
share of turns whose image shows the caption's scene, the condition image's scene, or the instructed edit. A model
that draws what the first caption says instead of editing the image it is shown has learnt the text-to-image
reading (caption -> picture) and applies it to the oldest text of a story.

`--text-effect`: how much the first edit turn's x̂₀ at σ = 0.95 moves (mean absolute change) when the story's
instruction is swapped for another story's, and when its first caption is; the same instruction swap in the edit
task's form (image, instruction, target). A model that reads the instruction moves with it; one that draws from
the caption moves with the caption.

`--older`: teacher-forced turns k >= 2 of the same stories drawn twice, with every earlier turn's image in
context and with only turn k-1's image (the older images' instructions kept): whether older images, which share
each cell's code (and, under IL-RoPE, its H/W angle) with the previous one, distract the copy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def x0_estimates(model, tok, data, dicts: list[dict], seed: int, sigma: float
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's x̂₀ at `sigma` and the clean tokens of every generation target of the samples `dicts` (one pack,
    in pack order), the noise drawn from `seed`."""
    from mogao.data import collate_plans, lower_sample, samples_from_dicts
    from mogao.diffusion.flow import add_noise
    from mogao.model.mogao import NoisyState

    batch = collate_plans([lower_sample(s, tok, data) for s in samples_from_dicts(dicts)], data.token_budget)
    x0 = model.image_tokens(batch.vae_pixels)
    targets = batch.image_is_target.nonzero().flatten().tolist()
    clean = torch.cat([x0[i] for i in targets])
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed))
    x_sigma = add_noise(clean, noise, sigma)
    with torch.no_grad():
        v = model(batch, noisy=NoisyState(torch.full((len(targets),), sigma), x_sigma)).velocity
    sizes = [x0[i].shape[0] for i in targets]
    return list((x_sigma - sigma * v).split(sizes)), list(clean.split(sizes))


def x0_mse(model, tok, offset: int, n: int, seed: int, sigma: float = 0.95) -> dict[str, float]:
    """Mean squared error of x̂₀ at `sigma` against the targets of `n` validation edits, with and without the
    condition image, every sample starting at `offset`."""
    from mogao.data import DataConfig
    from mogao.data.builtin import make_builtin

    src = make_builtin("edit", split="validation", n=n, seed=seed, image_size=32, max_objects=2)
    data = DataConfig(token_budget=1 << 20, max_image_tokens=(32 // model.vae_patch) ** 2, p_drop_text=0.0,
                      p_drop_images=0.0, position_offset=offset).for_model(model)
    out = {}
    for name, drop in (("with_condition", False), ("without_condition", True)):
        dicts = [{"segments": s["segments"][1:] if drop else s["segments"]} for s in src.samples]
        est, clean = x0_estimates(model, tok, data, dicts, seed, sigma)
        out[name] = float(((torch.cat(est) - torch.cat(clean)) ** 2).mean())
    return out


def one_object_edits(model, tok, n: int, seed: int, steps: int, cfg: float, offset: int) -> float:
    """Share of `n` validation edits of one centred object (recolour, reshape, resize) judged correct."""
    from mogao.data.builtin import make_builtin
    from mogao.data.builtin.shapes import Scene
    from mogao.eval import edit_judge, shapes_judge
    from mogao.eval.generation import generate_images, prompt

    src = make_builtin("edit", split="validation", n=n, seed=seed, image_size=32, max_objects=1)
    contexts = [[{"image": s["segments"][0]["image"]}, prompt(m["instruction"])] for s, m in zip(src.samples, src.meta)]
    images = []
    for i in range(0, n, 16):
        images += generate_images(model, tok, contexts[i:i + 16], seed=seed + i, steps=steps, cfg=cfg,
                                  position_offset=offset)
    ok = [edit_judge.judge_edit(shapes_judge.parse_image(c[0]["image"]), shapes_judge.parse_image(img), m["op"],
                                pronoun=len(Scene.from_dict(m["scenes"][0]).objects) == 1).correct
          for c, img, m in zip(contexts, images, src.meta)]
    return sum(ok) / len(ok)


def older_images(model, tok, n: int, seed: int, steps: int, cfg: float) -> dict[str, dict[str, float]]:
    """Teacher-forced turns k >= 2 with all earlier images in context, and with only the previous one."""
    from mogao.data.builtin.shapes import render
    from mogao.eval import edit_judge, shapes_judge
    from mogao.eval.generation import generate_images, prompt
    from mogao.eval.suites import story_items

    stories = [s for s in story_items(n, seed) if len(s["texts"]) >= 3]
    items = [(s, k) for s in stories for k in range(2, len(s["texts"]))]
    result = {}
    for name, keep_all in (("all_earlier_images", True), ("previous_image_only", False)):
        contexts = []
        for s, k in items:
            refs = [render(sc, 32) for sc in s["scenes"]]
            ctx = []
            for j in range(k):
                ctx.append(prompt(s["texts"][j]))
                if keep_all or j == k - 1:
                    ctx.append({"image": refs[j]})
            contexts.append([*ctx, prompt(s["texts"][k])])
        images = []
        for i in range(0, len(contexts), 16):
            images += generate_images(model, tok, contexts[i:i + 16], seed=seed + i, steps=steps, cfg=cfg)
        verdicts = [edit_judge.judge_edit(shapes_judge.parse_image(render(s["scenes"][k - 1], 32)),
                                          shapes_judge.parse_image(img), s["ops"][k - 1],
                                          pronoun=len(s["scenes"][k - 1].objects) == 1)
                    for (s, k), img in zip(items, images)]
        result[name] = {"turns": len(items), **{key: sum(getattr(v, key) for v in verdicts) / max(1, len(items))
                                                for key in ("changed", "kept", "correct")}}
    return result


def text_effect(model, tok, n: int, seed: int, sigma: float = 0.95) -> dict[str, float]:
    """Mean |change| of x̂₀ at `sigma` of first story turns (and of the same edits in the edit task's form) when
    the instruction, or the first caption, is swapped for another story's; the noise is the same in each pair."""
    from mogao.data import DataConfig
    from mogao.data.builtin.shapes import render
    from mogao.eval.suites import story_items

    stories = story_items(n, seed)
    others = stories[1:] + stories[:1]
    data = DataConfig(token_budget=1 << 20, max_image_tokens=(32 // model.vae_patch) ** 2, p_drop_text=0.0,
                      p_drop_images=0.0).for_model(model)

    def last_x0(dicts: list[dict]) -> torch.Tensor:
        est, _ = x0_estimates(model, tok, data, dicts, seed, sigma)
        return torch.stack([est[j] for j in _last_of_each(dicts)])

    def story(caption_of, instruction_of) -> list[dict]:
        return [{"segments": [{"text": caption_of["texts"][0], "loss": False},
                              {"image": render(s["scenes"][0], 32), "generate": True},
                              {"text": instruction_of["texts"][1], "loss": False},
                              {"image": render(s["scenes"][1], 32), "generate": True}]}
                for s, caption_of, instruction_of in zip(stories, caption_of, instruction_of)]

    def edit(instruction_of) -> list[dict]:
        return [{"segments": [{"image": render(s["scenes"][0], 32)},
                              {"text": i["texts"][1], "loss": False},
                              {"image": render(s["scenes"][1], 32), "generate": True}]}
                for s, i in zip(stories, instruction_of)]

    own = last_x0(story(stories, stories))
    out = {"story_instruction_swapped": float((last_x0(story(stories, others)) - own).abs().mean()),
           "story_caption_swapped": float((last_x0(story(others, stories)) - own).abs().mean()),
           "edit_instruction_swapped": float((last_x0(edit(others)) - last_x0(edit(stories))).abs().mean())}
    return {k: round(v, 4) for k, v in out.items()}


def _last_of_each(dicts: list[dict]) -> list[int]:
    """Indexes (into the pack's targets) of each sample's last generation target."""
    counts = [sum(1 for seg in d["segments"] if seg.get("generate")) for d in dicts]
    ends, total = [], 0
    for c in counts:
        total += c
        ends.append(total - 1)
    return ends


def _largest_like(parsed, scene) -> bool:
    """Whether the largest object of `parsed` has the colour and cell of `scene`'s first object."""
    if not parsed.objects:
        return False
    big, ref = parsed.objects[0], scene.objects[0]
    return (big.colour, big.where) == (ref.colour, ref.where)


def caption_swap(model, tok, n: int, seed: int, steps: int, cfg: float) -> dict[str, dict[str, float]]:
    """First story turns with their own first caption and with another story's: what the image follows."""
    from mogao.data.builtin.shapes import caption, render, sentence
    from mogao.eval import edit_judge, shapes_judge
    from mogao.eval.generation import generate_images, prompt
    from mogao.eval.suites import story_items

    stories = story_items(n, seed)
    others = stories[1:] + stories[:1]
    result = {}
    for name, swap in (("own_caption", False), ("other_caption", True)):
        captions = [sentence("draw " + caption((o if swap else s)["scenes"][0])) for s, o in zip(stories, others)]
        contexts = [[prompt(c), {"image": render(s["scenes"][0], 32)}, prompt(s["texts"][1])]
                    for c, s in zip(captions, stories)]
        images = []
        for i in range(0, len(contexts), 16):
            images += generate_images(model, tok, contexts[i:i + 16], seed=seed + i, steps=steps, cfg=cfg)
        parsed = [shapes_judge.parse_image(img) for img in images]
        follows = {"caption_scene": [p.matches((o if swap else s)["scenes"][0]) for p, s, o in zip(parsed, stories, others)],
                   "condition_scene": [p.matches(s["scenes"][0]) for p, s in zip(parsed, stories)],
                   "edit_correct": [edit_judge.judge_edit(shapes_judge.parse_image(render(s["scenes"][0], 32)), p,
                                                          s["ops"][0], pronoun=len(s["scenes"][0].objects) == 1).correct
                                    for p, s in zip(parsed, stories)],
                   # softer: the largest object drawn has the colour and cell of the caption's / condition's object
                   "caption_colour_cell": [_largest_like(p, (o if swap else s)["scenes"][0])
                                           for p, s, o in zip(parsed, stories, others)],
                   "condition_colour_cell": [_largest_like(p, s["scenes"][0]) for p, s in zip(parsed, stories)]}
        result[name] = {"turns": len(stories), **{k: sum(v) / len(v) for k, v in follows.items()}}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="saved model directory (pixel autoencoder, 32-pixel images)")
    ap.add_argument("--tokenizer", type=Path, default=None, help="default: the model folder's, else the tiny one")
    ap.add_argument("--offsets", type=int, nargs="*", default=[0, 15, 40], help="(none: skip the per-offset figures)")
    ap.add_argument("--n", type=int, default=24, help="stories, VQA questions and edits per offset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--older", action="store_true", help="also measure older images in story context")
    ap.add_argument("--caption-swap", action="store_true",
                    help="also measure first turns with another story's first caption")
    ap.add_argument("--text-effect", action="store_true",
                    help="also measure how x̂₀ of first story turns moves with the instruction and the caption")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from mogao.eval.generation import ModelGenerator
    from mogao.eval.suites import run_suite
    from mogao.model.io import load_model

    torch.manual_seed(args.seed)
    model = load_model(args.model).eval()
    tok_dir = args.tokenizer or next((p for p in (args.model / "tokenizer", Path("runs/tiny/components/tokenizer"))
                                      if p.exists()), None)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    print(f"model {args.model}: positions {model.cfg.positions}, rope_axes {model.cfg.rope_axes}")
    rows = []
    for o in args.offsets:
        t0 = time.perf_counter()
        gen = ModelGenerator(model, tok, steps=args.steps, position_offset=o)
        story_run = run_suite(None, None, "interleaved", n=args.n, seed=args.seed, generator=gen)
        story = story_run["scores"]
        first = [d["kept"] and d["changed"] for d in story_run["details"] if d.get("teacher_forced") and d["turn"] == 1]
        vqa = run_suite(None, None, "vqa", n=args.n, seed=args.seed, generator=gen)["scores"]
        row = {"offset": o, **x0_mse(model, tok, o, args.n, args.seed),
               **{k: story[k]["all"] for k in ("edit_changed", "edit_kept", "edit_correct", "correct")},
               "first_turn_correct": sum(first) / max(1, len(first)),
               "one_object_edits": one_object_edits(model, tok, args.n, args.seed, args.steps, 2.0, o),
               "vqa": vqa["overall"]["all"], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row))
    out = {"model": str(args.model), "positions": model.cfg.positions, "rope_axes": model.cfg.rope_axes,
           "n": args.n, "seed": args.seed, "offsets": rows}
    if args.older:
        out["older_images"] = older_images(model, tok, 4 * args.n, args.seed, args.steps, 2.0)
        print(json.dumps(out["older_images"]))
    if args.caption_swap:
        out["caption_swap"] = caption_swap(model, tok, 2 * args.n, args.seed, args.steps, 2.0)
        print(json.dumps(out["caption_swap"]))
    if args.text_effect:
        out["text_effect"] = text_effect(model, tok, 2 * args.n, args.seed)
        print(json.dumps(out["text_effect"]))
    print("| offset | x̂₀ MSE σ 0.95 with / without condition | TF edit changed / kept / correct | TF first turn "
          "| free stories correct | one-object edits | VQA |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['offset']} | {r['with_condition']:.4f} / {r['without_condition']:.4f} | {r['edit_changed']:.2f} / "
              f"{r['edit_kept']:.2f} / {r['edit_correct']:.2f} | {r['first_turn_correct']:.2f} | {r['correct']:.2f} | "
              f"{r['one_object_edits']:.2f} | {r['vqa']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
