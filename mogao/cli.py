"""The `mogao` console script.

    mogao demo [--out DIR] [--steps N]     tiny end-to-end training run on CPU (built-in shapes data)
    mogao data check FILE.jsonl            validate a data set: every problem with file, line and field
"""

from __future__ import annotations

import argparse
import sys


def _data_check(path: str) -> int:
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="mogao", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    sub.add_parser("demo", help="tiny end-to-end training run on CPU", add_help=False)
    data = sub.add_parser("data", help="data set tools")
    data_sub = data.add_subparsers(dest="data_verb", required=True)
    check = data_sub.add_parser("check", help="validate a JSONL data set")
    check.add_argument("file")
    if argv[:1] == ["demo"]:
        from mogao.demo import main as demo_main

        demo_main(argv[1:])
        return 0
    args = ap.parse_args(argv)
    if args.verb == "data" and args.data_verb == "check":
        return _data_check(args.file)
    return 2


if __name__ == "__main__":
    sys.exit(main())
