"""How long a bad configuration takes to be reported, in a fresh process (what a user sees) and in a process
that has already imported everything (the cost of the check itself).

    .venv/bin/python benchmarks/config_errors.py
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "recipe not found": ["fit", "--config", "tiny/no-such-recipe"],
    "unknown key": ["fit", "--config", "tiny/t2i", "--model.init_args.no_such_key=1"],
    "wrong type": ["fit", "--config", "tiny/t2i", "--trainer.max_steps=many"],
    "missing checkpoint": ["fit", "--config", "tiny/t2i", "--model.init_args.tiny=null",
                           "--model.init_args.tokenizer=/nowhere/tokenizer"],
}


def main() -> None:
    mogao = str(Path(sys.executable).parent / "mogao")
    print(f"{'case':<20} {'fresh process s':>16} {'warm, in-process s':>19}")
    from mogao.cli import main as cli_main
    from mogao.recipes import build_cli

    build_cli(["--config", "recipes/tiny/t2i.yaml"], run=False, instantiate=False)  # warm the imports
    for name, args in CASES.items():
        t0 = time.perf_counter()
        subprocess.run([mogao, *args], cwd=ROOT, capture_output=True)
        fresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            try:
                cli_main(args)
            except SystemExit:
                pass
        warm = time.perf_counter() - t0
        print(f"{name:<20} {fresh:>16.2f} {warm:>19.2f}")


if __name__ == "__main__":
    main()
