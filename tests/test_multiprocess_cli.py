"""The shipped entry points on 2 processes (CPU, gloo), as users launch them: `torchrun ... -m mogao.cli fit` with
the tiny recipes and all their callbacks under `ddp` and under the `fsdp2` preset, `mogao curriculum` (and its
resume after an interruption), the tiny LoRA recipe, and two single-process "nodes" on localhost.

Every run has a watchdog (a hang fails the test within `WATCHDOG` seconds, with each rank's last collectives) and
records the collectives each rank issues (tests/collective_trace): the ranks must issue the same sequence.
`TORCH_DISTRIBUTED_DEBUG=DETAIL` checks the FSDP2 runs; under DDP it is INFO (DETAIL's wrapped process group
crashes DDP's constructor with a segmentation fault on torch 2.13's CPU build, in a 10-line script too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "tests" / "collective_trace"
WATCHDOG = 150  # seconds; a healthy run here takes 20-60 s
FSDP2 = str(ROOT / "recipes" / "strategies" / "fsdp2.yaml")
STRATEGIES = {"ddp": "ddp", "fsdp2": FSDP2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trace_report(trace: Path, nranks: int) -> tuple[list[list[str]], str]:
    """Each rank's collectives (name + calling frames) and a description of where the sequences part."""
    seqs = []
    for r in range(nranks):
        f = trace / f"rank{r}.log"
        seqs.append(f.read_text().splitlines() if f.is_file() else [])
    names = [[ln.split("\t")[0] for ln in s] for s in seqs]
    n = min(len(s) for s in names)
    first = next((i for i in range(n) if len({s[i] for s in names}) > 1), n)
    if first == n and len({len(s) for s in names}) == 1:
        return seqs, f"all {nranks} ranks issued the same {n} collectives"
    lines = [f"ranks part at collective #{first} (counts: {[len(s) for s in names]}):"]
    for r, s in enumerate(seqs):
        lines += [f"  rank {r}: {ln}" for ln in s[max(0, first - 2): first + 3]] or [f"  rank {r}: (none)"]
    return seqs, "\n".join(lines)


def _launch(cmds: list[list[str]], cwd: Path, trace: Path, detail: bool, timeout: int = WATCHDOG,
            env_extra: dict[str, str] | None = None) -> str:
    """Run the launcher command(s) to the end under a watchdog; returns the combined output. Fails the test on
    a non-zero exit, on a timeout (after killing every process) and on ranks whose collectives differ."""
    trace.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MOGAO_COLLECTIVE_TRACE": str(trace),
           "PYTHONPATH": os.pathsep.join([str(TRACE), str(ROOT)]),
           "TORCH_DISTRIBUTED_DEBUG": "DETAIL" if detail else "INFO", **(env_extra or {})}
    logs = [cwd / f"launch{i}.log" for i in range(len(cmds))]
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                              start_new_session=True) for c, log in zip(cmds, logs)]
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
        codes = ["hung"]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    out = "\n".join(log.read_text(errors="replace") for log in logs)
    nranks = len(list(trace.glob("rank*.log")))
    _, report = _trace_report(trace, max(nranks, 2))
    if any(c != 0 for c in codes):
        raise AssertionError(f"exit {codes} (watchdog {timeout} s)\n{report}\n--- output (tail) ---\n{out[-6000:]}")
    assert "ranks part" not in report, report
    return out


def torchrun(args: list[str], cwd: Path, trace: Path, detail: bool = False, nproc: int = 2, **kw) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "mogao.cli", *args]
    return _launch([cmd], cwd, trace, detail, **kw)


def _part_args(parts: dict[str, Path]) -> list[str]:
    return [f"--model.init_args.tokenizer={parts['tokenizer']}", f"--model.init_args.model.llm={parts['llm']}",
            f"--model.init_args.model.vit={parts['vit']}"]


def _rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ---- every tiny recipe, both strategies ------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("recipe", ["understanding", "t2i", "interleaved"])
def test_fit_tiny_recipe_on_two_processes(recipe, strategy, parts, tmp_path):
    run = tmp_path / "run"
    torchrun(["fit", "--config", f"tiny/{recipe}", "--trainer.devices=2", f"--trainer.strategy={STRATEGIES[strategy]}",
              "--trainer.max_steps=3", "--trainer.val_check_interval=2", f"--trainer.default_root_dir={run}",
              f"--model.init_args.save_dir={run / 'model'}", *_part_args(parts)],
             tmp_path, tmp_path / "trace", detail=strategy == "fsdp2")
    assert (run / "model" / "model.safetensors").is_file()
    assert [r["step"] for r in _rows(run, "train")] == [1, 2, 3]
    val = _rows(run, "val")
    assert [r["step"] for r in val][:1] == [2] and len(val) >= 1
    if recipe == "understanding":  # greedy answers generated on both ranks in lockstep during validation
        assert any(k.endswith("/exact_match") for k in val[0])
    if recipe == "t2i":  # the sample grid drawn at the end (every rank samples under sharding)
        assert list((run / "samples").glob("step_*.png"))
        assert (run / "ema" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").exists()


# ---- 2 processes give the single-process result on the same global batches -------------------------------

def _equal_batches_data(tmp_path: Path) -> Path:
    """A JSONL of t2i samples whose images have one size, so every rank's flow-loss weight is the same and a
    1-process run with gradient accumulation over the two shards applies the 2-process gradient."""
    from mogao.data.builtin import make_builtin

    made = make_builtin("t2i", split="train", n=24, seed=3, max_objects=1)
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    with open(d / "t2i.jsonl", "w") as f:
        for i, s in enumerate(made.samples):
            segs = []
            for seg in s["segments"]:
                if "image" in seg:
                    seg["image"].save(d / "img" / f"{i}.png")
                    segs.append({"image": f"img/{i}.png", "generate": True})
                else:
                    segs.append({"text": seg["text"], "loss": False})
            f.write(json.dumps({"id": f"s{i}", "segments": segs}) + "\n")
    return d / "t2i.jsonl"


def test_two_processes_equal_one_process_through_the_cli(parts, tmp_path):
    data = _equal_batches_data(tmp_path)
    common = ["fit", "--config", "tiny/t2i", "--trainer.max_steps=4", "--trainer.val_check_interval=1000",
              f"--data.path={data}", "--data.data.token_budget=300", "--data.data.p_drop_text=0",
              "--data.data.p_drop_images=0", "--model.init_args.lambda_text=0", *_part_args(parts)]
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun([*common, "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.default_root_dir={two}",
              f"--model.init_args.save_dir={two / 'model'}"], tmp_path, tmp_path / "trace")
    # one process reads both shards (two DataLoader workers) and accumulates their gradients
    subprocess.run([sys.executable, "-m", "mogao.cli", *common, "--trainer.devices=1", "--data.num_workers=2",
                    "--trainer.accumulate_grad_batches=2", f"--trainer.default_root_dir={one}",
                    f"--model.init_args.save_dir={one / 'model'}"], cwd=tmp_path, check=True, timeout=WATCHDOG,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    two_rows, one_rows = _rows(two, "train"), _rows(one, "train")
    assert [r["step"] for r in two_rows] == [1, 2, 3, 4]
    # rank 0's batch of step s is the first of the two micro-batches of step s of the single process
    assert len(one_rows) == 2 * len(two_rows)
    for r, first in zip(two_rows, one_rows[0::2]):
        assert r["image_loss"] == pytest.approx(first["image_loss"], rel=1e-5, abs=1e-6)
    a, b = load_file(two / "model" / "model.safetensors"), load_file(one / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    changed = [k for k in a if "latent_proj" in k]
    assert changed  # (the weights compared include the trained generation parts)
