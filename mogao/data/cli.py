"""`mogao data ...`: data set tools.

    mogao data check FILE.jsonl     validate a data set: every problem with file, line and field
"""

from __future__ import annotations

import argparse
import sys


def _check(path: str) -> int:
    from mogao.data import check_samples, load_samples

    problems = check_samples(path)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) in {path}", file=sys.stderr)
        return 1
    samples = load_samples(path)
    images = sum(1 for s in samples for seg in s.segments if hasattr(seg, "image"))
    targets = sum(1 for s in samples for seg in s.segments if getattr(seg, "generate", False))
    print(f"{path}: {len(samples)} samples, {images} images ({targets} generation targets), no problems")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mogao data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    check = sub.add_parser("check", help="validate a JSONL data set")
    check.add_argument("file")
    args = ap.parse_args(argv)
    if args.verb == "check":
        return _check(args.file)
    return 2
