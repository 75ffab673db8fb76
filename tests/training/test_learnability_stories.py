"""Learnability (DESIGN §8) of free-running stories: a tiny model memorises 8 two-turn stories and tells them again
through one `GenerationSession` (what the learnability tests share and why: `learnability.py`). A file of its own
so that the test runners can run it beside the other learnability tests.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from learnability import IMAGE_SIZE, NO_GUIDANCE, SAMPLING, STEPS, memorise
from PIL import Image

from mogao.data.builtin import make_builtin
from mogao.data.builtin.shapes import Scene
from mogao.eval.edit_judge import judge_edit
from mogao.eval.shapes_judge import parse_image
from mogao.inference import GenerationSession

pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_turn_stories_free_running(learn_parts):
    """8 two-turn stories ("Draw ..." -> image -> "Now ..." -> image), generated free-running in one session:
    the model itself begins each image, the second turn edits the model's own first image. Correct = the first
    image shows its caption's scene exactly and the edit judge accepts the second turn: >= 7/8."""
    src = make_builtin("story", n=8, seed=0, image_size=IMAGE_SIZE, max_objects=2)
    samples = [{"id": s["id"], "segments": s["segments"][:4]} for s in src.samples]
    t0 = time.time()
    model = memorise(learn_parts, samples, steps=STEPS["story"])
    texts = [[s["segments"][0]["text"], s["segments"][2]["text"]] for s in samples]
    session = GenerationSession(model, learn_parts["tok"], len(samples), replace(SAMPLING, max_images=1), NO_GUIDANCE)
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
