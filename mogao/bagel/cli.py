"""`mogao export bagel`: a model (a BAGEL folder fine-tuned in full, or a base and a LoRA adapter trained on it)
written in BAGEL's published layout, which BAGEL's own loading code reads.

    mogao export bagel MODEL --out DIR [--lora ADAPTER] [--dtype bfloat16]

MODEL is a BAGEL folder (as published, or exported before) or a mogao model folder saved from one (the `model/`
of a full fine-tuning run). With --lora the adapter is put on MODEL (it must be the base it was trained on: the
fingerprint is checked) and merged into the weights first. DIR must be new or empty; it is written beside its
final place and renamed into it. A BAGEL folder exported unchanged gives the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mogao.errors import ConfigError, MogaoError, printable

DTYPES = ("bfloat16", "float16", "float32")


def export(model_dir: str | Path, out: str | Path, lora: str | Path | None = None, dtype: str | None = None) -> Path:
    """Write `model_dir` (with `lora` merged in) as a BAGEL folder at `out`; returns `out`."""
    import torch

    from mogao.bagel.load import save_bagel_model
    from mogao.inference.inputs import load_model_dir
    from mogao.training.consolidate import check_output_dir

    src, out = Path(model_dir).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise ConfigError(f"model folder not found: '{src}'")
    keep = [src] + ([Path(lora).expanduser()] if lora else [])
    check_output_dir(out, False, keep)
    model, tokenizer = load_model_dir(src)  # (a BAGEL folder or a mogao model folder, with its tokenizer)
    if lora is not None:
        from mogao.lora.adapter import _load_adapter, merge_lora

        model = merge_lora(_load_adapter(model, Path(lora).expanduser(), base_name=src))
    return save_bagel_model(model, tokenizer, out, dtype=None if dtype is None else getattr(torch, dtype))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mogao export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="layout", required=True)
    b = sub.add_parser("bagel", help="BAGEL's published layout (llm_config.json, vit_config.json, ema.safetensors, "
                                     "ae.safetensors, tokenizer files)")
    b.add_argument("model", help="a BAGEL folder or a mogao model folder saved from one")
    b.add_argument("--out", required=True, help="folder to write (new or empty)")
    b.add_argument("--lora", default=None, help="adapter folder (<run>/adapter) to merge into the model first")
    b.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype of the model's tensors in ema.safetensors (default: as the model holds them)")
    args = ap.parse_args(argv)
    try:
        out = export(args.model, args.out, args.lora, args.dtype)
    except (ConfigError, MogaoError) as e:
        print(f"mogao export: error: {printable(e)}", file=sys.stderr)
        return 2
    print(printable(f"wrote {out} (BAGEL layout){' with ' + str(args.lora) + ' merged' if args.lora else ''}"))
    return 0
