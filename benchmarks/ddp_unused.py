"""What it costs to give DDP every trainable parameter in every step: the two ways, measured on the tiny recipes.

A batch of questions has no generation token, a text-to-image batch no ViT image: some trainable parameters take
no part in such a step. DDP then stops the run ("parameters that were not used in producing the loss") unless
either
  * all-paths:   the model runs every path in training, on zero rows where the batch has nothing for it
                 (`MogaoModel.forward`, the default), so every parameter is in every step's graph; or
  * find-unused: DDP searches the autograd graph for unused parameters after every forward
                 (`--trainer.strategy=ddp_find_unused_parameters_true`, with the model's paths as before).
This runs `torchrun --nproc-per-node=2 -m mogao.cli fit --config tiny/<recipe> --trainer.strategy=...` for each
variant (and "both": all paths and the search) in rotation, and prints the median training step time (from each
run's metrics.jsonl, validation and the first steps left out) as a markdown table naming the machine.

    python benchmarks/ddp_unused.py --steps 60 --repeats 2 --recipes t2i interleaved understanding
    python benchmarks/ddp_unused.py --in-process 20     # one process: what running every path costs per batch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "all-paths": ("ddp", False),
    "find-unused": ("ddp_find_unused_parameters_true", True),
    "both": ("ddp_find_unused_parameters_true", False),
}


class EveryPathOff(Callback):
    """Runs the model's paths only where the batch has input for them (as before all paths ran in training)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.model.all_paths_in_training = False


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(recipe: str, variant: str, steps: int, out: Path) -> list[float]:
    """Step times (s) of one 2-process run, steps 6.. (the first ones warm up)."""
    strategy, paths_off = VARIANTS[variant]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_port()}", "-m", "mogao.cli", "fit", "--config", f"tiny/{recipe}",
           "--trainer.devices=2", f"--trainer.strategy={strategy}", f"--trainer.max_steps={steps}",
           "--trainer.val_check_interval=100000", f"--trainer.default_root_dir={out}",
           f"--model.init_args.save_dir={out / 'model'}"]
    if paths_off:
        cmd.append("--trainer.callbacks+=ddp_unused.EveryPathOff")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT)])}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    t = [r["time"] for r in rows if r["kind"] == "train"]
    return [b - a for a, b in zip(t[5:], t[6:])]


def in_process(recipe: str, reps: int) -> dict[str, tuple[float, float]]:
    """Forward + backward time (s, median of `reps`, alternating) of one batch of each source of `recipe` in one
    process, with every path run and without: {source: (all paths, only the batch's paths)}."""
    import time

    from mogao.recipes import build_cli, resolve_recipe

    with tempfile.TemporaryDirectory() as tmp:
        cli = build_cli(["--config", str(resolve_recipe(f"tiny/{recipe}")), f"--trainer.default_root_dir={tmp}"],
                        run=False)
        module, dm = cli.model, cli.datamodule
        dm.connect(module.model)
        dm.setup("fit")
        batches: dict[str, object] = {}
        for i, b in enumerate(dm.train_dataloader()):  # (endless: until every source has given a batch)
            batches.setdefault(b.data_state["source"], b)
            if len(batches) == len(dm.sources) or i >= 200:
                break
    model = module.model.train()
    out: dict[str, tuple[float, float]] = {}
    for source, batch in sorted(batches.items()):
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(reps):
            for on in (True, False):
                model.all_paths_in_training = on
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                terms = model(batch).terms
                (terms.text_sum + terms.image_sum).backward()
                times[on].append(time.perf_counter() - t0)
        out[source] = (statistics.median(times[True]), statistics.median(times[False]))
    model.all_paths_in_training = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["t2i", "interleaved", "understanding"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--in-process", type=int, default=0, metavar="REPS",
                    help="instead: one process, forward+backward of one batch per source, every path run or not, "
                         "REPS alternating repetitions")
    args = ap.parse_args()
    if args.in_process:
        print(f"1 process, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; forward+backward "
              f"of one batch per source, median of {args.in_process}\n")
        print("| recipe | source | every path | the batch's paths only | ratio |\n|---|---|---|---|---|")
        for recipe in args.recipes:
            for source, (on, off) in in_process(recipe, args.in_process).items():
                print(f"| tiny/{recipe} | {source} | {on * 1e3:.1f} ms | {off * 1e3:.1f} ms | {on / off:.3f} |")
        return
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for rep in range(args.repeats):
                for variant in args.variants:
                    out = Path(tmp) / f"{recipe}-{variant}-{rep}"
                    times.setdefault((recipe, variant), []).extend(run(recipe, variant, args.steps, out))
                    print(f"  {recipe} {variant} #{rep + 1}: median "
                          f"{statistics.median(times[recipe, variant]) * 1e3:.1f} ms", file=sys.stderr)
    print(f"2 processes (gloo, CPU), {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"median step time over steps 6-{args.steps} x {args.repeats} runs\n")
    print("| recipe | " + " | ".join(args.variants) + " |")
    print("|---|" + "---|" * len(args.variants))
    for recipe in args.recipes:
        base = statistics.median(times[recipe, args.variants[0]])
        cells = []
        for v in args.variants:
            m = statistics.median(times[recipe, v])
            cells.append(f"{m * 1e3:.1f} ms ({m / base:.2f}x)")
        print(f"| tiny/{recipe} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
