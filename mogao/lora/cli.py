"""`mogao lora ...`: LoRA adapter tools.

    mogao lora merge --base MODEL_DIR --adapter ADAPTER_DIR --out OUT_DIR [--overwrite]
        fold an adapter into its base: a full saved model (mogao.model.io.load_model loads it); OUT_DIR must
        be new or empty unless --overwrite
    mogao lora info ADAPTER_DIR
        print an adapter's spec, size and base model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mogao.errors import ConfigError, printable


def merge(base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Load `base`, put `adapter` on it, merge and save the full model to `out` (with the base's tokenizer
    files, when the base directory has them), written as one unit. `out` must be new or empty unless
    `overwrite` (which replaces a model saved there before, never another folder)."""
    from mogao.bagel.load import load_any_model
    from mogao.lora.adapter import _load_adapter, merge_lora
    from mogao.model.io import save_model_directory

    base, adapter, out = Path(base).expanduser(), Path(adapter).expanduser(), Path(out).expanduser()
    from mogao.training.consolidate import check_output_dir

    check_output_dir(out, overwrite, [base, adapter])
    model = load_any_model(base)
    tokenizer = None
    if (base / "tokenizer_config.json").is_file():
        from mogao.model.io import load_tokenizer

        tokenizer = load_tokenizer(base)  # (never runs code the folder holds)
    return save_model_directory(merge_lora(_load_adapter(model, adapter, base_name=base)), tokenizer, out)


def info(adapter: str | Path) -> dict:
    from mogao.lora.adapter import read_adapter_config

    meta = read_adapter_config(adapter)
    return {**meta, "spec": meta["spec"].to_dict()}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="mogao lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base model and save the full model")
    m.add_argument("--base", required=True, help="directory of the base mogao model the adapter was trained on")
    m.add_argument("--adapter", required=True, help="adapter directory (<run dir>/adapter)")
    m.add_argument("--out", required=True, help="directory for the merged model (new or empty)")
    m.add_argument("--overwrite", action="store_true", help="replace a model saved in --out before")
    i = sub.add_parser("info", help="print an adapter's spec and base")
    i.add_argument("adapter")
    args = ap.parse_args(argv)
    try:
        if args.verb == "merge":
            out = merge(args.base, args.adapter, args.out, args.overwrite)
            print(printable(f"merged {args.adapter} into {args.base}: {out}"))
        else:
            print(json.dumps(info(args.adapter), indent=2))
    except ConfigError as e:
        print(f"mogao lora: error: {printable(e)}", file=sys.stderr)
        return 1
    return 0
