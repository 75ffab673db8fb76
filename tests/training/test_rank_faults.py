"""One rank of a multi-process run killed or hung, through the real entry points (`torchrun ... -m mogao.cli
fit`, 2 processes, gloo, FSDP2 with sharded checkpoints): torchrun restarts the group, every rank resumes from the
last complete checkpoint and the run ends with the weights of an uninterrupted run, bit for bit (tolerance 0:
`torch.equal`), after the same batches; a kill during a sharded checkpoint write leaves the previous checkpoint;
a rank that stops before a collective is named, with the collective and the step, by the watchdog, which ends
the group within the collective timeout plus a margin; a restart on fewer ranks reads every sample exactly once.

The faults are injected with the MOGAO_FAULT test hook (mogao.training.faults). One uninterrupted run and one
faulted run (rank 1 SIGKILLed while it writes its shards of the checkpoint of a random step, then, after the
restart, stopped before an all_reduce at a random step: two restarts) are shared by the tests; every launch has
its own watchdog (WATCHDOG seconds). benchmarks/rank_faults.py repeats a faulted run with also a SIGKILL at a
random moment of a random step, 10 times.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

import rank_fault_child as child  # noqa: E402

from mogao.training.faults import HANG_EXIT_STATUS, backstop_margin  # noqa: E402

STEPS = 8
SAMPLES = 20  # 2 a batch: the first epoch ends at step 5 on 2 ranks
TIMEOUT = 5.0  # the runs' collective timeout (s)
WATCHDOG = 300  # s for one launch, restarts included (a healthy launch of these runs takes 20-100 s on 2 cores)


class _Launch:
    """A launcher command started in its own session, with a watchdog: `result()` waits for its end (exit status,
    output); one still running `timeout` seconds after its start is killed with every process it started, and
    the test fails with its output."""

    def __init__(self, cmd: list[str], cwd: Path, faults: str | None = None, timeout: float = WATCHDOG) -> None:
        self.log = cwd / f"launch-{time.monotonic_ns()}.log"
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=child.launch_env(REPO, faults), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.took = 0.0

    def result(self) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"launch still running after {WATCHDOG} s (watchdog):\n{self.log.read_text()[-6000:]}")
        self.took = time.monotonic() - self.started
        return code, self.log.read_text(errors="replace")


def _launch(cmd: list[str], cwd: Path, faults: str | None = None) -> tuple[int, str]:
    return _Launch(cmd, cwd, faults).result()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]  # tolerance 0: bit for bit
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _batches(run: Path) -> dict[int, dict[int, list[str]]]:
    return {s: {r: rec["ids"] for r, rec in ranks.items()} for s, ranks in child.lineage(run).items()}


def _resumes(output: str) -> list[int]:
    """The global steps the restarts resumed from, in order."""
    return [int(m) for m in re.findall(r"restart \d+ of the process group \(TORCHELASTIC_RESTART_COUNT=\d+\): "
                                       r"resuming from \S+ \(global step (\d+)\)", output)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return child.write_pictures(tmp_path_factory.mktemp("pictures"), n=SAMPLES)


@pytest.fixture(scope="module")
def reference(parts, data, tmp_path_factory) -> Path:
    """The uninterrupted run: 2 processes, STEPS steps."""
    d = tmp_path_factory.mktemp("reference")
    launch = _Launch(child.torchrun_cmd(child.fit_args(parts, data, d / "run", STEPS, timeout=TIMEOUT), 2), d)
    code, out = launch.result()
    assert code == 0, out[-6000:]
    print(f"reference run: {launch.took:.1f} s")
    return d / "run"


@pytest.fixture(scope="module")
def faulted(parts, data, tmp_path_factory) -> dict:
    """The same run under `torchrun --max-restarts=2` with two faults of rank 1 at random steps: SIGKILL while it
    writes its shards of the checkpoint of step k1; after the restart, a stop before its first all_reduce of
    step k2 (a hang the watchdog ends)."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    every = child.CHECKPOINT_EVERY
    k1 = rng.choice(range(2 * every, STEPS - every + 1, every))  # (a checkpoint before it to resume from)
    k2 = rng.choice(range(k1 - every + 1, STEPS + 1))  # (after the restart, which resumes at k1 - every)
    faults = f"kill:rank=1,step={k1},at=save,restart=0;hang:rank=1,step={k2},at=all_reduce,restart=1"
    print(f"faulted run: seed {seed}, MOGAO_FAULT={faults}")
    d = tmp_path_factory.mktemp("faulted")
    launch = _Launch(child.torchrun_cmd(child.fit_args(parts, data, d / "run", STEPS, timeout=TIMEOUT), 2,
                                        max_restarts=2), d, faults)
    code, out = launch.result()
    print(f"faulted run: {launch.took:.1f} s")
    injected = [json.loads(line) for line in (d / "run" / "injected_faults.jsonl").read_text().splitlines()]
    return {"run": d / "run", "code": code, "output": out, "k1": k1, "k2": k2, "injected": injected}


def test_a_killed_rank_restarts_the_group_which_ends_with_the_weights_of_an_uninterrupted_run(reference, faulted):
    out = faulted["output"]
    assert faulted["code"] == 0, out[-6000:]
    kill = faulted["injected"][0]
    assert (kill["action"], kill["rank"], kill["step"], kill["restart"]) == ("kill", 1, faulted["k1"], 0)
    assert re.search(r"failed \(exitcode: -9\) local_rank: 1", out), out[-3000:]  # SIGKILLed, seen by torchrun
    assert "no on-exception checkpoint" in out  # (rank 0's collective failed: nothing saved by a broken group)
    assert len(_resumes(out)) == 2, out[-3000:]
    # the same batches at every step on every rank, the same losses, the same weights (tolerance 0)
    assert _batches(faulted["run"]) == _batches(reference)
    assert _losses(faulted["run"]) == _losses(reference)
    assert sorted(_losses(reference)) == list(range(1, STEPS + 1))
    _assert_same_weights(reference, faulted["run"])


def test_a_kill_during_a_sharded_checkpoint_write_leaves_the_previous_checkpoint(faulted):
    out, run, k1 = faulted["output"], faulted["run"], faulted["k1"]
    every = child.CHECKPOINT_EVERY
    assert faulted["injected"][0]["at"] == "save"
    # the killed write's folder was never renamed into place: removed at the restart, which resumed from the
    # checkpoint before it
    assert re.search(rf"removed \.epoch=0-step={k1}\.ckpt\.\d+-[0-9a-f]+\.tmp, left in \S+ by a save that was "
                     "interrupted", out), out[-3000:]
    assert _resumes(out)[0] == k1 - every
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == sorted(f"epoch=0-step={s}.ckpt" for s in range(every, STEPS + 1, every)), names


def test_a_hung_rank_is_named_by_the_watchdog_which_ends_the_group_for_a_restart(reference, faulted):
    out, run, k2 = faulted["output"], faulted["run"], faulted["k2"]
    hang = faulted["injected"][1]
    assert (hang["action"], hang["at"], hang["rank"], hang["step"], hang["restart"]) == ("hang", "all_reduce", 1, k2, 1)
    events = json.loads((run / "watchdog.json").read_text())["events"]
    (timeout,) = [e for e in events if e["event"] == "collective timeout"]
    # rank 0's report names the stuck rank, the collective rank 0 waits in, and the step
    assert timeout["rank"] == 0 and timeout["step"] == k2 and timeout["stuck_ranks"] == [1]
    assert timeout["collective"]["name"] == "all_reduce" and "training_step" in timeout["collective"]["called_from"]
    assert timeout["verdict"].startswith("rank 1 has not reached collective #")
    assert timeout["ranks"]["1"]["step"] == k2 and timeout["ranks"]["1"]["in_collective"] is None
    # within the collective timeout plus a margin of the moment rank 1 stopped
    took = timeout["time"] - hang["time"]
    assert TIMEOUT <= took <= TIMEOUT + backstop_margin(TIMEOUT), took
    assert f"rank 0: collective timeout at step {k2}" in out and "rank 1 has not reached collective" in out
    assert re.search(rf"failed \(exitcode: {HANG_EXIT_STATUS}\) local_rank: 0", out), out[-3000:]
    # restarted from the newest checkpoint and finished as the uninterrupted run did
    assert _resumes(out)[1] == k2 - 1 - (k2 - 1) % child.CHECKPOINT_EVERY
    assert faulted["code"] == 0
    _assert_same_weights(reference, run)


def test_a_restart_on_fewer_ranks_reads_every_sample_exactly_once(parts, data, reference, tmp_path):
    """The 2-process run resumed by one process from its checkpoint of step 4 (a requeued job, or an elastic
    restart, with fewer ranks): the data the two ranks had still to read is re-split; over the run's history
    every sample of the first epoch is read once, and later epochs repeat none."""
    resume_at = 4
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("model"))
    for p in (run / "checkpoints").iterdir():
        if int(re.search(r"step=(\d+)", p.name).group(1)) > resume_at:
            shutil.rmtree(p)
    code, out = _launch(child.torchrun_cmd(child.fit_args(parts, data, run, STEPS, nproc=1, timeout=TIMEOUT), 1),
                        tmp_path)
    assert code == 0, out[-6000:]
    assert f"(global step {resume_at})" in out
    history = child.lineage(run)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert all(len(history[s]) == 2 for s in range(1, resume_at + 1))  # two ranks, then one
    assert all(list(history[s]) == [0] for s in range(resume_at + 1, STEPS + 1))
    by_epoch: dict[int, list[str]] = {}
    for ranks in history.values():
        for rec in ranks.values():
            by_epoch.setdefault(rec["epoch"], []).extend(rec["ids"])
    assert sorted(by_epoch[0]) == sorted(f"s{i}" for i in range(SAMPLES))  # each sample exactly once
    assert max(by_epoch) >= 1 and all(len(ids) == len(set(ids)) for ids in by_epoch.values())


# ---- the pieces, in one process ------------------------------------------------------------------------------


def _sharded_checkpoint(folder: Path, step: int) -> Path:
    """A stand-in sharded checkpoint folder (what `commit_directory` moves: any files)."""
    folder.mkdir(parents=True)
    (folder / "meta.pt").write_bytes(str(step).encode())
    return folder


def test_commit_directory_replaces_a_checkpoint_folder_as_a_unit(tmp_path, monkeypatch):
    from mogao.training import checkpointing as ck

    d = tmp_path / "checkpoints"
    _sharded_checkpoint(d / "last.ckpt", 1)
    new = _sharded_checkpoint(ck.temp_path_for(d / "last.ckpt"), 2)
    assert ck.is_temp_file(new) and ck.checkpoint_candidates(d) == [d / "last.ckpt"]
    ck.commit_directory(new, d / "last.ckpt")
    assert (d / "last.ckpt" / "meta.pt").read_bytes() == b"2" and [p.name for p in d.iterdir()] == ["last.ckpt"]
    # a kill between the two renames: the moved-aside folder stands for last.ckpt until a new one is in place
    newer = _sharded_checkpoint(ck.temp_path_for(d / "last.ckpt"), 3)
    renames = []

    def killed_at_the_second_rename(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise KeyboardInterrupt  # (the process dies here)
        os.replace(src, dst)

    monkeypatch.setattr(ck.os, "rename", killed_at_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ck.commit_directory(newer, d / "last.ckpt")
    monkeypatch.undo()
    (aside,) = [p for p in d.iterdir() if p.name.endswith(ck.MOVED_ASIDE_SUFFIX)]
    assert ck.moved_aside_target(aside) == d / "last.ckpt" and not (d / "last.ckpt").exists()
    assert ck.checkpoint_candidates(d) == [aside] and (aside / "meta.pt").read_bytes() == b"2"
    assert ck.remove_temp_files(d) == [newer]  # the unfinished one goes; the moved-aside one stays
    assert sorted(p.name for p in d.iterdir()) == [aside.name]
    ck.commit_directory(_sharded_checkpoint(ck.temp_path_for(d / "last.ckpt"), 4), d / "last.ckpt")
    assert ck.remove_temp_files(d) == [aside] and ck.checkpoint_candidates(d) == [d / "last.ckpt"]


def test_a_restarted_group_resumes_from_the_newest_checkpoint_whatever_ckpt_path_says(tmp_path, monkeypatch):
    import types

    from callbacks.preemption import CrashCheckpoint
    from mogao.training.checkpointing import atomic_save, resolve_ckpt_path

    run = tmp_path / "run"
    trainer = types.SimpleNamespace(callbacks=[CrashCheckpoint(run / "checkpoints")], loggers=[],
                                    default_root_dir=str(run))
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    given = str(tmp_path / "start.ckpt")
    assert resolve_ckpt_path(trainer, given, fit=True) == given  # a first start: as given
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert resolve_ckpt_path(trainer, given, fit=True) == given  # restarted, nothing saved yet
    atomic_save({"state_dict": {}, "global_step": 6, "pytorch-lightning_version": "2"}, run / "checkpoints" / "a.ckpt")
    assert resolve_ckpt_path(trainer, given, fit=True) == str(run / "checkpoints" / "a.ckpt")
    assert resolve_ckpt_path(trainer, given, fit=False) == given  # (validate is not resumed)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # a requeued job
    assert resolve_ckpt_path(trainer, None, fit=True) == str(run / "checkpoints" / "a.ckpt")


def test_fault_specifications_are_read_or_refused():
    from mogao.errors import ConfigError
    from mogao.training.faults import InjectedFault, parse_faults

    assert parse_faults("kill:rank=1,step=3,delay=0.5; hang:at=barrier,restart=2") == [
        InjectedFault("kill", rank=1, step=3, delay=0.5), InjectedFault("hang", at="barrier", restart=2)]
    for bad in ("stop:rank=1", "kill:rank=one", "kill:when=3"):
        with pytest.raises(ConfigError, match="MOGAO_FAULT"):
            parse_faults(bad)


def test_the_watchdog_is_inert_in_one_process_and_can_be_pickled():
    import pickle
    import types

    from mogao.training.faults import CollectiveWatchdog

    wd = CollectiveWatchdog(timeout=5)
    trainer = types.SimpleNamespace(global_rank=0, world_size=1, global_step=0)
    wd.setup(trainer, None, "fit")  # one process: no thread, no wrapped collectives
    assert wd._thread is None and wd.heartbeat == 1.25
    copy = pickle.loads(pickle.dumps(wd))  # (Lightning's spawn launchers pickle the callbacks)
    assert copy.timeout == 5 and copy._thread is None and not copy._stop.is_set()


def _beat(rank: int, step: int, phase: str, count: int, now: float, in_collective: int | None = None) -> dict:
    c = None if in_collective is None else {"number": in_collective, "name": "all_reduce",
                                            "called_from": "objectives.py:32 _mean_over_ranks", "waited_s": 5.0}
    return {"rank": rank, "time": now, "step": step, "phase": phase, "phase_s": 5.0, "collectives": count,
            "in_collective": c, "last_collective": {"number": count, "name": "broadcast", "called_from": "x"}}


def test_stuck_ranks_names_the_rank_that_holds_the_group_up():
    from mogao.training.faults import stuck_ranks

    now = 1000.0
    # ranks 0 and 2 wait in collective #12; rank 1 has entered 11 collectives; rank 3 is silent
    beats = {0: _beat(0, 7, "forward", 12, now, 12), 1: _beat(1, 7, "forward", 11, now - 1),
             2: _beat(2, 7, "forward", 12, now, 12), 3: _beat(3, 7, "forward", 12, now - 60, 12)}
    stuck, why = stuck_ranks(beats, now, stale_after=8)
    assert stuck == [1, 3]
    assert "rank 1 has not reached collective #12 all_reduce" in why and "rank 3 no heartbeat for 60.0 s" in why
    # nobody in a Python-level collective (DDP's gradient all-reduce): the rank still in the forward is behind
    beats = {0: _beat(0, 7, "backward", 12, now), 1: _beat(1, 7, "forward", 12, now)}
    assert stuck_ranks(beats, now, stale_after=8)[0] == [1]
    beats = {0: _beat(0, 7, "forward", 12, now, 12), 1: _beat(1, 7, "forward", 12, now, 12)}
    stuck, why = stuck_ranks(beats, now, stale_after=8)
    assert stuck == [] and why.startswith("every rank waits in collective #12")


def test_a_failed_collective_is_told_from_other_errors():
    from mogao.training.faults import is_collective_failure

    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")
    assert is_collective_failure(gloo)
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise ValueError("while saving") from e
    except ValueError as wrapped:
        assert is_collective_failure(wrapped)
    assert not is_collective_failure(RuntimeError("shape mismatch")) and not is_collective_failure(None)


def test_the_collective_timeout_is_the_strategy_option_with_a_default_of_minutes():
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from mogao.errors import ConfigError
    from mogao.training.faults import DEFAULT_COLLECTIVE_TIMEOUT
    from mogao.training.strategies import MogaoDDPStrategy, MoTFSDP2Strategy, configure_collective_timeout

    assert DEFAULT_COLLECTIVE_TIMEOUT < 30 * 60
    ddp = DDPStrategy()  # `--trainer.strategy=ddp`: torch's 30 minutes become mogao's default
    assert configure_collective_timeout(ddp) == DEFAULT_COLLECTIVE_TIMEOUT
    assert ddp._timeout == timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT + backstop_margin(DEFAULT_COLLECTIVE_TIMEOUT))
    assert configure_collective_timeout(DDPStrategy(timeout=timedelta(seconds=90))) == 90  # set explicitly: kept
    for strategy in (MogaoDDPStrategy(collective_timeout=30), MoTFSDP2Strategy(collective_timeout=30)):
        assert configure_collective_timeout(strategy) == 30 and strategy._timeout == timedelta(seconds=40)
    assert configure_collective_timeout(MogaoDDPStrategy(collective_timeout=None)) is None
    with pytest.raises(ConfigError, match="collective_timeout"):
        MogaoDDPStrategy(collective_timeout=0)


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process as rank 0 of a torchrun group of one node with one process."""
    for k, v in {"TORCHELASTIC_RUN_ID": "test", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)


def test_an_elastic_restart_on_fewer_nodes_takes_the_launchers_world(torchrun_env):
    import lightning.pytorch as pl

    from mogao.training.strategies import MogaoDDPStrategy, follow_launcher_world

    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy=MogaoDDPStrategy(), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="does not match the world size"):  # what Lightning does alone
        trainer.strategy.launcher.launch(lambda: None)
    assert follow_launcher_world(trainer.strategy) == 1
    assert trainer.num_nodes == 1 and trainer.strategy.launcher.launch(lambda: "ok") == "ok"
    assert follow_launcher_world(trainer.strategy) is None  # nothing to change any more


def test_a_restarted_group_sharing_the_launchers_store_gets_keys_of_its_own(monkeypatch):
    import importlib
    from datetime import timedelta

    import torch.distributed as dist

    from mogao.training.strategies import isolate_restarted_store

    shared = dist.HashStore()  # (the launcher's store, with what the previous attempt left in it)
    shared.set_timeout(timedelta(seconds=5))
    shared.set("default_pg/0//cpu//rank_1", b"address of the previous attempt")
    module = importlib.import_module("torch.distributed.rendezvous")
    monkeypatch.setattr(module, "_rendezvous_handlers", {"env": lambda url, **kw: iter([(shared, 0, 2)])})
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    original = module._rendezvous_handlers["env"]
    assert not isolate_restarted_store() and module._rendezvous_handlers["env"] is original  # a first start
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    assert isolate_restarted_store() and isolate_restarted_store()  # (once)
    store, rank, world = next(module._rendezvous_handlers["env"]("env://"))
    assert (rank, world) == (0, 2) and not store.check(["default_pg/0//cpu//rank_1"])  # nothing stale is seen
    store.set("k", "v")
    assert shared.get("mogao/restart_2/k") == b"v"
