"""`mogao eval`: run evaluation suites on a saved model (or an untrained baseline), print a table per suite and
write results.json.

    mogao eval --ckpt runs/demo/2-t2i/model --suite shapes --suite digits --out results.json
    mogao eval --ckpt runs/demo/3-interleaved/model --suite all --n 16 --seed 1
    mogao eval --untrained --suite all --out untrained.json

results.json holds, per suite, the scores of every category (all / held-out / seen, with counts), the judges'
descriptions, the generation settings, the wall time and every judged item; and at the top the checkpoint,
`n` and `seed`. Bad arguments, a missing or invalid checkpoint, or an unknown suite raise ConfigError
(`mogao` prints it and exits with status 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from mogao.errors import ConfigError
from mogao.eval.suites import DEFAULT_N, SUITES, run_suite


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
    ap.add_argument("--steps", type=int, default=20, help="Euler steps per image (default 20)")
    ap.add_argument("--shift", type=float, default=None,
                    help="σ schedule shift of the sampler (default: the model's training shift, as mogao generate)")
    ap.add_argument("--cfg", type=float, help="guidance scale (default per suite: 3 for t2i, 2 for edits)")
    ap.add_argument("--image-size", type=int, default=32, help="generated image side in pixels (default 32)")
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per generation call (default 16)")
    ap.add_argument("--cache-dir", help="where the digits judge's network is cached (default ~/.cache/mogao)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch (default 1: fastest for tiny models, and immune to a busy machine's "
                         "thread contention; raise it for large models on CPU)")
    ap.add_argument("--out", help="write the results as JSON to this file")
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
            res = run_suite(model, tok, name, args.n, args.seed, steps=args.steps, cfg=args.cfg,
                            image_size=args.image_size, batch_size=args.batch_size, cache_dir=args.cache_dir,
                            shift=args.shift,
                            progress=lambda done, total, task=task: bar.update(task, completed=done, total=total))
            res["wall_s"] = round(time.perf_counter() - start, 2)
            out["suites"][name] = res
            out["judges"].update(res["judge"])
    return out


def main(argv: list[str] | None = None) -> int:
    """`mogao eval ...`: returns 0; raises ConfigError for bad arguments (the `mogao` entry point exits 2)."""
    args = build_parser().parse_args(argv)
    results = evaluate(args)
    print_tables(results)
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1, default=float))
        print(f"wrote {path}")
    return 0
