"""A self-contained HTML report of a curriculum run: per stage, what the model draws for fixed prompts (including
held-out colour-shape pairs), how it answers questions about validation images, how it edits an image; the loss
curves of all stages as one PNG; and the validation metrics. Images are embedded, so the file can be mailed."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mogao.curriculum import load_curriculum
from mogao.training.rundir import read_history

T2I_PROMPTS = [
    "A large red circle on a white background.",
    "A large blue square on a white background.",
    "A large green triangle on a white background.",
    "A large yellow cross on a white background.",
    "A large purple circle on a white background.",
    "A large orange square on a white background.",
    "Draw the digit 3.",
    "Draw the digit 7.",
]
HELD_OUT_PROMPTS = [  # colour-shape pairs no training sample ever shows
    "A large red triangle on a white background.",
    "A large blue circle on a white background.",
    "A large purple square on a white background.",
    "A large green cross on a white background.",
]


def _png(img: Image.Image, scale: int = 4) -> str:
    from mogao.inference.report import png_data_uri

    return png_data_uri(img.resize((img.width * scale, img.height * scale), Image.NEAREST))


def prompted_colour_share(img: Image.Image, colour: str,
                          colours: dict[str, tuple[int, int, int]] | None = None) -> float:
    """Share of the non-background pixels whose nearest colour in `colours` (default: the shapes palette) is
    `colour` (a quick look, not a judge)."""
    from mogao.data.builtin.shapes import COLOURS

    colours = COLOURS if colours is None else colours
    names = list(colours)
    palette = np.array([colours[n] for n in names], dtype=np.float32)
    px = np.asarray(img.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    fg = px[np.abs(px - 255).max(axis=1) > 60]
    if len(fg) == 0:
        return 0.0
    nearest = np.argmin(((fg[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    return float((nearest == names.index(colour)).mean())


TWO_OBJECT_PROMPTS = [  # two objects in cells (the captions the t2i data writes for two-object scenes)
    "A large red circle at the top left and a large blue square at the bottom right on a white background.",
    "A large green triangle at the top right and a large yellow cross at the bottom left on a white background.",
]

EVAL_N = {"shapes": 4, "digits": 10, "vqa": 16, "interleaved": 4}
"""Items per suite in the report's score table (`mogao eval` takes larger n for the measured figures)."""

SCORE_COLUMNS = [  # (heading, suite, category, group)
    ("T2I one object (seen)", "shapes", "single_object", "seen"),
    ("T2I one object (held-out pairs)", "shapes", "single_object", "held_out"),
    ("T2I two objects", "shapes", "two_objects", "all"),
    ("T2I positions", "shapes", "position", "all"),
    ("T2I counting", "shapes", "counting", "all"),
    ("VQA", "vqa", "overall", "all"),
    ("edits (teacher-forced)", "interleaved", "edit_correct", "all"),
    ("stories (free-running)", "interleaved", "correct", "all"),
    ("digits accuracy", "digits", "accuracy", "all"),
]


def _guidance(text: float):
    from mogao.inference import Guidance

    return Guidance(text_scale=text, image_scale=1.5)


def stage_scores(model: Any, tok: Any, n: dict[str, int] | None = None, seed: int = 0, steps: int = 16,
                 ) -> dict[str, Any]:
    """`mogao eval` suites on one model (through the generation loop); {suite: result}."""
    from mogao.eval.suites import SUITES, run_suite

    n = {**EVAL_N, **(n or {})}
    return {suite: run_suite(model, tok, suite, n=n[suite], seed=seed, steps=steps) for suite in SUITES}


def score_row(results: dict[str, Any]) -> list[float | None]:
    """The report's score columns (`SCORE_COLUMNS`) from `stage_scores`' results."""
    return [results[suite]["scores"][cat][group] for _, suite, cat, group in SCORE_COLUMNS]


def _story(model: Any, tok: Any, seed: int, steps: int) -> dict[str, Any] | None:
    """One free-running story of three turns: each turn's text, then the image the model draws for it."""
    from mogao.eval.suites import story_items
    from mogao.inference import GenerationConfig, GenerationSession

    story = next((s for s in story_items(16, seed) if len(s["texts"]) >= 3), None)
    if story is None:
        return None
    session = GenerationSession(model, tok, 1, GenerationConfig(max_images=1, steps=steps, seed=seed),
                                _guidance(2.0))
    turns = []
    for text in story["texts"][:3]:
        session.add_user_turn([[{"text": text}]])
        turns.append({"text": text, "image": session.respond(draw=True)[0].images[0]})
    return {"turns": turns}


def _stage_examples(model_dir: Path, seed: int = 0, eval_n: dict[str, int] | None = None,
                    steps: int = 24) -> dict[str, Any]:
    from mogao.data.builtin import make_builtin
    from mogao.data.builtin.shapes import COLOURS
    from mogao.inference import GenerationConfig
    from mogao.inference.inputs import load_model_dir
    from mogao.inference.tasks import answer, edit_image, text_to_image

    model, tok = load_model_dir(model_dir)
    draw = GenerationConfig(steps=steps, seed=seed)
    prompts = T2I_PROMPTS + HELD_OUT_PROMPTS + TWO_OBJECT_PROMPTS
    images = text_to_image(model, tok, prompts, config=draw, guidance=_guidance(3.0))
    t2i = []
    for p, img in zip(prompts, images):
        colour = next((c for c in COLOURS if f" {c} " in p), None) if p not in TWO_OBJECT_PROMPTS else None
        share = None if colour is None else prompted_colour_share(img, colour)
        t2i.append({"prompt": p, "image": img, "colour_share": share, "held_out": p in HELD_OUT_PROMPTS})
    vqa = make_builtin("vqa", split="validation", n=6, seed=seed, max_objects=2)
    cap = make_builtin("digits_classify", split="validation", n=2, seed=seed)
    qa = [{"image": s["segments"][0]["image"], "question": s["segments"][1]["text"],
           "reference": s["segments"][2]["text"]} for s in vqa.samples + cap.samples]
    answers = answer(model, tok, [q["question"] for q in qa], images=[q["image"] for q in qa],
                     config=GenerationConfig(max_new_tokens=12))
    for q, a in zip(qa, answers):
        q["answer"] = a
    edits = make_builtin("edit", split="validation", n=6, seed=seed, max_objects=2)
    edited = edit_image(model, tok, [s["segments"][0]["image"] for s in edits.samples],
                        [s["segments"][1]["text"] for s in edits.samples], config=draw, guidance=_guidance(2.0))
    ed = [{"before": s["segments"][0]["image"], "instruction": s["segments"][1]["text"], "after": img,
           "reference": s["segments"][2]["image"]} for s, img in zip(edits.samples, edited)]
    return {"t2i": t2i, "qa": qa, "edits": ed, "story": _story(model, tok, seed, steps),
            "scores": stage_scores(model, tok, eval_n, seed, steps=min(steps, 16))}


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    """Moving average over k points, the ends padded with their own values (no pull towards 0)."""
    if k <= 1 or len(x) < 2:
        return x
    padded = np.pad(x, (k // 2, k - 1 - k // 2), mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def _plot_losses(stages: list[tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    offset = 0
    for i, (name, rows) in enumerate(stages):
        train = [r for r in rows if r.get("kind") == "train"]
        if not train:
            continue
        steps = np.array([r["step"] for r in train]) + offset
        for ax, key in zip(axes, ("text_loss", "image_loss")):
            vals = np.array([float(r.get(key, np.nan)) for r in train])
            keep = vals > 0  # steps whose batch had no such loss log 0 (or nothing): left out, not smoothed in
            ax.plot(steps[keep], _smooth(vals[keep], max(1, int(keep.sum()) // 40)), color=f"C{i}", label=name)
            ax.axvline(offset, color="grey", lw=0.6, ls=":")
        offset = int(steps.max())
    axes[0].set_title("text cross-entropy (train)")
    axes[1].set_title("flow-matching MSE (train)")
    for ax in axes:
        ax.set_xlabel("step (all stages)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ccc}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:4px 8px;font-size:.9em;text-align:left;vertical-align:top}
.grid{display:flex;flex-wrap:wrap;gap:10px}.cell{width:140px;font-size:.8em}.cell img{width:128px;
image-rendering:pixelated;border:1px solid #ccc}.held{color:#a33}.ok{color:#282}.bad{color:#a33}"""


def _score_table(stages: list[dict[str, Any]], n: dict[str, int]) -> list[str]:
    """The stage × capability table of eval scores (a share of items judged correct)."""
    rows = [(s["name"], score_row(s["examples"]["scores"])) for s in stages if s["examples"]]
    if not rows:
        return []
    sizes = ", ".join(f"{k} n={v}" for k, v in n.items())
    head = "".join(f"<th>{html.escape(h)}</th>" for h, *_ in SCORE_COLUMNS)
    out = ["<h2>What each stage can do (mogao eval scores)</h2>",
           f"<p>Share of items judged correct by the programmatic judges ({html.escape(sizes)}); images and "
           "answers generated through the KV-cached loop with multi-modal CFG.</p>",
           f"<table><tr><th>stage</th>{head}</tr>"]
    for name, vals in rows:
        cells = "".join("<td>–</td>" if v is None else
                        f"<td class={'ok' if v >= 0.8 else 'bad' if v < 0.4 else ''}>{v:.2f}</td>" for v in vals)
        out.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    out.append("</table>")
    return out


def write_report(curriculum: str | Path, out: str | Path, seed: int = 0, eval_n: dict[str, int] | None = None,
                 steps: int = 24) -> Path:
    """Write `<out>/report.html` (and `losses.png`, `report.json`) for a finished curriculum run. Every image
    and answer comes from the generation loop users get (`mogao.inference`); the score table from the `mogao
    eval` suites with `eval_n` items each (default `EVAL_N`); `steps`: Euler steps per image."""
    out = Path(out)
    spec = load_curriculum(curriculum, out=out)
    stages = []
    for i, st in enumerate(spec.stages):
        d = spec.stage_dir(i)
        rows = read_history(d / "metrics.jsonl")
        val = [r for r in rows if r.get("kind") == "val"]
        stages.append({"name": st.name, "dir": d, "rows": rows, "val": val[-1] if val else {},
                       "examples": _stage_examples(d / "model", seed, eval_n, steps) if (d / "model").is_dir() else None})
    _plot_losses([(s["name"], s["rows"]) for s in stages], out / "losses.png")
    parts = [f"<!doctype html><meta charset=utf-8><title>mogao run report</title><style>{_CSS}</style>",
             f"<h1>Curriculum run: {html.escape(str(out))}</h1>",
             "<p>Stages in order, each starting from the previous stage's weights. Images are shown 4× enlarged. Prompts in <span class=held>red</span> name colour–shape pairs that no training sample "
             "shows (compositional generalisation).</p>",
             *_score_table(stages, {**EVAL_N, **(eval_n or {})}),
             f"<h2>Loss curves</h2><img src='{_png(Image.open(out / 'losses.png'), 1)}' style='max-width:100%'>",
             "<h2>Validation metrics (last validation of each stage)</h2><table><tr><th>stage</th><th>metric</th>"
             "<th>value</th></tr>"]
    summary: dict[str, Any] = {"stages": []}
    for s in stages:
        metrics = {k: v for k, v in s["val"].items() if k.startswith("val/")}
        for k, v in sorted(metrics.items()):
            parts.append(f"<tr><td>{html.escape(s['name'])}</td><td>{html.escape(k)}</td><td>{float(v):.4f}</td></tr>")
        entry: dict[str, Any] = {"stage": s["name"], "validation": metrics}
        ex = s["examples"]
        if ex:
            shares = [e["colour_share"] for e in ex["t2i"] if e["colour_share"] is not None and not e["held_out"]]
            held = [e["colour_share"] for e in ex["t2i"] if e["colour_share"] is not None and e["held_out"]]
            entry["prompted_colour_share"] = round(float(np.mean(shares)), 3) if shares else None
            entry["prompted_colour_share_held_out"] = round(float(np.mean(held)), 3) if held else None
            entry["answers_correct"] = sum(q["answer"].strip().rstrip(".").lower() ==
                                           q["reference"].strip().rstrip(".").lower() for q in ex["qa"])
            entry["answers_total"] = len(ex["qa"])
            entry["scores"] = {h: v for (h, *_), v in zip(SCORE_COLUMNS, score_row(ex["scores"]))}
            entry["eval"] = {suite: r["scores"] for suite, r in ex["scores"].items()}
        summary["stages"].append(entry)
    parts.append("</table>")
    for s in stages:
        ex = s["examples"]
        parts.append(f"<h2>After stage “{html.escape(s['name'])}”</h2>")
        if not ex:
            parts.append("<p>(stage not finished)</p>")
            continue
        parts.append("<h3>Text → image</h3><div class=grid>")
        for e in ex["t2i"]:
            cls = " class=held" if e["held_out"] else ""
            share = "" if e["colour_share"] is None else f"<br>prompted colour: {e['colour_share']:.0%} of ink"
            parts.append(f"<div class=cell><img src='{_png(e['image'])}'><br><span{cls}>"
                         f"{html.escape(e['prompt'])}</span>{share}</div>")
        parts.append("</div><h3>Image → answer (validation images)</h3><div class=grid>")
        for q in ex["qa"]:
            ok = q["answer"].strip().rstrip(".").lower() == q["reference"].strip().rstrip(".").lower()
            parts.append(f"<div class=cell><img src='{_png(q['image'])}'><br>{html.escape(q['question'])}<br>"
                         f"<b class={'ok' if ok else 'bad'}>{html.escape(q['answer']) or '∅'}</b> "
                         f"(reference: {html.escape(q['reference'])})</div>")
        parts.append("</div><h3>Image + instruction → image (validation edits)</h3><table>"
                     "<tr><th>before</th><th>instruction</th><th>generated</th><th>reference</th></tr>")
        for e in ex["edits"]:
            parts.append(f"<tr><td><img src='{_png(e['before'], 3)}'></td><td>{html.escape(e['instruction'])}</td>"
                         f"<td><img src='{_png(e['after'], 3)}'></td><td><img src='{_png(e['reference'], 3)}'></td></tr>")
        parts.append("</table>")
        if ex["story"]:
            parts.append("<h3>A free-running story (each image drawn from the model's own earlier ones)</h3>"
                         "<div class=grid>")
            for t in ex["story"]["turns"]:
                parts.append(f"<div class=cell><img src='{_png(t['image'])}'><br>{html.escape(t['text'])}</div>")
            parts.append("</div>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    (out / "report.json").write_text(json.dumps(summary, indent=1, default=float))
    return path
