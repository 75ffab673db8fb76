"""The embedded default: the tiny staged curriculum (understanding → text-to-image → interleaved) on built-in data,
on CPU, ending with an HTML report of what each stage learnt.

    python -m mogao.demo [--out runs/demo] [--fresh]     (the README's `make demo`)
    python -m mogao.demo --curriculum recipes/tiny/curriculum-long.yaml --out runs/demo-long   (`make demo-long`)

Interrupt it at any time and run the same command again: finished stages are skipped and the running one
resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mogao.recipes import RECIPES_DIR

CURRICULUM = RECIPES_DIR / "tiny" / "curriculum.yaml"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="mogao demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default runs/demo)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    ap.add_argument("--curriculum", type=Path, default=CURRICULUM,
                    help="curriculum file (default: the tiny curriculum; recipes/tiny/curriculum-long.yaml trains "
                         "the same stages three times longer)")
    ap.add_argument("--eval-n", type=int, default=None, metavar="N",
                    help="items per eval suite in the report's score table (default: mogao.report.EVAL_N)")
    ap.add_argument("--sample-steps", type=int, default=24, metavar="N",
                    help="Euler steps per image the report draws (default 24)")
    ap.add_argument("overrides", nargs="*", help="extra --key=value overrides for every stage")
    args, rest = ap.parse_known_args(argv)
    from transformers.utils import logging as hf_logging

    from mogao.curriculum import run_curriculum
    from mogao.report import write_report

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    run_curriculum(args.curriculum, out=args.out, fresh=args.fresh, overrides=args.overrides + rest)
    trained = time.perf_counter() - t0
    print("[demo] writing the report (sampling images and answers from each stage's model) ...")
    eval_n = None if args.eval_n is None else {**dict.fromkeys(("shapes", "vqa", "interleaved"), args.eval_n),
                                               "digits": max(2, args.eval_n)}  # (an FID needs two images)
    report = write_report(args.curriculum, args.out, eval_n=eval_n, steps=args.sample_steps)
    summary = json.loads((args.out / "report.json").read_text())
    summary["seconds_training"] = round(trained, 1)
    summary["seconds_total"] = round(time.perf_counter() - t0, 1)
    (args.out / "report.json").write_text(json.dumps(summary, indent=1))
    for st in summary["stages"]:
        vals = ", ".join(f"{k.removeprefix('val/')}={v:.3f}" for k, v in sorted(st["validation"].items()))
        print(f"[demo] {st['stage']:<14} {vals}")
    print(f"[demo] done in {summary['seconds_total']:.0f} s")
    print(f"[demo] report: {report.resolve()}")
    return report


if __name__ == "__main__":
    main()
