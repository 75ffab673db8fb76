"""`mogao data ...`: data set tools.

    mogao data check FILE.jsonl|DATA_DIR [--tokenizer DIR] [--fix [--out CLEAN.jsonl]] [--max-line-bytes N]
                     [--max-file-bytes N] [--max-image-bytes N]
        validate a data set (a JSONL file or a prepared folder): a summary (samples, images, generation
        targets, text tokens with a tokenizer, images per sample, resolutions) and every problem with file, line
        and field; --fix writes the good samples of a JSONL file to a new file (default FILE.clean.jsonl) and a
        report of what was dropped and why
    mogao data prepare FILE.jsonl --out DATA_DIR [--shard-size N] [--max-image-bytes N]
        a JSONL file (image paths relative to it) -> memory-mapped Arrow shards with the images' bytes, for
        training on large data sets (`--data.path=DATA_DIR`); every line and image checked, bad ones reported and
        left out; resumable: run the same command again after an interruption
    mogao data import llava FILE.json --out OUT.jsonl
        LLaVA / ShareGPT-style chat JSON with <image> placeholders -> samples (answers carry loss)
    mogao data import captions DIR --out OUT.jsonl
        a folder of image + caption pairs (cat.png + cat.txt) -> text-to-image samples

Size limits (a line, a file, an image file, a caption) are named in the message that reports them; the --max-*
flags raise them. Images are read from regular files only (never a FIFO or a device). What is printed from a
data file (paths, text) has its control characters escaped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mogao.data.images import MAX_IMAGE_BYTES
from mogao.data.importers import MAX_CAPTION_BYTES, MAX_IMPORT_BYTES
from mogao.data.prepared import SHARD_SIZE
from mogao.data.samples import MAX_FILE_BYTES, MAX_LINE_BYTES
from mogao.errors import ConfigError, DataError


def _check(path: str, tokenizer: str | None, do_fix: bool, out: str | None, limits: dict[str, int]) -> int:
    from mogao.data.check import fix, printable, summarise

    tok = None
    if tokenizer is not None:
        from mogao.model.io import load_tokenizer, resolve_checkpoint

        tok = load_tokenizer(resolve_checkpoint(tokenizer, "tokenizer"))  # (never runs a folder's own code)
    summary = summarise(path, tokenizer=tok, **limits)
    for p in summary.problems:
        print(printable(p))
    for line in summary.lines():
        print(printable(line))
    if do_fix:
        cleaned, report, kept, dropped = fix(path, out, **limits)
        print(printable(f"wrote {cleaned} ({kept} samples kept, {dropped} dropped; reasons in {report}); {path} "
                        "is unchanged"))
        return 0
    if summary.problems:
        print(printable(f"{len(summary.problems)} problem(s) in {path}; `mogao data check {path} --fix` writes a "
                        "copy without them"), file=sys.stderr)
        return 1
    return 0


def _import(kind: str, source: str, out: str, limits: dict[str, int]) -> int:
    from mogao.data.check import printable
    from mogao.data.importers import captions_to_samples, llava_to_samples, write_jsonl

    src, dst = Path(source).expanduser(), Path(out).expanduser()
    if dst.exists() and (dst.resolve() == src.resolve() or dst.is_dir()):
        what = "the input file" if dst.resolve() == src.resolve() else "a folder"
        raise DataError(f"--out is {what}; write the samples to a new file", file=str(dst))
    if kind == "llava":
        samples = llava_to_samples(src, dst, max_file_bytes=limits["max_file_bytes"])
    else:
        samples = captions_to_samples(src, dst, max_caption_bytes=limits["max_caption_bytes"])
    write_jsonl(samples, dst)
    images = sum(1 for s in samples for seg in s["segments"] if "image" in seg)
    print(printable(f"wrote {out}: {len(samples)} samples, {images} images; check it with `mogao data check {out}`"))
    return 0


def _prepare(path: str, out: str, shard_size: int, progress: bool, limits: dict[str, int]) -> int:
    from mogao.data.check import printable
    from mogao.data.prepared import prepare

    summary = prepare(path, out, shard_size=shard_size, progress=progress, **limits)
    for line in summary.lines():
        print(printable(line))
    print(printable(f"train on it with --data.path={out}; `mogao data check {out}` summarises it"))
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mogao data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    check = sub.add_parser("check", help="validate and summarise a JSONL data set or a prepared folder; --fix "
                                          "writes a cleaned copy of a JSONL file")
    check.add_argument("file")
    check.add_argument("--tokenizer", help="tokenizer directory: also count text tokens")
    check.add_argument("--fix", action="store_true", help="write the valid samples to a new file (never in place)")
    check.add_argument("--out", help="with --fix: the cleaned file (default: FILE.clean.jsonl next to FILE)")
    check.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                       help=f"longest line accepted (default {MAX_LINE_BYTES})")
    check.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES,
                       help=f"largest file accepted (default {MAX_FILE_BYTES})")
    check.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                       help=f"largest image file accepted (default {MAX_IMAGE_BYTES})")
    prep = sub.add_parser("prepare", help="convert a JSONL data set to memory-mapped shards for training at scale")
    prep.add_argument("file", help="the JSONL sample file (also what `mogao data import` writes)")
    prep.add_argument("--out", required=True, help="the folder to write (new, or an unfinished run to resume)")
    prep.add_argument("--shard-size", type=int, default=SHARD_SIZE,
                      help=f"input lines per shard (default {SHARD_SIZE}); a rerun resumes at a shard boundary")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                      help=f"longest line accepted (default {MAX_LINE_BYTES})")
    prep.add_argument("--max-file-bytes", type=int, default=MAX_FILE_BYTES,
                      help=f"largest file accepted (default {MAX_FILE_BYTES})")
    prep.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES,
                      help=f"largest image file accepted (default {MAX_IMAGE_BYTES})")
    imp = sub.add_parser("import", help="convert another data set layout to JSONL samples")
    imp.add_argument("kind", choices=["llava", "captions"])
    imp.add_argument("source", help="llava: the chat JSON file; captions: the folder of image + .txt pairs")
    imp.add_argument("--out", required=True, help="the JSONL file to write (image paths relative to it; never "
                                                  "the input)")
    imp.add_argument("--max-file-bytes", type=int, default=MAX_IMPORT_BYTES,
                     help=f"llava: largest chat file accepted (default {MAX_IMPORT_BYTES})")
    imp.add_argument("--max-caption-bytes", type=int, default=MAX_CAPTION_BYTES,
                     help=f"captions: largest caption file accepted (default {MAX_CAPTION_BYTES})")
    args = ap.parse_args(argv)
    try:
        if args.verb == "check":
            if args.out and not args.fix:
                ap.error("--out needs --fix")
            return _check(args.file, args.tokenizer, args.fix, args.out,
                          {"max_line_bytes": args.max_line_bytes, "max_file_bytes": args.max_file_bytes,
                           "max_image_bytes": args.max_image_bytes})
        if args.verb == "prepare":
            return _prepare(args.file, args.out, args.shard_size, not args.no_progress,
                            {"max_line_bytes": args.max_line_bytes, "max_file_bytes": args.max_file_bytes,
                             "max_image_bytes": args.max_image_bytes})
        return _import(args.kind, args.source, args.out,
                       {"max_file_bytes": args.max_file_bytes, "max_caption_bytes": args.max_caption_bytes})
    except (DataError, ConfigError) as e:
        from mogao.data.check import printable

        print(f"mogao data: error: {printable(e)}", file=sys.stderr)
        return 1
