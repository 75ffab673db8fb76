"""Evaluation suites: draw the suite's prompts from the built-in data (validation split), generate through a
`Generator`, judge, and summarise.

    from mogao.eval import run_suite
    result = run_suite(model, tokenizer, "shapes", n=8, seed=0)
    result["scores"]["overall"]["all"]

Every suite returns the same structure: `scores` maps a category to {"all", "held_out", "seen"} (a share in
[0, 1], or a distance for FID; None where a group is empty or the split does not apply) and {"n", "n_held_out",
"n_seen"}; `details` lists every judged item; `judge` describes the judges; `settings` the generation settings.

Suites (prompts always from the `validation` split, so held-out colour-shape pairs can occur):
- shapes: GenEval-style text-to-image. Three prompt sets of `n` captions each, about half naming a held-out
  pair: "one" (a centred object), "two" (two objects in cells), "many" (two to four objects in cells). The
  categories of `shapes_judge.CATEGORIES` are checks on them; overall = their mean.
- digits: `n` images for "Draw the digit d." (d cycling 0-9): classifier accuracy and FID against the real
  validation digits; `fid_real_reference` is the FID of `n` real train-split digits, the floor at this `n`.
- vqa: `n` questions about validation images; exact-match accuracy per question kind; overall = all questions.
- interleaved: `n` multi-turn stories ("Draw ..." then "Now ..."), each turn generated from the model's own
  earlier images. first_image: turn 1 shows exactly its caption's scene; changed / kept / correct: the later
  turns, judged by `edit_judge`. A free-running story fails from the first wrong image on, so the edits are
  also judged teacher-forced: edit_changed / edit_kept / edit_correct are turn k generated from the reference
  images of turns < k (editing skill apart from drawing skill). overall = mean of the seven.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mogao.data.builtin import make_builtin
from mogao.data.builtin.digits import draw_prompt, load_digit_images, render_digit, split_indices
from mogao.data.builtin.shapes import Scene, render
from mogao.errors import ConfigError
from mogao.eval import digits_judge, edit_judge, shapes_judge, text_judge
from mogao.eval.generation import Context, Generator, ModelGenerator, prompt

SUITES: tuple[str, ...] = ("shapes", "digits", "vqa", "interleaved")
DEFAULT_N: dict[str, int] = {"shapes": 8, "digits": 30, "vqa": 64, "interleaved": 8}
DEFAULT_CFG: dict[str, float] = {"shapes": 3.0, "digits": 3.0, "vqa": 1.0, "interleaved": 2.0}
PROMPT_SETS: dict[str, tuple[int, int, int]] = {"one": (1, 1, 1), "two": (2, 2, 2), "many": (4, 2, 4)}
"""Prompt set -> (max_objects to draw with, fewest objects kept, most objects kept)."""
VQA_MAX_OBJECTS = 2
STORY_MAX_OBJECTS = 2

Progress = Callable[[int, int], None]
"""Called with (items generated so far, items in the suite)."""


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _score(items: Sequence[tuple[bool, float]]) -> dict[str, Any]:
    """{"all", "held_out", "seen", "n", "n_held_out", "n_seen"} of (held_out, value) pairs."""
    held = [v for h, v in items if h]
    seen = [v for h, v in items if not h]
    return {"all": _mean([v for _, v in items]), "held_out": _mean(held), "seen": _mean(seen),
            "n": len(items), "n_held_out": len(held), "n_seen": len(seen)}


def _overall(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Mean of the categories' scores, per group (a group counts where a category has it)."""
    out: dict[str, Any] = {}
    for group in ("all", "held_out", "seen"):
        out[group] = _mean([s[group] for s in scores.values() if s[group] is not None])
    out["n"] = sum(s["n"] for s in scores.values())
    out["n_held_out"] = sum(s["n_held_out"] for s in scores.values())
    out["n_seen"] = sum(s["n_seen"] for s in scores.values())
    return out


class _Batches:
    """Generation in batches of `batch_size`, reporting progress over the whole suite."""

    def __init__(self, generator: Generator, batch_size: int, total: int, progress: Progress | None) -> None:
        self.generator, self.batch_size, self.total, self.progress = generator, batch_size, total, progress
        self.done = 0

    def _advance(self, k: int) -> None:
        self.done += k
        if self.progress is not None:
            self.progress(self.done, self.total)

    def images(self, contexts: Sequence[Context], *, seed: int, cfg: float) -> list:
        out: list = []
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            out += self.generator.images(chunk, seed=seed + start, cfg=cfg)
            self._advance(len(chunk))
        return out

    def texts(self, contexts: Sequence[Context]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            out += self.generator.texts(chunk)
            self._advance(len(chunk))
        return out


# ---- shapes -------------------------------------------------------------------------------------------------


def shapes_prompts(n: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Per prompt set, `n` t2i validation samples' {"caption", "scene", "held_out"}: (n + 1) // 2 that name a
    held-out pair, the rest none. Deterministic in (n, seed)."""
    want = {True: (n + 1) // 2, False: n // 2}
    sets: dict[str, list[dict[str, Any]]] = {}
    for j, (name, (max_objects, lo, hi)) in enumerate(PROMPT_SETS.items()):
        picked: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
        draw = 16 * n + 32
        while True:
            data = make_builtin("t2i", split="validation", n=draw, seed=seed * len(PROMPT_SETS) + j, image_size=8,
                                max_objects=max_objects)
            picked = {True: [], False: []}
            for meta in data.meta:
                scene = Scene.from_dict(meta["scenes"][0])
                if lo <= len(scene.objects) <= hi and len(picked[meta["held_out"]]) < want[meta["held_out"]]:
                    picked[meta["held_out"]].append({"caption": meta["caption"], "scene": scene,
                                                     "held_out": meta["held_out"]})
            if all(len(picked[h]) == want[h] for h in picked):
                break
            draw *= 2
        sets[name] = picked[True] + picked[False]
    return sets


def _shapes(gen: Generator, n: int, seed: int, cfg: float, batch_size: int, progress: Progress | None) -> dict:
    sets = shapes_prompts(n, seed)
    batches = _Batches(gen, batch_size, sum(len(v) for v in sets.values()), progress)
    parsed: dict[str, list[shapes_judge.Parsed]] = {}
    offset = seed
    for name, items in sets.items():
        images = batches.images([[prompt(it["caption"])] for it in items], seed=offset, cfg=cfg)
        offset += len(items)
        parsed[name] = [shapes_judge.parse_image(img) for img in images]
    scores: dict[str, dict[str, Any]] = {}
    for category, (set_name, check) in shapes_judge.CATEGORIES.items():
        scores[category] = _score([(it["held_out"], float(check(p, it["scene"])))
                                   for it, p in zip(sets[set_name], parsed[set_name])])
    details = [{"set": name, "prompt": it["caption"], "held_out": it["held_out"],
                "exact": p.matches(it["scene"]), "parsed": [list(o.key) for o in p.objects]}
               for name, items in sets.items() for it, p in zip(items, parsed[name])]
    return {"scores": {"overall": _overall(scores), **scores}, "details": details,
            "judge": {"shapes": shapes_judge.JUDGE_DESCRIPTION}}


# ---- digits -------------------------------------------------------------------------------------------------


def digits_labels(n: int) -> list[int]:
    """The prompted digit of each of `n` images: 0-9, cycling."""
    return [i % 10 for i in range(n)]


def _real_sample(labels: Sequence[int], seed: int, image_size: int) -> list:
    """One real train-split image per label, drawn with `seed` (for the reference FID)."""
    all_labels = load_digit_images()[1]
    idx = split_indices("train")
    rng = np.random.default_rng(seed)
    return [render_digit(int(rng.choice(idx[all_labels[idx] == d])), image_size) for d in labels]


def _digits(gen: Generator, n: int, seed: int, cfg: float, batch_size: int, progress: Progress | None,
            image_size: int, cache_dir: str | None) -> dict:
    if n < 2:
        raise ConfigError(f"n={n} is too small for the digits suite: the Fréchet distance needs at least 2 images")
    labels = digits_labels(n)
    batches = _Batches(gen, batch_size, n, progress)
    images = batches.images([[prompt(draw_prompt(d))] for d in labels], seed=seed, cfg=cfg)
    net = digits_judge.load_digits_net(cache_dir=cache_dir)
    predicted = digits_judge.classify(images)
    real_validation = digits_judge.real_digits("validation")[0]
    fid = digits_judge.digits_fid(net, images, real_validation)
    reference = digits_judge.digits_fid(net, _real_sample(labels, seed, image_size), real_validation)
    na = {"held_out": None, "seen": None, "n_held_out": 0, "n_seen": 0}  # digits have no held-out split
    scores = {
        "accuracy": {"all": float(np.mean([p == d for p, d in zip(predicted, labels)])), "n": n, **na},
        "fid": {"all": fid, "n": n, **na},
        "fid_real_reference": {"all": reference, "n": n, **na},
    }
    details = [{"prompt": draw_prompt(d), "label": d, "predicted": int(p)} for d, p in zip(labels, predicted)]
    return {"scores": scores, "details": details, "judge": {"accuracy": digits_judge.CLASSIFIER_DESCRIPTION,
                                                           "fid": digits_judge.FEATURE_DESCRIPTION}}


# ---- vqa ----------------------------------------------------------------------------------------------------


def vqa_items(n: int, seed: int, image_size: int) -> list[dict[str, Any]]:
    """`n` validation VQA samples: {"image", "question", "answer", "kind", "held_out"}."""
    data = make_builtin("vqa", split="validation", n=n, seed=seed, image_size=image_size,
                        max_objects=VQA_MAX_OBJECTS)
    return [{"image": s["segments"][0]["image"], "question": m["question"], "answer": m["answer"],
             "kind": m["kind"], "held_out": m["held_out"]} for s, m in zip(data.samples, data.meta)]


def _vqa(gen: Generator, n: int, seed: int, batch_size: int, progress: Progress | None, image_size: int) -> dict:
    items = vqa_items(n, seed, image_size)
    batches = _Batches(gen, batch_size, n, progress)
    replies = batches.texts([[{"image": it["image"]}, prompt(it["question"])] for it in items])
    right = [text_judge.exact_match(r, it["answer"]) for r, it in zip(replies, items)]
    scores: dict[str, dict[str, Any]] = {"overall": _score([(it["held_out"], float(ok))
                                                           for it, ok in zip(items, right)])}
    for kind in sorted({it["kind"] for it in items}):
        scores[kind] = _score([(it["held_out"], float(ok)) for it, ok in zip(items, right) if it["kind"] == kind])
    details = [{"question": it["question"], "kind": it["kind"], "held_out": it["held_out"], "reference":
                it["answer"], "answer": r, "correct": ok} for it, r, ok in zip(items, replies, right)]
    return {"scores": scores, "details": details, "judge": {"vqa": text_judge.JUDGE_DESCRIPTION}}


# ---- interleaved --------------------------------------------------------------------------------------------


def story_items(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` validation stories: {"texts", "ops", "scenes", "held_out"} (texts[k] asks for scenes[k])."""
    data = make_builtin("story", split="validation", n=n, seed=seed, image_size=8, max_objects=STORY_MAX_OBJECTS)
    return [{"texts": m["instructions"], "ops": m["ops"], "scenes": [Scene.from_dict(s) for s in m["scenes"]],
             "held_out": m["held_out"]} for m in data.meta]


def _story_context(texts: Sequence[str], images: Sequence[Any], k: int) -> Context:
    """Turns < k (instruction, image) followed by instruction k."""
    ctx: Context = []
    for text, img in zip(texts[:k], images[:k]):
        ctx += [prompt(text), {"image": img}]
    return [*ctx, prompt(texts[k])]


def _interleaved(gen: Generator, n: int, seed: int, cfg: float, batch_size: int, progress: Progress | None,
                 image_size: int) -> dict:
    stories = story_items(n, seed)
    turns = max(len(s["texts"]) for s in stories)
    edits = [(i, k) for i, s in enumerate(stories) for k in range(1, len(s["texts"]))]
    batches = _Batches(gen, batch_size, sum(len(s["texts"]) for s in stories) + len(edits), progress)
    drawn: list[list] = [[] for _ in stories]
    for k in range(turns):
        active = [i for i, s in enumerate(stories) if len(s["texts"]) > k]
        contexts = [_story_context(stories[i]["texts"], drawn[i], k) for i in active]
        for i, img in zip(active, batches.images(contexts, seed=seed + k * n, cfg=cfg)):
            drawn[i].append(img)
    refs = [[render(scene, image_size) for scene in s["scenes"]] for s in stories]
    forced = batches.images([_story_context(stories[i]["texts"], refs[i], k) for i, k in edits],
                            seed=seed + turns * n, cfg=cfg)
    first, changed, kept, correct, details = [], [], [], [], []
    for story, images in zip(stories, drawn):
        parsed = [shapes_judge.parse_image(img) for img in images]
        ok = parsed[0].matches(story["scenes"][0])
        first.append((story["held_out"], float(ok)))
        details.append({"turn": 0, "text": story["texts"][0], "held_out": story["held_out"], "exact": ok})
        for k in range(1, len(images)):
            verdict = edit_judge.judge_edit(parsed[k - 1], parsed[k], story["ops"][k - 1],
                                            pronoun=len(story["scenes"][k - 1].objects) == 1)
            changed.append((story["held_out"], float(verdict.changed)))
            kept.append((story["held_out"], float(verdict.kept)))
            correct.append((story["held_out"], float(verdict.correct)))
            details.append({"turn": k, "text": story["texts"][k], "op": story["ops"][k - 1]["op"],
                            "held_out": story["held_out"], "target_found": verdict.target_found,
                            "changed": verdict.changed, "kept": verdict.kept})
    f_changed, f_kept, f_correct = [], [], []
    for (i, k), img in zip(edits, forced):
        story = stories[i]
        verdict = edit_judge.judge_edit(shapes_judge.parse_image(refs[i][k - 1]), shapes_judge.parse_image(img),
                                        story["ops"][k - 1], pronoun=len(story["scenes"][k - 1].objects) == 1)
        f_changed.append((story["held_out"], float(verdict.changed)))
        f_kept.append((story["held_out"], float(verdict.kept)))
        f_correct.append((story["held_out"], float(verdict.correct)))
        details.append({"turn": k, "teacher_forced": True, "text": story["texts"][k],
                        "op": story["ops"][k - 1]["op"], "held_out": story["held_out"],
                        "target_found": verdict.target_found, "changed": verdict.changed, "kept": verdict.kept})
    scores = {"first_image": _score(first), "changed": _score(changed), "kept": _score(kept),
              "correct": _score(correct), "edit_changed": _score(f_changed), "edit_kept": _score(f_kept),
              "edit_correct": _score(f_correct)}
    return {"scores": {"overall": _overall(scores), **scores}, "details": details,
            "judge": {"shapes": shapes_judge.JUDGE_DESCRIPTION, "interleaved": edit_judge.JUDGE_DESCRIPTION}}


# ---- entry point --------------------------------------------------------------------------------------------


def run_suite(
    model: Any,
    tokenizer: Any,
    suite: str,
    n: int | None = None,
    seed: int = 0,
    *,
    steps: int = 20,
    cfg: float | None = None,
    image_size: int = 32,
    batch_size: int = 16,
    max_new_tokens: int = 8,
    progress: Progress | None = None,
    generator: Generator | None = None,
    cache_dir: str | None = None,
    shift: float | None = None,
) -> dict[str, Any]:
    """Run one suite (`SUITES`) and return its result (see the module docstring).

    n: items of the suite (shapes: prompts per prompt set; digits: images; vqa: questions; interleaved:
        stories); default `DEFAULT_N[suite]`.
    steps / cfg / image_size / shift: image generation (cfg default `DEFAULT_CFG[suite]`; shift of the σ
        schedule, None: the model's training shift); max_new_tokens: answers.
    batch_size: contexts per generation call. progress: called with (done, total) after each batch.
    generator: generate with this instead of `model` and `tokenizer` (which may then be None).
    cache_dir: where the digits judge's network is cached (default `digits_judge.default_cache_dir()`).

    Raises ConfigError for an unknown suite or a bad number.
    """
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)} (or 'all' on the command line)")
    n = DEFAULT_N[suite] if n is None else n
    for name, value, low in (("n", n, 1), ("steps", steps, 1), ("image_size", image_size, 8),
                             ("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r} is invalid; it must be an integer >= {low}")
    cfg = DEFAULT_CFG[suite] if cfg is None else float(cfg)
    if generator is None:
        if model is None or tokenizer is None:
            raise ConfigError("run_suite needs a model and its tokenizer, or a generator")
        generator = ModelGenerator(model, tokenizer, steps=steps, image_size=image_size, max_new_tokens=max_new_tokens,
                                   shift=shift)
    if suite == "shapes":
        result = _shapes(generator, n, seed, cfg, batch_size, progress)
    elif suite == "digits":
        result = _digits(generator, n, seed, cfg, batch_size, progress, image_size, cache_dir)
    elif suite == "vqa":
        result = _vqa(generator, n, seed, batch_size, progress, image_size)
    else:
        result = _interleaved(generator, n, seed, cfg, batch_size, progress, image_size)
    if suite == "vqa":
        settings: dict[str, Any] = {"image_size": image_size, "max_new_tokens": max_new_tokens}
    else:
        settings = {"steps": steps, "cfg": cfg, "image_size": image_size, "shift": shift}
    settings["batch_size"] = batch_size
    return {"suite": suite, "n": n, "seed": seed, "settings": settings, **result}
