"""Evaluation: programmatic judges of the built-in worlds and suites that generate with a model and score it.

- `shapes_judge`: parse a shapes-world image into objects; GenEval-style category checks.
- `digits_judge`: digit classifier accuracy and FID with a small CNN's features, fitted on real digits.
- `text_judge`: normalised exact match of answers.
- `edit_judge`: did a multi-turn edit change what it was told and keep everything else.
- `suites.run_suite`: the shapes, digits, vqa and interleaved suites; `generation`: the single place that asks
  a model to generate; `cli`: `mogao eval`.
- `export.export_benchmark`: a benchmark's generations in the layout its own scorer reads (`scorer_layouts`:
  GenEval, DPG-Bench, ImgEdit, GEdit-Bench, ISG-Bench), resumable; `mogao eval --export`.
"""

from mogao.eval.suites import DEFAULT_N, SUITES, run_suite

__all__ = ["DEFAULT_N", "SUITES", "run_suite"]
