"""`mogao data ...`: data set tools.

    mogao data check FILE.jsonl [--tokenizer DIR] [--fix [--out CLEAN.jsonl]]
        validate a data set: a summary (samples, images, generation targets, text tokens with a tokenizer,
        images per sample, resolutions) and every problem with file, line and field; --fix writes the good
        samples to a new file (default FILE.clean.jsonl) and a report of what was dropped and why
    mogao data import llava FILE.json --out OUT.jsonl
        LLaVA / ShareGPT-style chat JSON with <image> placeholders -> samples (answers carry loss)
    mogao data import captions DIR --out OUT.jsonl
        a folder of image + caption pairs (cat.png + cat.txt) -> text-to-image samples
"""

from __future__ import annotations

import argparse
import sys

from mogao.errors import DataError


def _check(path: str, tokenizer: str | None, do_fix: bool, out: str | None) -> int:
    from mogao.data.check import fix, summarise

    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        from mogao.model.mogao import resolve_checkpoint

        tok = AutoTokenizer.from_pretrained(resolve_checkpoint(tokenizer, "tokenizer"))
    summary = summarise(path, tokenizer=tok)
    for p in summary.problems:
        print(p)
    for line in summary.lines():
        print(line)
    if do_fix:
        cleaned, report, kept, dropped = fix(path, out)
        print(f"wrote {cleaned} ({kept} samples kept, {dropped} dropped; reasons in {report}); {path} is unchanged")
        return 0
    if summary.problems:
        print(f"{len(summary.problems)} problem(s) in {path}; `mogao data check {path} --fix` writes a copy "
              "without them", file=sys.stderr)
        return 1
    return 0


def _import(kind: str, source: str, out: str) -> int:
    from mogao.data.importers import captions_to_samples, llava_to_samples, write_jsonl

    samples = llava_to_samples(source, out) if kind == "llava" else captions_to_samples(source, out)
    write_jsonl(samples, out)
    images = sum(1 for s in samples for seg in s["segments"] if "image" in seg)
    print(f"wrote {out}: {len(samples)} samples, {images} images; check it with `mogao data check {out}`")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mogao data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    check = sub.add_parser("check", help="validate and summarise a JSONL data set; --fix writes a cleaned copy")
    check.add_argument("file")
    check.add_argument("--tokenizer", help="tokenizer directory: also count text tokens")
    check.add_argument("--fix", action="store_true", help="write the valid samples to a new file (never in place)")
    check.add_argument("--out", help="with --fix: the cleaned file (default: FILE.clean.jsonl next to FILE)")
    imp = sub.add_parser("import", help="convert another data set layout to JSONL samples")
    imp.add_argument("kind", choices=["llava", "captions"])
    imp.add_argument("source", help="llava: the chat JSON file; captions: the folder of image + .txt pairs")
    imp.add_argument("--out", required=True, help="the JSONL file to write (image paths relative to it)")
    args = ap.parse_args(argv)
    try:
        if args.verb == "check":
            if args.out and not args.fix:
                ap.error("--out needs --fix")
            return _check(args.file, args.tokenizer, args.fix, args.out)
        return _import(args.kind, args.source, args.out)
    except DataError as e:
        print(f"mogao data: error: {e}", file=sys.stderr)
        return 1
