"""Learnability (DESIGN §8): a tiny model memorises a handful of samples of each kind and reproduces them through
the public generation loop (`mogao.inference` tasks and `GenerationSession`), judged by the project's judges.

Equivalence tests (cached vs recomputed, ...) cannot catch a pathway that carries no signal; these can. Each test
trains a fresh tiny model (CPU, fp32) on its own samples, with no condition dropout, then generates without
guidance: a memorised sample needs none, and guidance would mix in the unconditional branches, which these
samples never train. A failure here means the pathway cannot learn, not that a threshold is strict.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts, stable_seed
from mogao.data.builtin import make_builtin
from mogao.data.builtin.shapes import Scene
from mogao.diffusion.flow import TimestepSampling
from mogao.eval.edit_judge import judge_edit
from mogao.eval.shapes_judge import parse_image
from mogao.eval.text_judge import exact_match
from mogao.inference import GenerationConfig, GenerationSession, Guidance
from mogao.inference.tasks import answer, edit_image, text_to_image
from mogao.model.mogao import ModelConfig, MogaoModel
from mogao.model.tiny import TinySpec, ensure_tiny_parts
from mogao.training.objectives import combine_losses

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGE_SIZE = 32  # pixels; the pixel autoencoder with latent patch 4 makes it an 8x8 token grid, as the demo
NO_GUIDANCE = Guidance(text_scale=1.0, image_scale=1.0)
SHIFT = 3.0  # training σ shifted towards noise, where a memorised layout is decided (sampling uses the same)
SAMPLING = GenerationConfig(steps=20, image_size=IMAGE_SIZE)
SPEC = dict(hidden_size=64, layers=2, heads=2, kv_heads=2, vit_hidden_size=32, vit_patch_size=4)
LR = 2e-3
STEPS = {"keep": 600, "edit": 700, "t2i": 600, "text": 100, "story": 600}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    """Tiny parts as the recipes build them (tokenizer on the built-in corpus), sized for fast memorising."""
    root = tmp_path_factory.mktemp("learn_parts")
    spec = TinySpec(**SPEC)
    d = {k: root / k for k in ("tokenizer", "llm", "vit")}
    ensure_tiny_parts(spec, **d)
    return {**d, "tok": AutoTokenizer.from_pretrained(d["tokenizer"])}


def memorise(parts: dict, samples: list[dict], steps: int, lr: float = LR, seed: int = 0) -> MogaoModel:
    """Train a fresh tiny model on `samples` (all of them in every step) and return it in eval mode.

    Every step draws new σ and noise for each generation target (the seeds follow the step); the learning rate
    warms up for 10 steps and then decays to zero on a cosine.
    """
    tok = parts["tok"]
    torch.manual_seed(seed)
    cfg = ModelConfig(llm=str(parts["llm"]), vit=str(parts["vit"]), autoencoder="pixel", latent_patch=4,
                      vocab_size=len(tok), timestep_sampling=TimestepSampling(shift=SHIFT), prediction="x0")
    model = MogaoModel.from_parts(cfg)
    data = DataConfig(token_budget=1 << 20, max_image_tokens=64, vit_patch=model.vit_patch,
                      vae_patch=model.vae_patch, p_drop_text=0.0, p_drop_images=0.0)
    plans = [lower_sample(s, tok, data) for s in samples_from_dicts(samples)]
    batch = collate_plans(plans, data.token_budget)
    base_seeds = batch.image_seed.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for step in range(steps):
        batch.image_seed = torch.tensor([stable_seed("learn", int(s), step) for s in base_seeds])
        loss = combine_losses(model(batch).terms).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def _pick_ops(meta: list[dict], per_op: dict[str, int]) -> list[int]:
    """Indices of samples whose edit op is wanted, `per_op[op]` of each, in data order."""
    left = dict(per_op)
    picked = []
    for i, m in enumerate(meta):
        op = m["op"]["op"]
        if left.get(op, 0) > 0:
            left[op] -= 1
            picked.append(i)
    assert not any(left.values()), f"not enough samples for {left}"
    return picked


def test_keep_copies_the_condition_image(parts):
    """"Keep it.": the target is the condition image itself - the noisy copy must find each cell of the
    condition's clean VAE copy (same IL-RoPE row and column, earlier T)."""
    src = make_builtin("t2i", n=4, seed=0, image_size=IMAGE_SIZE, max_objects=1)
    images = [s["segments"][1]["image"] for s in src.samples]
    samples = [{"id": f"keep-{i}", "segments": [{"image": img}, {"text": "Keep it.", "loss": False},
                                                {"image": img, "generate": True}]} for i, img in enumerate(images)]
    t0 = time.time()
    model = memorise(parts, samples, steps=STEPS["keep"])
    out = edit_image(model, parts["tok"], images, ["Keep it."] * len(images), config=SAMPLING, guidance=NO_GUIDANCE)
    mse = [float(((_pixels(a) - _pixels(b)) ** 2).mean()) for a, b in zip(images, out)]
    print(f"keep: pixel mse {[round(m, 4) for m in mse]} in {time.time() - t0:.0f} s")
    assert max(mse) < 0.01, mse


@pytest.mark.xfail(run=False, reason=(
    "not yet learnable in budget: after 700 full-batch steps (66 s on 2 quiet cores, x0 prediction) 6/8 edits "
    "are judged correct; both recolours fail (the target keeps most of the source's colour or erodes the "
    "shape's edge). Run with --runxfail."))
def test_edits(parts):
    """8 edits, each of the six kinds at least once, judged by the edit judge: >= 7/8 correct."""
    src = make_builtin("edit", n=60, seed=0, image_size=IMAGE_SIZE, max_objects=2)
    idx = _pick_ops(src.meta, {"recolour": 2, "reshape": 2, "resize": 1, "move": 1, "remove": 1, "add": 1})
    samples, meta = [src.samples[i] for i in idx], [src.meta[i] for i in idx]
    t0 = time.time()
    model = memorise(parts, samples, steps=STEPS["edit"])
    sources = [s["segments"][0]["image"] for s in samples]
    out = edit_image(model, parts["tok"], sources, [m["instruction"] for m in meta], config=SAMPLING,
                     guidance=NO_GUIDANCE)
    verdicts = [judge_edit(parse_image(a), parse_image(b), m["op"]) for a, b, m in zip(sources, out, meta)]
    print(f"edits: {[(m['op']['op'], v.correct) for m, v in zip(meta, verdicts)]} in {time.time() - t0:.0f} s")
    assert sum(v.correct for v in verdicts) >= 7, verdicts


@pytest.mark.xfail(run=False, reason=(
    "not yet learnable in budget: after 600 full-batch steps (47 s on 2 quiet cores, x0 prediction) 9/12 images "
    "are exact: 8/8 one-object, 1/4 two-object prompts. Run with --runxfail."))
def test_text_to_image(parts):
    """8 one-object and 4 two-object prompts, each image judged exactly (every object right in colour, shape,
    size and place, nothing else drawn): >= 11/12."""
    one = make_builtin("t2i", n=8, seed=0, image_size=IMAGE_SIZE, max_objects=1)
    many = make_builtin("t2i", n=40, seed=1, image_size=IMAGE_SIZE, max_objects=2)
    two = [i for i, m in enumerate(many.meta) if len(m["scenes"][0]["objects"]) == 2][:4]
    samples = one.samples + [many.samples[i] for i in two]
    meta = one.meta + [many.meta[i] for i in two]
    t0 = time.time()
    model = memorise(parts, samples, steps=STEPS["t2i"])
    out = text_to_image(model, parts["tok"], [m["caption"] for m in meta], config=SAMPLING, guidance=NO_GUIDANCE)
    ok = [parse_image(img).matches(Scene.from_dict(m["scenes"][0])) for img, m in zip(out, meta)]
    print(f"t2i: {ok} in {time.time() - t0:.0f} s")
    assert sum(ok) >= 11, ok


def test_vqa_and_captions(parts):
    """8 VQA answers and 8 captions, greedy through `answer`: all exact."""
    vqa = make_builtin("vqa", n=8, seed=0, image_size=IMAGE_SIZE, max_objects=2)
    cap = make_builtin("caption", n=8, seed=0, image_size=IMAGE_SIZE, max_objects=2)
    t0 = time.time()
    model = memorise(parts, vqa.samples + cap.samples, steps=STEPS["text"])
    images = [s["segments"][0]["image"] for s in vqa.samples + cap.samples]
    questions = [m["question"] for m in vqa.meta] + [s["segments"][1]["text"] for s in cap.samples]
    got = answer(model, parts["tok"], questions, images=images)
    want = [m["answer"] for m in vqa.meta] + [m["caption"] for m in cap.meta]
    ok = [exact_match(g, w) for g, w in zip(got, want)]
    print(f"vqa/captions: {ok} in {time.time() - t0:.0f} s")
    assert all(ok[:8]), list(zip(got[:8], want[:8]))
    assert all(ok[8:]), list(zip(got[8:], want[8:]))


@pytest.mark.xfail(run=False, reason=(
    "not yet learnable in budget: after 600 full-batch steps (69 s on 2 quiet cores, x0 prediction) 0/8 stories "
    "have both an exact first image (2/8) and a correct edit (3/8). Run with --runxfail."))
def test_two_turn_stories_free_running(parts):
    """8 two-turn stories ("Draw ..." -> image -> "Now ..." -> image), generated free-running in one session:
    the model itself begins each image, the second turn edits the model's own first image. Correct = the first
    image shows its caption's scene exactly and the edit judge accepts the second turn: >= 7/8."""
    src = make_builtin("story", n=8, seed=0, image_size=IMAGE_SIZE, max_objects=2)
    samples = [{"id": s["id"], "segments": s["segments"][:4]} for s in src.samples]
    t0 = time.time()
    model = memorise(parts, samples, steps=STEPS["story"])
    texts = [[s["segments"][0]["text"], s["segments"][2]["text"]] for s in samples]
    session = GenerationSession(model, parts["tok"], len(samples), replace(SAMPLING, max_images=1), NO_GUIDANCE)
    drawn: list[list[Image.Image]] = [[] for _ in samples]
    for turn in range(2):
        session.add_user_turn([[{"text": t[turn]}] for t in texts])
        for d, r in zip(drawn, session.respond()):
            assert len(r.images) == 1, f"turn {turn}: the model did not draw ({r.stop_reason}, text {r.text!r})"
            d.append(r.images[0])
    ok, parts_ok = [], []
    for (first, second), m in zip(drawn, src.meta):
        scene = Scene.from_dict(m["scenes"][0])
        before = parse_image(first)
        verdict = judge_edit(before, parse_image(second), m["ops"][0], pronoun=len(scene.objects) == 1)
        ok.append(before.matches(scene) and verdict.correct)
        parts_ok.append((before.matches(scene), verdict.correct))
    print(f"stories (first image exact, edit correct): {parts_ok} in {time.time() - t0:.0f} s")
    assert sum(ok) >= 7, ok


def test_tiny_llm_turns_image_rows_and_columns_fast_enough(tmp_path):
    """The tiny parts' RoPE base leaves IL-RoPE's row and column axes a frequency of at least 0.5 rad per grid
    cell for the recipes' head size (32): with the usual base of 10000 the fastest column frequency is 0.32 rad,
    and a generated token cannot single out the same cell of a condition image (editing learns far slower)."""
    from transformers import AutoModelForCausalLM

    from mogao.model.backbone import MoTBackbone
    from mogao.model.tiny import save_tiny_llm

    spec = TinySpec()
    path = save_tiny_llm(tmp_path / "llm", vocab_size=64, hidden_size=128, heads=4, kv_heads=2, layers=1,
                         rope_theta=spec.rope_theta)
    rope = MoTBackbone(AutoModelForCausalLM.from_pretrained(path)).rope
    for axis in (1, 2):  # H, W
        assert float(rope.inv_freq[rope.axes == axis].max()) >= 0.5
