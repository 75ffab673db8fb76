"""One rank of a 2-process run killed or hung, again and again: how often the restarted run ends with the weights
of an uninterrupted one, and what a restart costs.

Each repeat runs `torchrun --nproc-per-node=2 --max-restarts=3 -m mogao.cli fit` (the tiny T2I stage of
tests/training/test_rank_faults.py: 2 CPU processes, gloo, FSDP2, sharded checkpoints every 2 steps) with three
faults of rank 1 at random steps (MOGAO_FAULT, mogao.training.faults):

    1. SIGKILL at a random moment (0-0.6 s) after a random step starts (in its forward, backward, optimizer step
       or checkpoint write);
    2. SIGKILL while it writes its shards of the checkpoint of a random later step;
    3. a stop before its first all_reduce of a random later step (a hang: the collective watchdog ends the
       group after the collective timeout).

and compares the final weights (torch.equal, every tensor) and the batches of every step with one uninterrupted
run. The cost of a restart is the time from the fault (the SIGKILL, or the watchdog's exit after a hang) to the
end of the first training step of the restarted group, from the run's own records (`injected_faults.jsonl`,
`watchdog.json` and the samples each step trained on).

Then the cost of a restart on the tiny recipe itself (`--config tiny/t2i` as shipped, with the tests' tiny
components: 6 built-in sources, EMA, throughput, the curriculum schedule), `--tiny-recipe` times over: rank 1
SIGKILLed 0.1 s into step 5 under `--trainer.strategy=ddp`, a checkpoint every 2 steps.

Then one elastic run: two torchrun agents on this machine, `--nnodes=1:2 --nproc-per-node=1` with the c10d
rendezvous, the second "node" (its agent and its worker) SIGKILLed after step 3: the first restarts alone on
world size 1 and finishes; every sample of the first epoch must be read exactly once over the run.

    python benchmarks/rank_faults.py --repeats 10 --out runs/rank_faults     # 15-20 minutes on 2 CPU cores
    python benchmarks/rank_faults.py --repeats 1 --out /tmp/rf               # one faulted run

Prints a markdown summary (and writes it with every figure to `--out`/results.json and summary.md) naming the
machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import rank_fault_child as child  # noqa: E402

STEPS = 12
SAMPLES = 24
TIMEOUT = 5.0  # collective timeout of the runs (s)
WATCHDOG = 600  # s for one launch


def build_parts(folder: Path) -> dict[str, Path]:
    from mogao.model.tiny import TinySpec, ensure_tiny_components

    spec = TinySpec(hidden_size=32, layers=2, heads=2, kv_heads=1, vit_hidden_size=16, vit_patch_size=8)
    parts = {k: folder / k for k in ("tokenizer", "llm", "vit")}
    ensure_tiny_components(spec, **parts)
    return parts


def launch(cmd: list[str], cwd: Path, faults: str | None = None) -> tuple[int, str, float]:
    cwd.mkdir(parents=True, exist_ok=True)
    log = cwd / "launch.log"
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=child.launch_env(ROOT, faults), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=WATCHDOG)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = -999
    return code, log.read_text(errors="replace"), time.monotonic() - t0


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    try:
        wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    except OSError:
        return False
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def batches(run: Path) -> dict[int, dict[int, list[str]]]:
    return {s: {r: rec["ids"] for r, rec in ranks.items()} for s, ranks in child.lineage(run).items()}


def restart_costs(run: Path) -> list[dict]:
    """For every fault: when it struck, when the restarted group started training and finished its first step."""
    injected = [json.loads(x) for x in (run / "injected_faults.jsonl").read_text().splitlines() if x.strip()]
    events = []
    report = run / "watchdog.json"
    if report.is_file():
        events = [e for e in json.loads(report.read_text())["events"] if e["event"] == "collective timeout"]
    rows, starts = child.records(run), child.records(run, starts=True)
    out = []
    for fault in injected:
        # a kill strikes when it is recorded; a hang when the watchdog ends the group (its report's time)
        struck = fault["time"]
        detected = None
        if fault["action"] == "hang":
            later = [e["time"] for e in events if e["time"] >= fault["time"]]
            if not later:
                continue
            detected, struck = min(later) - fault["time"], min(later)
        later = [r["started"] for r in starts if r["started"] > struck]
        if not later:
            continue
        started = min(later)  # the restarted group (its first rank to start training)
        # its steps: those of processes that started training with it (before the next group did)
        upto = min((r["started"] for r in starts if r["started"] > started + 5.0), default=float("inf"))
        steps = [r["time"] for r in rows if started <= r["started"] < upto]
        out.append({"action": fault["action"], "at": fault["at"], "step": fault.get("step_at_kill", fault["step"]),
                    "detect_s": detected, "to_train_start_s": started - struck,
                    "to_first_step_s": (min(steps) - struck) if steps else None})
    return out


def one_faulted_run(parts: dict, data: Path, folder: Path, rng: random.Random) -> dict:
    every = child.CHECKPOINT_EVERY
    k1 = rng.choice(range(2, 6))
    delay = round(rng.uniform(0.0, 0.6), 3)
    # (the first kill may land up to two steps after k1 starts, after that step's checkpoint: k2 is later)
    k2 = rng.choice([k for k in range(k1 + 4, STEPS - every + 1) if k % every == 0])
    k3 = rng.choice(range(k2 + 1, STEPS + 1))  # (so that every restarted group finishes a step before the next fault)
    faults = (f"kill:rank=1,step={k1},delay={delay},restart=0;kill:rank=1,step={k2},at=save,restart=1;"
              f"hang:rank=1,step={k3},at=all_reduce,restart=2")
    run = folder / "run"
    code, out, took = launch(child.torchrun_cmd(child.fit_args(parts, data, run, STEPS, timeout=TIMEOUT), 2,
                                                max_restarts=3), folder, faults)
    injected = []
    if (run / "injected_faults.jsonl").is_file():
        injected = [json.loads(x) for x in (run / "injected_faults.jsonl").read_text().splitlines() if x.strip()]
    named = False
    if (run / "watchdog.json").is_file():
        named = any(e["event"] == "collective timeout" and e["stuck_ranks"] == [1] and e["collective"]
                    and e["collective"]["name"] == "all_reduce" and e["step"] == k3
                    for e in json.loads((run / "watchdog.json").read_text())["events"])
    return {"faults": faults, "exit": code, "seconds": round(took, 1), "faults_fired": len(injected),
            "hang_named": named, "run": run, "costs": restart_costs(run) if injected else []}


def tiny_recipe_restart(parts: dict, folder: Path) -> dict:
    """`torchrun --max-restarts=1 -m mogao.cli fit --config tiny/t2i` on 2 processes, rank 1 killed in step 5."""
    run = folder / "run"
    ckpt = ("--trainer.callbacks+={class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: "
            "{every_n_train_steps: 2, save_top_k: -1, monitor: step, mode: max}}")
    record = f"--trainer.callbacks+={{class_path: rank_fault_child.RecordSamples, init_args: {{folder: '{run}'}}}}"
    args = ["fit", "--config", "tiny/t2i", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=8",
            "--trainer.val_check_interval=1000", f"--trainer.default_root_dir={run}",
            f"--model.init_args.save_dir={run / 'model'}", f"--model.init_args.tokenizer={parts['tokenizer']}",
            f"--model.init_args.model.llm={parts['llm']}", f"--model.init_args.model.vit={parts['vit']}", ckpt, record]
    code, _, took = launch(child.torchrun_cmd(args, 2, max_restarts=1), folder, "kill:rank=1,step=5,delay=0.1,restart=0")
    costs = restart_costs(run) if (run / "injected_faults.jsonl").is_file() else []
    return {"exit": code, "seconds": round(took, 1), "costs": costs}


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def elastic_run(parts: dict, data: Path, folder: Path, kill_after: int = 3) -> dict:
    """Two agents (`--nnodes=1:2`, one process each) and the second node lost after step `kill_after`."""
    run = folder / "run"
    folder.mkdir(parents=True)
    args = child.fit_args(parts, data, run, STEPS, nproc=1, timeout=TIMEOUT) + ["--trainer.num_nodes=2"]
    port = child.free_port()
    env = {**child.launch_env(ROOT), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    agents = []
    for i in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1", "--max-restarts=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=rank-faults",
               "--rdzv-conf=last_call_timeout=2,join_timeout=120", "-m", "mogao.cli", *args]
        agents.append(subprocess.Popen(cmd, cwd=folder, env=env, stdout=open(folder / f"agent{i}.log", "w"),  # noqa: SIM115
                                       stderr=subprocess.STDOUT, start_new_session=True))
        time.sleep(1.0)  # (the first agent hosts the rendezvous store)
    deadline = time.monotonic() + WATCHDOG
    while not any(r["step"] >= kill_after for r in child.records(run)) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = time.time()
    for pid in [g for c in _children(agents[1].pid) for g in _children(c)] + _children(agents[1].pid) + [agents[1].pid]:
        try:
            os.kill(pid, signal.SIGKILL)  # the node fails: its agent and its worker
        except ProcessLookupError:
            pass
    try:
        code = agents[0].wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(agents[0].pid, signal.SIGKILL)
        code = -999
    agents[1].wait()
    history = child.lineage(run)
    epoch0 = [i for ranks in history.values() for rec in ranks.values() if rec["epoch"] == 0 for i in rec["ids"]]
    after = [r for r in child.records(run) if r["started"] > killed]
    return {"exit": code, "steps": sorted(history), "worlds": sorted({rec["world"] for r in history.values()
                                                                     for rec in r.values()}),
            "exactly_once": sorted(epoch0) == sorted(f"s{i}" for i in range(SAMPLES)),
            "to_first_step_s": (min(r["time"] for r in after) - killed) if after else None}


def machine() -> str:
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, gloo"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("runs/rank_faults"))
    ap.add_argument("--seed", type=int, default=None, help="seed of the fault steps (default: random, printed)")
    ap.add_argument("--no-elastic", action="store_true", help="skip the elastic run")
    ap.add_argument("--tiny-recipe", type=int, default=3, help="restarts timed on the tiny recipe (0: none)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    out = args.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    parts = build_parts(out / "parts")
    data = child.write_pictures(out / "data", n=SAMPLES)
    print(f"seed {seed}; reference run ...", flush=True)
    code, log, took = launch(child.torchrun_cmd(child.fit_args(parts, data, out / "reference" / "run", STEPS,
                                                                timeout=TIMEOUT), 2), out / "reference")
    if code != 0:
        print(log[-4000:])
        return 1
    reference = out / "reference" / "run"
    ref_batches = batches(reference)
    results = []
    for i in range(args.repeats):
        r = one_faulted_run(parts, data, out / f"faulted{i}", rng)
        r["same_weights"] = r["exit"] == 0 and same_weights(reference, r["run"])
        r["same_batches"] = r["exit"] == 0 and batches(r["run"]) == ref_batches
        r["run"] = str(r["run"])
        results.append(r)
        print(f"run {i + 1}/{args.repeats}: {r['faults']}: exit {r['exit']}, {r['faults_fired']} faults fired, hang "
              f"named {r['hang_named']}, same weights {r['same_weights']}, same batches {r['same_batches']}, "
              f"{r['seconds']} s; restarts: "
              + ", ".join(f"{c['action']}@{c['at']} {c['to_first_step_s'] or float('nan'):.1f} s" for c in r["costs"]),
              flush=True)
    tiny = []
    for i in range(args.tiny_recipe):
        tiny.append(tiny_recipe_restart(parts, out / f"tiny{i}"))
        print(f"tiny recipe, restart {i + 1}/{args.tiny_recipe}: {tiny[-1]}", flush=True)
    elastic = None
    if not args.no_elastic:
        elastic = elastic_run(parts, data, out / "elastic")
        print(f"elastic run: {elastic}", flush=True)
    identical = sum(r["same_weights"] and r["same_batches"] for r in results)
    kills = [c for r in results for c in r["costs"] if c["action"] == "kill"]
    hangs = [c for r in results for c in r["costs"] if c["action"] == "hang"]

    kill_steps = [c["to_first_step_s"] for c in kills if c["to_first_step_s"] is not None]

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):.1f}" if xs else "-"

    cmd = "python benchmarks/rank_faults.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Command: `{cmd}` (seed {seed}); machine: {machine()}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"- runs that ended with the uninterrupted run's weights (torch.equal, every tensor) and batches: "
        f"**{identical}/{len(results)}** (every fault fired in {sum(r['faults_fired'] == 3 for r in results)}; "
        f"the hang named rank 1, the all_reduce and the step in {sum(r['hang_named'] for r in results)})",
        f"- restart after a SIGKILL of rank 1 ({len(kills)} restarts): kill -> the restarted group starts training: "
        f"median {med([c['to_train_start_s'] for c in kills])} s; kill -> end of its first step: median "
        f"{med(kill_steps)} s (min {min(kill_steps, default=0):.1f}, max {max(kill_steps, default=0):.1f})",
        f"- a hang (collective_timeout={TIMEOUT:g} s, {len(hangs)} hangs): rank 1 stops -> the watchdog's report "
        f"(it exits right after): median {med([c['detect_s'] for c in hangs])} s; report -> end of the first step "
        f"after the restart: median {med([c['to_first_step_s'] for c in hangs if c['to_first_step_s'] is not None])} s",
        f"- one faulted run (3 faults, {STEPS} steps): median {med([r['seconds'] for r in results])} s; the "
        f"uninterrupted run: {took:.1f} s",
    ]
    tiny_costs = [c for r in tiny for c in r["costs"] if r["exit"] == 0 and c["to_first_step_s"] is not None]
    if tiny:
        lines.append(f"- the tiny recipe (`--config tiny/t2i --trainer.strategy=ddp`, 2 processes; {len(tiny)} runs, "
                     f"{sum(r['exit'] == 0 for r in tiny)} finished): kill -> the restarted group starts training: "
                     f"median {med([c['to_train_start_s'] for c in tiny_costs])} s; kill -> end of its first step: "
                     f"median {med([c['to_first_step_s'] for c in tiny_costs])} s (min "
                     f"{min((c['to_first_step_s'] for c in tiny_costs), default=0):.1f}, max "
                     f"{max((c['to_first_step_s'] for c in tiny_costs), default=0):.1f})")
    if elastic is not None:
        lines.append(f"- elastic (`--nnodes=1:2`, one process a node, the second node SIGKILLed after step 3): exit "
                     f"{elastic['exit']}, world sizes {elastic['worlds']}, steps {elastic['steps'][0]}-"
                     f"{elastic['steps'][-1]}, every sample of the first epoch read exactly once: "
                     f"{elastic['exactly_once']}; node lost -> end of the first step on 1 node: "
                     + (f"{elastic['to_first_step_s']:.1f} s" if elastic["to_first_step_s"] is not None else "-"))
    summary = "\n".join(lines)
    print("\n" + summary)
    (out / "summary.md").write_text(summary + "\n")
    (out / "results.json").write_text(json.dumps({"seed": seed, "command": cmd, "machine": machine(),
                                                  "reference_seconds": took, "runs": results, "tiny_recipe": tiny,
                                                  "elastic": elastic},
                                                 indent=2))
    return 0 if identical == len(results) and (elastic is None or elastic["exactly_once"]) else 1


if __name__ == "__main__":
    sys.exit(main())
