"""`mogao checkpoint consolidate`: turn a training checkpoint - a sharded (distributed) checkpoint directory
written by `MoTFSDP2Strategy`/`MoTFSDPStrategy`, or a full `.ckpt` file - into a saved model directory
(`model.safetensors` + `mogao_config.json` + the tokenizer), loadable with `mogao.model.io.load_model` and by
`mogao generate --ckpt DIR`.

    mogao checkpoint consolidate RUN_OR_CKPT --out DIR [--tokenizer DIR] [--dtype bfloat16] [--overwrite]

Without --tokenizer, the tokenizer is the one the run saved in its own folder (`<run>/model`, written at the end
of fit; the run folder is the one holding `checkpoints/`, or the checkpoint's own folder); a checkpoint never
chooses where it is read from (its hyper-parameters name a path that may be anywhere): without one there,
consolidating is refused with the path the checkpoint names, to pass as --tokenizer if you trust it.

RUN_OR_CKPT is a checkpoint (directory or file) or a run directory, whose newest valid checkpoint is used
(`<run>/checkpoints/`, as `--ckpt_path=last` picks). Runs on one process, no GPU and no process group: the
model is built on the meta device from the architecture the strategy stored in the checkpoint, allocated once
on the CPU, and the shards are read into it (`torch.distributed.checkpoint`, resharding to one rank). Peak
memory is one copy of the weights in their saved dtype; the optimizer state is never read.

A checkpoint may come from elsewhere: it is read weights-only and its shard index is checked before torch
opens it (`mogao.model.io.check_checkpoint`), so it cannot run code; every weight must have the shape the
stored architecture gives it, and it chooses no path that is read. `--out` must be new or empty (`--overwrite`
replaces a model folder saved there before), and the folder is written as one unit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mogao.errors import ConfigError, printable
from mogao.model.checkpoint_files import SHARDED_META, CheckpointError, check_checkpoint, load_checkpoint_file
from mogao.model.io import load_model, load_tokenizer, resolve_checkpoint, save_model_directory
from mogao.training.checkpointing import checkpoint_candidates

__all__ = ["consolidate", "find_checkpoint", "main"]


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint `path` names: itself when it is a checkpoint (sharded directory or file), else the newest
    valid checkpoint of the run directory `path` (in `checkpoints/` or directly inside)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"checkpoint or run directory not found: '{p}'")
    if p.is_file() or (p / SHARDED_META).is_file():
        return p  # named explicitly: read as given (loading reports what is wrong with it)
    problems = []
    for d in (p / "checkpoints", p):
        for cand in checkpoint_candidates(d):
            try:
                check_checkpoint(cand)
            except CheckpointError as e:
                problems.append(str(e))
                continue
            return cand
    more = f" ({'; '.join(problems)})" if problems else ""
    raise ConfigError(f"'{p}' is not a checkpoint and holds no usable *.ckpt in it or in its checkpoints/"
                      f"{more}")


def check_output_dir(out: Path, overwrite: bool, keep: list[Path]) -> None:
    """`out` must be new or empty unless `overwrite`, and never a folder the inputs live in."""
    target = out.resolve()
    for p in keep:
        p = p.resolve()
        if target == p or target in p.parents:
            raise ConfigError(f"--out '{out}' holds an input ({p}); write the model somewhere else")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out '{out}' is not empty; give a new folder, or --overwrite to replace a model "
                          "saved there")


def run_tokenizer(ckpt: Path) -> Path | None:
    """The tokenizer folder a run saved in its own folder - `<run>/model` with tokenizer files, where the run
    folder holds `checkpoints/CKPT`, or else is CKPT's own folder - or None."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    d = run / "model"
    return d if any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")) else None


def consolidate(source: str | Path, out: str | Path, tokenizer: str | None = None,
                dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write the model of checkpoint (or run) `source` as a saved model directory `out`; returns `out`.

    The tokenizer is `tokenizer` (a directory, or a hub id in the local cache), else the one the run saved in its
    own folder (`run_tokenizer`); the path a checkpoint's hyper-parameters name is never followed (it is only
    quoted when there is no tokenizer in the run's folder). `out` must be new or empty unless `overwrite` (which
    replaces a model folder saved there, never another folder).
    """
    d = Path(out).expanduser()
    ckpt = find_checkpoint(source)
    check_output_dir(d, overwrite, [ckpt] + ([Path(tokenizer).expanduser()] if tokenizer else []))
    model = load_model(ckpt, dtype=dtype).eval()  # checked and read weights-only
    tok_dir = resolve_checkpoint(tokenizer, "tokenizer") if tokenizer else run_tokenizer(ckpt)
    if tok_dir is None:
        # (checked: its hyper-parameters only, the file memory-mapped)
        meta = load_checkpoint_file(ckpt / SHARDED_META if ckpt.is_dir() else ckpt, mmap=not ckpt.is_dir())
        named = (meta.get("hyper_parameters") or {}).get("tokenizer") if isinstance(meta, dict) else None
        hint = (f" (it names '{printable(named)}': a checkpoint does not choose what is read, so pass "
                "--tokenizer with it if you trust that folder)" if named else "")
        raise ConfigError(f"no tokenizer in the run folder of '{ckpt}' (a fit saves one in <run>/model at its "
                          f"end): give --tokenizer DIR{hint}")
    check_output_dir(d, overwrite, [ckpt, tok_dir])
    tok = load_tokenizer(tok_dir)  # (never runs code the folder holds)
    return save_model_directory(model, tok, d)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"--dtype: '{name}' is not a floating-point torch dtype (bfloat16, float16, float32)")
    return value


def main(argv: list[str] | None = None) -> int:
    """`mogao checkpoint consolidate SOURCE --out DIR`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="mogao checkpoint", description="checkpoint tools")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="a sharded (or full) training checkpoint -> a saved model directory")
    c.add_argument("source", help="checkpoint directory/file, or a run directory (its newest valid checkpoint)")
    c.add_argument("--out", required=True, help="directory to write model.safetensors, mogao_config.json and "
                                                "the tokenizer to")
    c.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the one the run saved in <run>/model; the path a "
                        "checkpoint names is not followed)")
    c.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16 (default: as saved)")
    c.add_argument("--overwrite", action="store_true", help="replace the model saved in --out before (a folder "
                                                            "that is not empty is refused otherwise)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = consolidate(args.source, args.out, args.tokenizer, _dtype(args.dtype), args.overwrite)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {printable(e)}", file=sys.stderr)
        return 2
    print(printable(f"saved the consolidated model to {out}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
