"""Exact-match judging of short answers, normalised as the training's exact-match validation does
(`mogao.training.exact_match.normalise_answer`): strip, lower-case, drop a trailing full stop, collapse
whitespace."""

from __future__ import annotations

from collections.abc import Sequence

from mogao.training.exact_match import normalise_answer

JUDGE_DESCRIPTION = ("vqa judge: exact match after normalising both answers (strip, lower-case, drop a trailing "
                     "full stop, collapse whitespace), as the training modules' exact-match validation")


def exact_match(answer: str, reference: str) -> bool:
    """Whether the answers agree after `normalise_answer`."""
    return normalise_answer(answer) == normalise_answer(reference)


def exact_match_rate(answers: Sequence[str], references: Sequence[str]) -> float:
    """Share of answers that exactly match their reference."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers but {len(references)} references")
    if not answers:
        raise ValueError("exact_match_rate needs at least one answer")
    return sum(exact_match(a, r) for a, r in zip(answers, references)) / len(answers)
