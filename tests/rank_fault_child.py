"""What the rank-fault tests (tests/training/test_rank_faults.py) and benchmarks/rank_faults.py share: the
`mogao fit` command line of a tiny 2-process run, a data set, a callback recording the samples each rank trains
on, and the reading of those records into the run's history.

    fit_args(parts, data, run, steps, nproc, strategy, timeout)   arguments of `python -m mogao.cli fit`
    torchrun_cmd(args, nproc, max_restarts)                         the torchrun command line
    write_pictures(folder, n)                                       a JSONL source of n text-to-image samples
    lineage(run)                                                    step -> rank -> the samples trained on

`RecordSamples` (added to the run from the command line; this folder must be on PYTHONPATH) appends one line
per finished training step to `<run>/samples.rank<k>.jsonl`: the step, the rank, the world size, the sample ids,
the epoch of the source after the batch, when the process started training and at which step, and the time (and
one line, with "start", when a process starts training).
A restarted group appends to the same files; `lineage` keeps, for every step, what the run that the final
weights come from trained on (a step trained again after a restart replaces the earlier one).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

STRATEGY_FSDP2 = "{class_path: mogao.training.strategies.MoTFSDP2Strategy, init_args: {collective_timeout: %s}}"
CHECKPOINT_EVERY = 2


class RecordSamples(pl.Callback):
    """Append each finished training step's samples to `<run dir>/samples.rank<k>.jsonl` (see the module doc)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.started = 0.0
        self.first = 0
        self.t0 = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started, self.first = time.time(), trainer.global_step + 1
        self._write(trainer, {"start": True, "rank": trainer.global_rank, "started": self.started,
                              "first": self.first, "pid": os.getpid()})

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.t0 = time.time()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        state = batch.data_state or {}
        source = state.get("source")
        epoch = state.get("sources", {}).get(source, {}).get("epoch")
        row = {"step": trainer.global_step, "rank": trainer.global_rank, "world": trainer.world_size,
               "ids": list(batch.sample_ids), "epoch": epoch, "started": self.started, "first": self.first,
               "pid": os.getpid(), "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
               "t_start": self.t0, "time": time.time()}
        self._write(trainer, row)

    def _write(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"samples.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def records(run: Path, starts: bool = False) -> list[dict[str, Any]]:
    """The rows of the finished steps (with `starts`: the rows written when a process started training)."""
    rows = []
    for path in sorted(Path(run).glob("samples.rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if bool(r.get("start")) == starts]


def lineage(run: Path) -> dict[int, dict[int, dict[str, Any]]]:
    """step -> rank -> record of the steps behind the run's final state: a record is dropped when a process
    that started training after it was written resumed at or before its step."""
    rows = records(run)
    starts = {(r["pid"], r["started"], r["first"]) for r in rows}
    out: dict[int, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if any(started > r["time"] and first <= r["step"] for _, started, first in starts):
            continue
        out.setdefault(r["step"], {})[r["rank"]] = r
    return dict(sorted(out.items()))


def write_pictures(folder: Path, n: int = 24) -> Path:
    """A JSONL source of `n` text-to-image samples (ids s0, s1, ...), one 16x16 PNG each."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 20)}
    shapes = ["circle", "square", "triangle"]
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = list(colours)[i % len(colours)]
        Image.new("RGB", (16, 16), colours[colour]).save(folder / "img" / f"{i}.png")
        lines.append({"id": f"s{i}", "segments": [{"text": f"A {colour} {shapes[i % 3]}.", "loss": False},
                                                   {"image": f"img/{i}.png", "generate": True}]})
    path = folder / "pics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def fit_args(parts: dict[str, Path], data: Path, run: Path, steps: int, nproc: int = 2,
             timeout: float = 600, strategy: str | None = None) -> list[str]:
    """A T2I stage on one JSONL source (two samples a batch), sharded over `nproc` processes (FSDP2, fp32,
    sharded checkpoints every CHECKPOINT_EVERY steps, all kept), recording the samples of every step."""
    ckpt = ("{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {"
            f"every_n_train_steps: {CHECKPOINT_EVERY}, save_top_k: -1, monitor: step, mode: max}}}}")
    record = f"{{class_path: rank_fault_child.RecordSamples, init_args: {{folder: '{run}'}}}}"
    return [
        "fit", "--model=mogao.training.module.T2IModule",
        f"--model.init_args.tokenizer={parts['tokenizer']}", f"--model.init_args.model.llm={parts['llm']}",
        f"--model.init_args.model.vit={parts['vit']}", "--model.init_args.model.autoencoder=pixel",
        "--model.init_args.model.latent_patch=8", f"--model.init_args.save_dir={run / 'model'}",
        f"--data.sources=[{{name: pics, path: '{data}'}}]",
        "--data.data.token_budget=36", "--data.data.max_image_tokens=4", "--data.data.lookahead=2",
        "--data.data.p_drop_text=0.0", "--data.data.p_drop_images=0.0",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu", f"--trainer.devices={nproc}",
        f"--trainer.strategy={strategy or STRATEGY_FSDP2 % timeout}",
        f"--trainer.callbacks=[{ckpt}, {record}]", f"--trainer.default_root_dir={run}",
    ]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(args: list[str], nproc: int, max_restarts: int = 0, port: int | None = None) -> list[str]:
    """`torchrun --nproc-per-node=N --max-restarts=R` (its static rendezvous on a free local port) running
    `python -m mogao.cli` with `args`."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "--master-addr=127.0.0.1",
            f"--master-port={port or free_port()}", "-m", "mogao.cli", *args]


def launch_env(root: Path, faults: str | None = None) -> dict[str, str]:
    """The environment of a launch: one thread per process, the repository and tests/ importable, and the
    injected faults (MOGAO_FAULT) if any."""
    env = {k: v for k, v in os.environ.items() if k != "MOGAO_FAULT"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(root), str(root / "tests")]))
    if faults:
        env["MOGAO_FAULT"] = faults
    return env
