"""`mogao eval`: run evaluation suites on a saved model (or an untrained baseline), print a table per suite and
write results.json.

    mogao eval --ckpt runs/demo/2-t2i/model --suite shapes --suite digits --out results.json
    mogao eval --ckpt runs/demo/3-interleaved/model --suite all --n 16 --seed 1
    mogao eval --untrained --suite all --out untrained.json

With --export BENCH it instead writes a benchmark's generations in the layout of the benchmark's own scorer
(GenEval, DPG-Bench, ImgEdit, GEdit-Bench, ISG-Bench; `mogao.eval.export`), from the benchmark's own input
file, and prints the scorer command to run next:

    mogao eval --ckpt MODEL --export geneval --prompts evaluation_metadata.jsonl --out exp/geneval \
        [--samples N] [--seed S] [--resolution R] [--cfg G] [--cfg-image G] [--batch-size B] [--steps N]

An interrupted export continues where it stopped when run again with the same options (and gives the same
files); exit status 1 when an item could not be made (listed, and recorded in the export's manifest.json).

results.json holds, per suite, the scores of every category (all / held-out / seen, with counts), the judges'
descriptions, the generation settings, the wall time and every judged item; and at the top the checkpoint,
`n` and `seed`. Bad arguments, a missing or invalid checkpoint, or an unknown suite raise ConfigError
(`mogao` prints it and exits with status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from mogao.errors import ConfigError
from mogao.eval.scorer_layouts import BENCHMARKS
from mogao.eval.suites import DEFAULT_N, SUITES, run_suite
from mogao.inference.guidance import GUIDANCE_MODES, RENORM_TYPES

SUITE_STEPS = 20  # Euler steps per image of the suites (an export's default: 30, as `mogao generate`)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mogao eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="saved model directory (MogaoModel.save_pretrained, with its tokenizer)")
    src.add_argument("--untrained", action="store_true",
                     help="evaluate a random model built from a tiny recipe's parts (a baseline)")
    ap.add_argument("--recipe", default="tiny/t2i", help="with --untrained: the recipe whose parts build the model")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's, or the recipe's)")
    ap.add_argument("--suite", action="append", metavar="NAME",
                    help=f"{' | '.join(SUITES)} | all; repeat for several (default: all)")
    ap.add_argument("--n", type=int, help="items per suite (default per suite: "
                    + ", ".join(f"{k} {v}" for k, v in DEFAULT_N.items()) + ")")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and the noise (default 0)")
    ap.add_argument("--steps", type=int, help=f"Euler steps per image (default {SUITE_STEPS}; with --export 30)")
    ap.add_argument("--shift", type=float, default=None,
                    help="σ schedule shift of the sampler (default: the model's training shift, as mogao generate)")
    ap.add_argument("--cfg", type=float, help="guidance scale (default per suite: 3 for t2i, 2 for edits; with "
                    "--export: the text scale γ, default 7.5)")
    ap.add_argument("--image-size", type=int, default=32, help="generated image side in pixels (default 32)")
    ap.add_argument("--batch-size", type=int, help="contexts per generation call (default 16; with --export 8)")
    ap.add_argument("--cache-dir", help="where the digits judge's network is cached (default ~/.cache/mogao)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (default 1: fastest for tiny models, and immune to a busy machine's "
                         "thread contention; raise it for large models on CPU)")
    ap.add_argument("--out", help="write the results as JSON to this file (with --export: the export folder)")
    ex = ap.add_argument_group("export for a benchmark's own scorer (mogao.eval.export)")
    ex.add_argument("--export", metavar="BENCH", help=" | ".join(BENCHMARKS))
    ex.add_argument("--prompts", help="the benchmark's own input: GenEval evaluation_metadata.jsonl, DPG-Bench's "
                    "folder of .txt prompts, ImgEdit basic_edit.json, a local JSONL/JSON of GEdit-Bench's rows, "
                    "ISG-Bench.jsonl")
    ex.add_argument("--images", help="root of the input images (ImgEdit: required, the source images; GEdit-Bench, "
                    "ISG-Bench: default the input file's folder)")
    ex.add_argument("--samples", type=int, help="images per prompt (GenEval default 4; DPG-Bench 4; else 1)")
    ex.add_argument("--resolution", type=int, help="image side in pixels, a multiple of the model's VAE patch "
                    "(edits keep the source's aspect at the same area; default: the model's default size)")
    ex.add_argument("--cfg-image", type=float, default=1.5, help="condition-image guidance scale γ_img (default 1.5)")
    ex.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LO", "HI"),
                    help="σ range where guidance applies (default 0 1)")
    ex.add_argument("--cfg-mode", choices=GUIDANCE_MODES, default="mogao",
                    help="guidance branches and formula: mogao, or bagel for a BAGEL model (see mogao generate)")
    ex.add_argument("--cfg-renorm-type", choices=RENORM_TYPES, default="global",
                    help="what the guidance renormalisation measures (default global)")
    ex.add_argument("--max-images", type=int, default=4, help="ISG: most images in one answer (default 4)")
    ex.add_argument("--max-new-tokens", type=int, default=256, help="ISG: most text tokens in one answer (default 256)")
    ex.add_argument("--limit", type=int, help="only the first N items (a later run may raise or drop it)")
    ex.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    ex.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                    help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    return ap


def parse_suites(names: list[str] | None) -> list[str]:
    """The suites to run, in `SUITES` order; ConfigError naming an unknown one."""
    if not names:
        return list(SUITES)
    chosen: set[str] = set()
    for item in names:
        for name in filter(None, (s.strip() for s in item.split(","))):
            if name == "all":
                chosen.update(SUITES)
            elif name in SUITES:
                chosen.add(name)
            else:
                raise ConfigError(f"--suite {name!r} is unknown; valid suites: {', '.join(SUITES)}, all")
    return [s for s in SUITES if s in chosen]


def _fmt(category: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if category.startswith("fid") else f"{value:.3f}"


def print_tables(results: dict[str, Any], console: Any = None) -> None:
    """One rich table per suite: category, all, held-out, seen, n."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for name, res in results["suites"].items():
        table = Table(title=f"{name}  (n={res['n']}, seed={res['seed']}, {res['wall_s']:.1f} s)",
                      title_justify="left")
        for col in ("category", "all", "held-out", "seen", "n (held-out/seen)"):
            table.add_column(col, justify="left" if col == "category" else "right")
        for cat, s in res["scores"].items():
            counts = f"{s['n']} ({s['n_held_out']}/{s['n_seen']})"
            table.add_row(cat, _fmt(cat, s["all"]), _fmt(cat, s["held_out"]), _fmt(cat, s["seen"]), counts)
        console.print(table)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, run the chosen suites with a progress bar, return the results."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mogao.eval.models import load_checkpoint, untrained_model

    suites = parse_suites(args.suite)
    steps = SUITE_STEPS if args.steps is None else args.steps
    batch_size = 16 if args.batch_size is None else args.batch_size
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads} is invalid; give a number >= 1")
    torch.set_num_threads(args.threads)
    if args.ckpt is None and not args.untrained:
        raise ConfigError("give --ckpt MODEL_DIR (a saved model) or --untrained (a random baseline)")
    if args.untrained:
        model, tok = untrained_model(args.recipe, tokenizer=args.tokenizer, seed=args.seed)
        checkpoint = f"untrained:{args.recipe}"
    else:
        model, tok = load_checkpoint(args.ckpt, args.tokenizer)
        checkpoint = str(args.ckpt)
    out: dict[str, Any] = {"checkpoint": checkpoint, "n": args.n, "seed": args.seed, "suites": {}, "judges": {}}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        for name in suites:
            task = bar.add_task(f"eval {name}", total=None)
            start = time.perf_counter()
            res = run_suite(model, tok, name, args.n, args.seed, steps=steps, cfg=args.cfg,
                            image_size=args.image_size, batch_size=batch_size, cache_dir=args.cache_dir,
                            shift=args.shift,
                            progress=lambda done, total, task=task: bar.update(task, completed=done, total=total))
            res["wall_s"] = round(time.perf_counter() - start, 2)
            out["suites"][name] = res
            out["judges"].update(res["judge"])
    return out


def export(args: argparse.Namespace) -> int:
    """`mogao eval --export`: load the model, export with a progress bar, print what was made and the scorer
    commands; 0, or 1 when an item could not be made."""
    import torch
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from mogao.errors import printable
    from mogao.eval.export import ExportOptions, export_benchmark
    from mogao.eval.models import load_checkpoint, untrained_model
    from mogao.eval.scorer_layouts import read_benchmark

    if args.export not in BENCHMARKS:
        raise ConfigError(f"--export {args.export!r} is unknown; valid benchmarks: {', '.join(BENCHMARKS)}")
    if args.suite or args.n is not None:
        raise ConfigError("--export makes a benchmark's files; --suite and --n belong to the built-in suites")
    if not args.prompts or not args.out:
        raise ConfigError("--export needs --prompts (the benchmark's own input file) and --out (the export folder)")
    if args.ckpt is None and not args.untrained:
        raise ConfigError("give --ckpt MODEL_DIR (a saved model) or --untrained (a random baseline)")
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads} is invalid; give a number >= 1")
    read_benchmark(args.export, args.prompts, args.images, args.samples)  # bad input: said before the model loads
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    opts = ExportOptions(
        benchmark=args.export, prompts=args.prompts, out=args.out, images=args.images, samples=args.samples,
        seed=args.seed, resolution=args.resolution, steps=30 if args.steps is None else args.steps, shift=args.shift,
        cfg=7.5 if args.cfg is None else args.cfg, cfg_image=args.cfg_image, cfg_interval=tuple(args.cfg_interval),
        cfg_mode=args.cfg_mode, cfg_renorm_type=args.cfg_renorm_type,
        max_images=args.max_images, max_new_tokens=args.max_new_tokens,
        batch_size=8 if args.batch_size is None else args.batch_size, limit=args.limit)
    if args.untrained:
        model, tok = untrained_model(args.recipe, tokenizer=args.tokenizer, seed=args.seed)
        name = f"untrained:{args.recipe}"
    else:
        model, tok = load_checkpoint(args.ckpt, args.tokenizer)
        name = str(Path(args.ckpt).expanduser().resolve())
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    unit = "answers" if args.export == "isg" else "images"
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(f"export {args.export}", total=None)
        result = export_benchmark(model, tok, opts, model_name=name,
                                  run_info={"device": str(device), "dtype": dtype, "threads": args.threads},
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
    rate = f", {result.images_per_s:.3f} images/s" if result.images_per_s else ""
    print(f"{result.items} items in {result.out}: {result.made} images made in {result.wall_s:.1f} s{rate}; "
          f"manifest: {result.out / 'manifest.json'}")
    for f in result.failures:
        print(f"FAILED {printable(f['key'])}" + (f" sample {f['sample']}" if "sample" in f else "")
              + f": {printable(f['error'])[:300]}", file=sys.stderr)
    if result.failures:
        print(f"{len(result.failures)} item(s) could not be made (recorded in the manifest); their files are "
              "missing, and a rerun tries them again", file=sys.stderr)
    elif not result.complete:
        print("the export is incomplete (--limit); run again without it to finish", file=sys.stderr)
    print("score it with the benchmark's own scorer (in its repository and environment):")
    for cmd in result.commands:
        print(f"  {cmd}")
    return 1 if result.failures else 0


def main(argv: list[str] | None = None) -> int:
    """`mogao eval ...`: returns 0 (an export with failures: 1); raises ConfigError for bad arguments (the
    `mogao` entry point exits 2)."""
    args = build_parser().parse_args(argv)
    if args.export is not None:
        return export(args)
    for flag in ("prompts", "images", "samples", "resolution", "limit", "device", "dtype"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--{flag} belongs to --export; the built-in suites do not take it")
    results = evaluate(args)
    print_tables(results)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=float))
        print(f"wrote {path}")
    return 0
