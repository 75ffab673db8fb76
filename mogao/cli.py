"""The `mogao` console script.

    mogao fit --config RECIPE.yaml [--key.sub=value ...]    train one stage (LightningCLI; --print_config)
    mogao validate --config RECIPE.yaml [--ckpt_path ...]   validate a stage
    mogao curriculum CURRICULUM.yaml [--out DIR]            run the stages in order, resumable
    mogao list                                              the shipped recipes, one line each
    mogao demo [--out DIR]                                  the tiny curriculum on CPU with an HTML report
    mogao data check FILE.jsonl                             validate a data set: every problem with file, line, field
    mogao data prepare FILE.jsonl --out DATA_DIR            memory-mapped shards for large data sets (--data.path=DIR)
    mogao generate | chat | eval | lora | checkpoint | export ...   see `mogao VERB --help`

A recipe may be given as a path or by its name under recipes/ (e.g. `tiny/t2i`).

Every `fit` writes its checkpoints atomically (`mogao.training.checkpointing.AtomicCheckpointIO`, unless the
trainer is given another CheckpointIO plugin), saves `last.ckpt` and stops cleanly on SIGTERM / SIGUSR1
(`callbacks.preemption.PreemptionCheckpoint`; exit status 128 + the signal) and saves `on_exception.ckpt` on
a crash (`callbacks.preemption.CrashCheckpoint`). `--ckpt_path=last` resumes from the newest checkpoint of the
run that loads and validates, saying which one when `last.ckpt` is missing or damaged, and starts from
scratch when none does. As Lightning does for any fit with an on-exception checkpoint, a `fit` without
`--ckpt_path` continues a run directory that holds checkpoints; use a new `--trainer.default_root_dir` to
start over.
"""

from __future__ import annotations

import argparse
import signal
import sys

from mogao.errors import ConfigError, MogaoError, printable
from mogao.recipes import TRAINER_VERBS, build_cli, list_recipes, resolve_recipe, rewrite_config_args

# verbs served by their own module's `main(argv) -> int` (imported only when used): verb -> (module, help)
MODULE_VERBS = {
    "generate": ("mogao.inference.cli:generate_main", "generate text and images from a prompt (HTML page + PNGs)"),
    "chat": ("mogao.inference.cli:chat_main", "a multi-turn terminal session that saves images as they are made"),
    "eval": ("mogao.eval.cli:main", "run an evaluation suite on a checkpoint (shapes, digits, vqa, interleaved)"),
    "lora": ("mogao.lora.cli:main", "LoRA adapters: merge into full weights, inspect"),
    "checkpoint": ("mogao.training.consolidate:main", "checkpoint tools: consolidate a sharded checkpoint"),
    "data": ("mogao.data.cli:main", "data set tools: check (validate, summarise, --fix), prepare, import"),
    "export": ("mogao.bagel.cli:main", "write a model in BAGEL's published layout (LoRA merged if given)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except ConfigError as e:
        print(f"mogao: error: {printable(e)}", file=sys.stderr)
        return 2
    except MogaoError as e:  # bad data, a diverged run: the message says what and where (escaped: it quotes files)
        print(f"mogao: error: {printable(e)}", file=sys.stderr)
        return 1
    except SystemExit as e:
        status = _signal_exit_status(e)
        if status is None:
            raise
        return status
    except Exception as e:
        # Lightning's own word for a trainer configuration that cannot work (e.g. conflicting flags)
        lightning_exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
        if lightning_exceptions is None or not isinstance(e, lightning_exceptions.MisconfigurationException):
            raise
        print(f"mogao: error: {printable(e)}", file=sys.stderr)
        return 2


def _signal_exit_status(e: SystemExit) -> int | None:
    """128 + the signal for a run that Lightning or `PreemptionCheckpoint` stopped on a signal (after saving a
    checkpoint), as if the signal had killed it; None for any other exit. (Lightning's own SIGTERM stop exits
    with status 0.)"""
    lightning_exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    if lightning_exceptions is None or not isinstance(e, lightning_exceptions.SIGTERMException):
        return None  # (without Lightning imported, nothing was trained)
    return e.code if isinstance(e.code, int) and e.code else 128 + signal.SIGTERM


def _main(argv: list[str]) -> int:
    if argv[:1] and argv[0] in TRAINER_VERBS:
        build_cli(rewrite_config_args(argv))
        return 0
    if argv[:1] and argv[0] in MODULE_VERBS:
        from importlib import import_module

        module, func = MODULE_VERBS[argv[0]][0].split(":")
        return int(getattr(import_module(module), func)(argv[1:]) or 0)
    if argv[:1] == ["demo"]:
        from mogao.demo import main as demo_main

        demo_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="mogao", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    for verb in TRAINER_VERBS:
        sub.add_parser(verb, help=f"LightningCLI {verb} (see `mogao {verb} --help`)", add_help=False)
    sub.add_parser("demo", help="the tiny curriculum on CPU with an HTML report", add_help=False)
    for verb, (_, help_text) in MODULE_VERBS.items():
        sub.add_parser(verb, help=help_text, add_help=False)
    cur = sub.add_parser("curriculum", help="run the stages of a curriculum in order (resumable)")
    cur.add_argument("file", help="curriculum YAML (path or name under recipes/)")
    cur.add_argument("--out", help="run directory (default: the file's `out`)")
    cur.add_argument("--fresh", action="store_true", help="start over: ignore finished stages and checkpoints")
    cur.add_argument("overrides", nargs="*", help="extra --key=value overrides applied to every stage")
    sub.add_parser("list", help="list the shipped recipes")
    args, rest = ap.parse_known_args(argv)
    if args.verb == "list":
        rows = list_recipes()
        width = max((len(n) for n, _ in rows), default=0)
        for name, desc in rows:
            print(f"{name:<{width}}  {desc}")
        return 0
    if args.verb == "curriculum":
        from mogao.curriculum import run_curriculum

        run_curriculum(resolve_recipe(args.file), out=args.out, fresh=args.fresh, overrides=args.overrides + rest)
        return 0
    if rest:
        ap.error(f"unrecognised arguments: {' '.join(rest)}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
