"""`mogao checkpoint consolidate`: turn a training checkpoint - a sharded (distributed) checkpoint directory
written by `MoTFSDP2Strategy`/`MoTFSDPStrategy`, or a full `.ckpt` file - into a saved model directory
(`model.safetensors` + `mogao_config.json` + the tokenizer), loadable with `MogaoModel.from_pretrained` and by
`mogao generate --ckpt DIR`.

    mogao checkpoint consolidate RUN_OR_CKPT --out DIR [--tokenizer DIR] [--dtype bfloat16] [--overwrite]

RUN_OR_CKPT is a checkpoint (directory or file) or a run directory, whose newest valid checkpoint is used
(`<run>/checkpoints/`, as `--ckpt_path=last` picks). Runs on one process, no GPU and no process group: the
model is built on the meta device from the architecture the strategy stored in the checkpoint, allocated once
on the CPU, and the shards are read into it (`torch.distributed.checkpoint`, resharding to one rank). Peak
memory is one copy of the weights in their saved dtype; the optimizer state is never read.

A checkpoint may come from elsewhere: it is read weights-only and its shard index is checked before torch
opens it (`mogao.training.checkpointing.check_checkpoint`), so it cannot run code; every weight must have the
shape the stored architecture gives it. `--out` must be new or empty (`--overwrite` replaces a model folder
saved there before), and the folder is written as one unit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from mogao.errors import ConfigError
from mogao.model.io import save_model_directory
from mogao.training.checkpointing import (
    SHARDED_META,
    CheckpointError,
    check_checkpoint,
    checkpoint_candidates,
    load_checkpoint_file,
)
from mogao.training.strategies import ARCHITECTURE_KEY

__all__ = ["consolidate", "find_checkpoint", "load_trained_model", "main"]

MODEL_PREFIX = "model."  # the MogaoModel's keys inside the LightningModule's state dict


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


def _metadata(ckpt: Path) -> dict[str, Any]:
    # weights-only (the config classes checkpoints hold are registered safe globals); a sharded checkpoint's
    # shard index is checked here too, before torch's reader unpickles it
    check_checkpoint(ckpt)
    path = ckpt / SHARDED_META if ckpt.is_dir() else ckpt
    meta = load_checkpoint_file(path, mmap=not ckpt.is_dir())
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"holds a {type(meta).__name__}, not a Lightning checkpoint")
    return meta


def _first_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def load_trained_model(ckpt: Path, dtype: torch.dtype | None = None):
    """(MogaoModel with the checkpoint's weights, checkpoint metadata) for a checkpoint `find_checkpoint`
    accepted."""
    from mogao.model.mogao import ModelConfig, MogaoModel, TimestepSampling

    meta = _metadata(ckpt)
    arch = meta.get(ARCHITECTURE_KEY)
    if arch is None:
        raise ConfigError(f"'{ckpt}' has no '{ARCHITECTURE_KEY}' entry: it was not written by a mogao "
                          "sharding strategy (MoTFSDP2Strategy / MoTFSDPStrategy); a model trained without one "
                          "is saved as a model directory at the end of fit (<run>/model)")
    mc = dict(arch["model"])
    mc["timestep_sampling"] = TimestepSampling(**mc.get("timestep_sampling", {}))
    mc["vocab_size"] = None  # the saved LLM config has the final size
    with torch.device("meta"):
        model = MogaoModel.from_configs(ModelConfig(**mc), arch["llm_config"], arch["vit_config"],
                                        arch["autoencoder_config"])
    model.to_empty(device="cpu")  # (non-persistent buffers are not saved either: from_pretrained rebuilds them)
    own = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    if ckpt.is_dir():
        import torch.distributed.checkpoint as dcp

        try:  # (torch compares each shard's shape with the architecture's)
            dcp.load({"state_dict": own}, checkpoint_id=str(ckpt), no_dist=True)
        except Exception as e:  # noqa: BLE001 - torch's reader wraps every failure in its own types
            raise CheckpointError(ckpt, f"its shards do not load into the stored architecture ({_first_line(e)})"
                                  ) from e
    else:
        saved = meta.get("state_dict", {})
        missing = sorted(k for k in own if k not in saved)
        if missing:
            raise CheckpointError(ckpt, f"lacks model weights, e.g. {missing[:3]}")
        wrong = [f"{k} {tuple(saved[k].shape)} (the architecture needs {tuple(v.shape)})" for k, v in own.items()
                 if not torch.is_tensor(saved[k]) or saved[k].shape != v.shape]
        if wrong:  # copy_ would broadcast a smaller tensor silently
            raise CheckpointError(ckpt, f"{len(wrong)} weight(s) of the wrong shape, e.g. {'; '.join(wrong[:3])}")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(saved[k])
    if dtype is not None:
        model.to(dtype)
    return model.eval(), meta


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


def consolidate(source: str | Path, out: str | Path, tokenizer: str | None = None,
                dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write the model of checkpoint (or run) `source` as a saved model directory `out`; returns `out`.

    The tokenizer is the one the run trained with (`model.init_args.tokenizer` in the checkpoint's
    hyper-parameters) unless `tokenizer` names another directory. `out` must be new or empty unless
    `overwrite` (which replaces a model folder saved there, never another folder).
    """
    from transformers import AutoTokenizer

    from mogao.model.mogao import resolve_checkpoint

    d = Path(out).expanduser()
    ckpt = find_checkpoint(source)
    check_output_dir(d, overwrite, [ckpt] + ([Path(tokenizer).expanduser()] if tokenizer else []))
    model, meta = load_trained_model(ckpt, dtype)
    tok_path = tokenizer or (meta.get("hyper_parameters") or {}).get("tokenizer")
    if tok_path is None:
        raise ConfigError(f"'{ckpt}' does not name its tokenizer: give --tokenizer DIR")
    tok_dir = resolve_checkpoint(str(tok_path), "tokenizer")
    check_output_dir(d, overwrite, [ckpt, tok_dir])
    tok = AutoTokenizer.from_pretrained(tok_dir)
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
    c.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the one the run used)")
    c.add_argument("--dtype", default=None, help="cast the weights, e.g. bfloat16 (default: as saved)")
    c.add_argument("--overwrite", action="store_true", help="replace the model saved in --out before (a folder "
                                                            "that is not empty is refused otherwise)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = consolidate(args.source, args.out, args.tokenizer, _dtype(args.dtype), args.overwrite)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved the consolidated model to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
