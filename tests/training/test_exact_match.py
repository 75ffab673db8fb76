"""Exact-match validation's choice of questions (`mogao.training.exact_match`)."""

from __future__ import annotations


def test_exact_match_skips_questions_the_generation_loop_refuses():
    from mogao.data import samples_from_dicts
    from mogao.training.exact_match import question_answer

    ok, blank, ctrl = samples_from_dicts([
        {"segments": [{"text": "Is it red?", "loss": False}, {"text": "yes"}]},
        {"segments": [{"text": "   ", "loss": False}, {"text": "yes"}]},
        {"segments": [{"text": "Is it\x07 red?", "loss": False}, {"text": "yes"}]},
    ])
    assert question_answer(ok) == ([{"text": "Is it red?", "loss": False}], "yes")
    assert question_answer(blank) is None and question_answer(ctrl) is None
