"""Checkpoints survive faults: damaged files are detected and skipped, `--ckpt_path=last` falls back to the
newest valid checkpoint, SIGKILL at random moments (also in the middle of checkpoint writes) never leaves a
torn checkpoint and the restarted run ends with the same weights bit for bit, and SIGTERM / SIGUSR1 stop a run
at a step boundary with a checkpoint to resume from."""

from __future__ import annotations

import contextlib
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

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

from mogao.model.checkpoint_files import CheckpointError, check_checkpoint
from mogao.model.tiny import TinySpec, ensure_tiny_components
from mogao.recipes import build_cli
from mogao.training.checkpointing import (
    AtomicCheckpointIO,
    CheckpointWarning,
    atomic_save,
    find_valid_checkpoint,
    is_temp_file,
    temp_path_for,
)
from mogao.training.rundir import read_history

REPO = Path(__file__).resolve().parents[2]
FAULT_CHILD = Path(__file__).resolve().parents[1] / "fault_child.py"
STEPS = 30  # of the runs that are killed
KEEP = 2  # newest step checkpoints kept by ModelCheckpoint (plus last.ckpt)
MIN_KILLS = 20
SLOW_WRITE = 0.002  # s per 64 KiB: a 1.1 MB checkpoint takes ~40 ms to write, long enough to kill inside
# how the attempts are killed, in turn: while a checkpoint is written, at a random moment of training, while
# starting; each kill lets a run advance by two steps at most, so MIN_KILLS kills fit in STEPS steps
KILL_MODES = ("write", "training", "write", "training", "start")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_parts")
    spec = TinySpec(hidden_size=32, layers=2, heads=2, kv_heads=1, vit_hidden_size=16, vit_patch_size=8)
    d = {k: root / k for k in ("tokenizer", "llm", "vit")}
    ensure_tiny_components(spec, **d)
    return d


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The tiny T2I recipe with 24 samples per source (fast data setup)."""
    from conftest import shrunk_recipe

    return shrunk_recipe(tmp_path_factory.mktemp("fault_recipe"), "t2i", n=24, val_n=4)


def fit_args(parts, recipe: Path, root: Path, steps: int, keep: int = KEEP) -> list[str]:
    """`mogao fit` arguments of a tiny T2I run checkpointing every step: the `keep` newest step checkpoints
    (Lightning's ModelCheckpoint ranking by `step`) plus last.ckpt; EMA on, validation every 5 steps."""
    ckpt = ("{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true, "
            f"every_n_train_steps: 1, save_top_k: {keep}, monitor: step, mode: max}}}}")
    return [
        "fit", "--config", str(recipe),
        f"--model.init_args.tokenizer={parts['tokenizer']}", f"--model.init_args.model.llm={parts['llm']}",
        f"--model.init_args.model.vit={parts['vit']}", "--model.init_args.tiny=null",
        "--model.init_args.model.latent_patch=8", "--model.init_args.exact_match_samples=0",
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=5", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.callbacks=[{ckpt}, {{class_path: callbacks.EMA, init_args: {{decay: 0.9}}}}]",
        f"--trainer.default_root_dir={root}",
        "--data.data.token_budget=400", "--data.data.max_image_tokens=16",
    ]


def train_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_history(run / "metrics.jsonl") if r["kind"] == "train"}


def assert_same_training(a: Path, b: Path, ema: bool = True) -> None:
    """Runs a and b logged the same losses at every step and saved bit-identical weights (and EMA weights)."""
    ra, rb = train_rows(a), train_rows(b)
    assert sorted(ra) == sorted(rb) and ra
    assert [ra[s]["loss"] for s in ra] == [rb[s]["loss"] for s in ra]
    for sub in ("model", "ema") if ema else ("model",):
        wa, wb = load_file(str(a / sub / "model.safetensors")), load_file(str(b / sub / "model.safetensors"))
        assert wa.keys() == wb.keys()
        different = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not different, f"{sub}: {len(different)} tensors differ, e.g. {different[:3]}"


def step_of(path: Path) -> int:
    return torch.load(path, map_location="cpu")["global_step"]


# ---- an in-process run whose checkpoints the damage tests start from --------------------------------------


@pytest.fixture(scope="module")
def run8(parts, recipe, tmp_path_factory, one_thread):
    """8 steps keeping the 3 newest step checkpoints; records the signal handlers before and after."""
    root = tmp_path_factory.mktemp("run8")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    build_cli(fit_args(parts, recipe, root, steps=8, keep=3))
    after = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    return root, before, after


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for sub in ("model", "ema"):
        shutil.rmtree(dst / sub, ignore_errors=True)
    return dst


def test_a_finished_fit_keeps_the_newest_checkpoints_and_restores_signal_handlers(run8):
    root, before, after = run8
    names = sorted(p.name for p in (root / "checkpoints").iterdir())
    assert names == ["epoch=0-step=6.ckpt", "epoch=0-step=7.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
    assert after == before


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_save({"state_dict": {}, "global_step": 1}, target)

    def broken(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_save({"state_dict": {}, "global_step": 2}, target, write=broken)
    assert check_checkpoint(target) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file is gone too
    assert is_temp_file(temp_path_for(target)) and not is_temp_file(target)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "torn_tail":
        path.write_bytes(data[:-100])
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(5000))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "zeroed_header":  # a damaged record header inside an otherwise complete archive
        at = data.index(b"PK\x03\x04", len(data) // 2)
        path.write_bytes(data[:at] + bytes(64) + data[at + 64:])
    elif how == "bit_flip":  # one flipped bit in tensor data: only the records' CRC-32s tell
        at = len(data) // 2
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:])
    elif how == "no_state_dict":
        ckpt = torch.load(path, map_location="cpu")
        del ckpt["state_dict"]
        torch.save(ckpt, path)
    elif how == "not_a_dict":
        torch.save([1, 2, 3], path)
    else:
        raise ValueError(how)


DAMAGE = ["truncated", "torn_tail", "garbage", "empty", "zeroed_header", "no_state_dict", "not_a_dict",
          "bit_flip"]


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_raises_checkpoint_error_naming_the_file(run8, tmp_path, how):
    bad = tmp_path / "last.ckpt"
    shutil.copyfile(run8[0] / "checkpoints" / "last.ckpt", bad)
    _damage(bad, how)
    with pytest.raises(CheckpointError, match=re.escape(str(bad))) as e:
        check_checkpoint(bad)
    print(f"{how}: {e.value}")
    if how == "bit_flip":  # unpickling cannot see it; the CRC-32 check above does
        assert AtomicCheckpointIO().load_checkpoint(bad)["global_step"] == 8
    else:
        with pytest.raises(CheckpointError, match=re.escape(str(bad))):
            AtomicCheckpointIO().load_checkpoint(bad)


def test_fit_from_a_damaged_checkpoint_file_is_an_error_naming_it(run8, parts, recipe, tmp_path, capsys):
    from mogao.cli import main

    bad = tmp_path / "given.ckpt"
    shutil.copyfile(run8[0] / "checkpoints" / "last.ckpt", bad)
    _damage(bad, "bit_flip")
    assert main([*fit_args(parts, recipe, tmp_path / "run", steps=2), f"--ckpt_path={bad}"]) == 2
    err = capsys.readouterr().err
    assert f"mogao: error: checkpoint {bad}: damaged archive" in err, err


def test_find_valid_checkpoint_skips_damaged_ones_and_temporary_files(run8, tmp_path):
    d = tmp_path / "checkpoints"
    shutil.copytree(run8[0] / "checkpoints", d)
    assert find_valid_checkpoint(d) == d / "last.ckpt"
    _damage(d / "last.ckpt", "truncated")
    _damage(d / "epoch=0-step=8.ckpt", "empty")
    stale = temp_path_for(d / "last.ckpt")
    stale.write_bytes(b"an interrupted save")
    with pytest.warns(CheckpointWarning) as warned:
        found = find_valid_checkpoint(d)
    assert found == d / "epoch=0-step=7.ckpt" and step_of(found) == 7
    assert {Path(str(w.message).split("checkpoint ", 1)[1].split(":")[0]).name for w in warned} == {
        "last.ckpt", "epoch=0-step=8.ckpt"}
    _damage(d / "epoch=0-step=7.ckpt", "garbage")
    _damage(d / "epoch=0-step=6.ckpt", "no_state_dict")
    with pytest.warns(CheckpointWarning):
        assert find_valid_checkpoint(d) is None
    assert find_valid_checkpoint(tmp_path / "nowhere") is None


def test_resume_last_with_damaged_newest_checkpoints_continues_from_the_older_valid_one(
        run8, parts, recipe, tmp_path, capsys, one_thread):
    run = copy_run(run8[0], tmp_path / "run")
    _damage(run / "checkpoints" / "last.ckpt", "torn_tail")
    _damage(run / "checkpoints" / "epoch=0-step=8.ckpt", "truncated")
    _damage(run / "checkpoints" / "epoch=0-step=7.ckpt", "bit_flip")
    cli = build_cli([*fit_args(parts, recipe, run, steps=8, keep=3), "--ckpt_path=last"])
    out = capsys.readouterr().out
    assert "resuming from" in out and "epoch=0-step=6.ckpt" in out, out
    assert "last.ckpt" in out and "step=7" in out  # the skipped ones are named
    assert cli.trainer.global_step == 8
    assert_same_training(run8[0], run)  # steps 7 and 8 retrained from step 6: the same weights bit for bit


def test_resume_last_without_any_valid_checkpoint_starts_from_scratch(run8, parts, recipe, tmp_path, capsys,
                                                                       one_thread):
    run = copy_run(run8[0], tmp_path / "run")
    for p in (run / "checkpoints").glob("*.ckpt"):
        _damage(p, "truncated")
    cli = build_cli([*fit_args(parts, recipe, run, steps=2, keep=3), "--ckpt_path=last"])
    out = capsys.readouterr().out
    assert "no usable checkpoint" in out and "from scratch" in out, out
    assert cli.trainer.global_step == 2 and sorted(train_rows(run)) == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("*.corrupt")) == [
        "epoch=0-step=6.ckpt.corrupt", "epoch=0-step=7.ckpt.corrupt", "epoch=0-step=8.ckpt.corrupt",
        "last.ckpt.corrupt"]


def test_a_crash_leaves_a_checkpoint_that_a_fit_in_the_same_directory_continues_from(
        run8, parts, recipe, tmp_path, capsys, one_thread):
    class CrashAt(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                raise RuntimeError("crashed at step 5")

    run = tmp_path / "run"
    args = fit_args(parts, recipe, run, steps=8, keep=3)
    with pytest.raises(RuntimeError, match="crashed at step 5"):
        build_cli(args, callbacks=[CrashAt()])
    crash = run / "checkpoints" / "on_exception.ckpt"
    assert step_of(crash) == 5 and "RuntimeError at global step 5: saved" in capsys.readouterr().err
    os.remove(run / "checkpoints" / "last.ckpt")  # only the crash checkpoint knows step 5 now
    build_cli(args)  # no --ckpt_path: with an on-exception checkpoint Lightning continues the run directory
    assert f"continuing from {crash}" in capsys.readouterr().out
    assert not crash.exists()  # removed once the fit finished
    assert_same_training(run8[0], run)


def test_sigterm_during_validation_stops_through_lightning_and_leaves_last(
        run8, parts, recipe, tmp_path, capsys, one_thread):
    """Lightning's own SIGTERM stop (in the middle of validation) also leaves last.ckpt of that step."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks.preemption import Preempted
    from mogao.cli import _signal_exit_status

    class TermInValidation(pl.Callback):
        def on_validation_batch_start(self, trainer, *args):
            if trainer.global_step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    run = tmp_path / "run"
    args = fit_args(parts, recipe, run, steps=8, keep=3)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(SIGTERMException) as stop:
        build_cli(args, callbacks=[TermInValidation()])
    assert not isinstance(stop.value, Preempted) and _signal_exit_status(stop.value) == 128 + signal.SIGTERM
    assert {s: signal.getsignal(s) for s in before} == before
    last = run / "checkpoints" / "last.ckpt"
    assert f"SIGTERM: stopped at global step 5, saved {last}" in capsys.readouterr().err
    assert step_of(last) == 5 and not (run / "checkpoints" / "on_exception.ckpt").exists()
    build_cli([*args, "--ckpt_path=last"])
    assert_same_training(run8[0], run)


# ---- separate processes: SIGKILL at random moments, SIGTERM and SIGUSR1 ------------------------------------


class ForkServer:
    """`tests/fault_child.py`: one process per training attempt, without paying the start-up of Python and of
    the CLI each time (see its docstring). Use `prepare(args)` as a context manager, one at a time."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen([sys.executable, str(FAULT_CHILD)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        assert self._read() == {"ready": True}

    def _send(self, **request) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (status {self.proc.poll()})")
        return json.loads(line)

    @contextlib.contextmanager
    def prepare(self, args: list[str], log: Path):
        """`mogao` with these arguments, parsed and instantiated, ready to start attempts."""
        self._send(prepare=args, log=str(log))
        reply = self._read()
        assert reply == {"prepared": True}, f"{reply}: {log.read_text()[-3000:]}"
        try:
            yield PreparedRun(self)
        finally:
            self._send(done=True)
            assert "released" in self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class PreparedRun:
    def __init__(self, server: ForkServer) -> None:
        self.server = server

    def start(self, log: Path, slow_write: float = 0.0) -> int:
        """Start an attempt (its output goes to `log`); its process id."""
        self.server._send(attempt=str(log), slow_write=slow_write)
        return self.server._read()["pid"]

    def wait(self) -> int:
        """The exit status of the attempt started last (minus the signal that killed it)."""
        return self.server._read()["status"]

    def run(self, log: Path) -> int:
        self.start(log)
        return self.wait()


@pytest.fixture(scope="module")
def server():
    if not hasattr(os, "fork"):
        pytest.skip("the fault tests fork training processes (POSIX)")
    s = ForkServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server, parts, recipe, tmp_path_factory):
    """An uninterrupted run of the killed runs' configuration."""
    root = tmp_path_factory.mktemp("reference")
    with server.prepare(fit_args(parts, recipe, root, STEPS), root / "prepare.log") as run:
        status = run.run(root / "log.txt")
    assert status == 0, (root / "log.txt").read_text()[-3000:]
    return root


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it ended (and was reaped) just before
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(condition, pid: int, timeout: float = 60.0) -> bool:
    """Poll `condition` every 2 ms: True once it holds, False if process `pid` ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not _alive(pid):
            return False
        time.sleep(0.002)
    raise AssertionError(f"nothing happened in {timeout} s")


def _temp_files(d: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(d) if is_temp_file(e.name)}
    except FileNotFoundError:
        return set()


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _stop_inside_a_write(pid: int, ckpt: Path, stale: set[str], n: int, rng: random.Random) -> bool:
    """Freeze process `pid` (SIGSTOP) while it writes a checkpoint file - its n-th new temporary file or a later
    one - and return True; False if it ended first. The write is caught in the act whatever the load of the
    machine: a write that finished before the process was frozen is let go on (SIGCONT) and the next one
    is tried, instead of killing a process that has already moved on."""
    seen: set[str] = set()

    def writing() -> bool:
        seen.update(_temp_files(ckpt) - stale)
        return len(seen) >= n

    while _wait_for(writing, pid):
        time.sleep(rng.uniform(0.0, 0.01))
        _kill(pid, signal.SIGSTOP)
        if not _frozen(pid):
            return False  # it ended
        if _temp_files(ckpt) - stale:  # this attempt's temporary files exist only while it writes them
            return True
        _kill(pid, signal.SIGCONT)
        n = len(seen) + 1
    return False


def _frozen(pid: int, timeout: float = 10.0) -> bool:
    """Wait until process `pid` is stopped (a signal is delivered asynchronously); False if it ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        except OSError:  # no /proc: give the signal a moment
            time.sleep(0.05)
            return _alive(pid)
        if state in ("T", "t"):
            return True
        if state in ("Z", "X"):
            return False
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop in {timeout} s")


def _left_by_a_kill(ckpt: Path) -> set[str]:
    """Step checkpoints beyond the KEEP newest: a kill fell between a save and the rotation that removes the
    oldest one (Lightning's ModelCheckpoint writes the new file, then deletes the old one). The checkpoint the
    next attempt resumes from no longer lists it, so no later rotation removes it."""
    steps = sorted((p for p in ckpt.glob("epoch=*-step=*.ckpt")), key=step_of)
    return {p.name for p in steps[:-KEEP]}


def _kill_until_finished(prepared: PreparedRun, ckpt: Path, logs: Path
                         ) -> tuple[dict, list[int], float, set[str]]:
    """Start attempts and SIGKILL them (MIN_KILLS times, KILL_MODES in turn, at moments drawn from a seeded
    generator) until one finishes; after every kill, every checkpoint on disk must pass `check_checkpoint`.
    Also returns the step checkpoints that kills left beyond the rotation (`_left_by_a_kill`)."""
    rng = random.Random(2024)
    counts = {"kills": 0, "during_write": 0, "at_start": 0, "while_training": 0, "attempts": 0}
    steps_at_kill = []
    left: set[str] = set()
    t0 = time.monotonic()
    while True:
        counts["attempts"] += 1
        assert counts["attempts"] <= 3 * MIN_KILLS, counts
        log = logs / f"attempt{counts['attempts']}.log"
        stale = _temp_files(ckpt)
        last_mtime = _mtime(ckpt / "last.ckpt")
        kill = counts["kills"] < MIN_KILLS
        mode = KILL_MODES[(counts["attempts"] - 1) % len(KILL_MODES)] if kill else None
        pid = prepared.start(log, slow_write=SLOW_WRITE)
        if mode == "write":  # kill inside the n-th new write (or a later one), up to 10 ms into it
            n = rng.randint(1, 2)  # (two writes a step: the step checkpoint, then last.ckpt)
            if _stop_inside_a_write(pid, ckpt, stale, n, rng):
                _kill(pid)
        elif mode == "training":  # kill at a random moment after the next last.ckpt is in place
            if _wait_for(lambda m=last_mtime: _mtime(ckpt / "last.ckpt") != m, pid):
                time.sleep(rng.uniform(0.0, 0.08))
                _kill(pid)
        elif mode == "start":  # while starting: finding and checking the checkpoint, restoring it, setting up
            time.sleep(rng.uniform(0.0, 0.4))
            _kill(pid)
        status = prepared.wait()
        if status == 0:
            break
        assert status == -signal.SIGKILL, log.read_text()[-3000:]
        counts["kills"] += 1
        counts["at_start" if mode == "start" else "while_training"] += 1
        if _temp_files(ckpt) - stale:  # a save was under way when the process died
            counts["during_write"] += 1
        for p in ckpt.glob("*.ckpt"):  # every checkpoint on disk is complete and valid
            check_checkpoint(p)
        left |= _left_by_a_kill(ckpt)
        steps_at_kill.append(step_of(ckpt / "last.ckpt") if (ckpt / "last.ckpt").exists() else 0)
    return counts, steps_at_kill, time.monotonic() - t0, left


def test_sigkill_at_random_moments_never_tears_a_checkpoint_and_resume_is_exact(
        server, reference, parts, recipe, tmp_path):
    """Kill a training process with SIGKILL again and again - while it starts, while it trains, and while it
    writes a checkpoint - restarting it with --ckpt_path=last each time; it must end as the reference did."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    args = [*fit_args(parts, recipe, run, STEPS), "--ckpt_path=last"]
    with server.prepare(args, tmp_path / "prepare.log") as prepared:
        counts, steps_at_kill, took, left_by_kills = _kill_until_finished(prepared, ckpt, tmp_path)
    print(f"SIGKILL: {counts}; last.ckpt step after each kill: {steps_at_kill}; {took:.1f} s "
          f"({took / counts['attempts']:.2f} s per attempt)")
    assert counts["kills"] >= MIN_KILLS and counts["during_write"] >= 5, counts
    assert not _temp_files(ckpt)  # the finishing run removed what killed saves left
    # keep-last-N is Lightning's ModelCheckpoint rotation; it never deletes the checkpoint a run resumed from,
    # so a step checkpoint that an attempt resumed from (the newest one when a kill fell between the step
    # checkpoint and last.ckpt) may stay as well, and so may one that a kill left between a save and the
    # rotation (seen on disk right after that kill; more likely on a busy machine, where the process can be
    # descheduled inside that window)
    resumed_from = {line.split("resuming from ", 1)[1].split()[0].rsplit("/", 1)[-1]
                    for log in tmp_path.glob("attempt*.log") for line in log.read_text().splitlines()
                    if "resuming from " in line}
    newest = {f"epoch=0-step={s}.ckpt" for s in range(STEPS - KEEP + 1, STEPS + 1)}
    kept = {p.name for p in ckpt.glob("*.ckpt")}
    allowed = newest | {"last.ckpt"} | resumed_from | left_by_kills
    assert newest | {"last.ckpt"} <= kept <= allowed, (kept, resumed_from, left_by_kills)
    print(f"checkpoints kept: {sorted(kept)}")
    assert step_of(ckpt / "last.ckpt") == STEPS
    assert_same_training(reference, run)


def _wait_for_rows(run: Path, n: int, proc_alive, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(train_rows(run)) < n:
        assert proc_alive(), "the run ended before it was signalled"
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.01)


def _assert_stopped_with_a_resumable_checkpoint(run: Path, log: str, signame: str) -> int:
    rows = train_rows(run)
    stopped = max(rows)
    assert f"{signame}: stopped at global step {stopped}" in log, log[-3000:]
    assert step_of(run / "checkpoints" / "last.ckpt") == stopped  # nothing trained is lost
    assert 0 < stopped < STEPS and not (run / "model").exists()  # an interrupted run is not a finished one
    return stopped


def test_sigterm_saves_last_and_exits_then_resume_finishes_the_same(server, reference, parts, recipe,
                                                                    tmp_path):
    """`mogao fit` in its own process (python -m mogao.cli) gets SIGTERM while it trains."""
    run = tmp_path / "run"
    args = fit_args(parts, recipe, run, STEPS)
    log = tmp_path / "sigterm.log"
    with log.open("w") as out:
        # one thread, as in the fork server's processes: the same arithmetic, so the same weights bit for bit
        proc = subprocess.Popen([sys.executable, "-m", "mogao.cli", *args], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            _wait_for_rows(run, 6, lambda: proc.poll() is None)
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert status == 128 + signal.SIGTERM, log.read_text()[-3000:]
    stopped = _assert_stopped_with_a_resumable_checkpoint(run, log.read_text(), "SIGTERM")
    with server.prepare([*args, "--ckpt_path=last"], tmp_path / "prepare.log") as prepared:
        status = prepared.run(tmp_path / "resume.log")
    assert status == 0, (tmp_path / "resume.log").read_text()[-3000:]
    print(f"SIGTERM: stopped after step {stopped}, resumed to step {STEPS}")
    assert_same_training(reference, run)


def test_sigusr1_outside_slurm_saves_last_and_exits_then_resume_finishes_the_same(server, reference, parts,
                                                                                    recipe, tmp_path):
    run = tmp_path / "run"
    args = [*fit_args(parts, recipe, run, STEPS), "--ckpt_path=last"]  # the first time: nothing to resume
    with server.prepare(args, tmp_path / "prepare.log") as prepared:
        pid = prepared.start(tmp_path / "sigusr1.log")
        _wait_for_rows(run, 4, lambda: _alive(pid))
        os.kill(pid, signal.SIGUSR1)
        assert prepared.wait() == 128 + signal.SIGUSR1
        _assert_stopped_with_a_resumable_checkpoint(run, (tmp_path / "sigusr1.log").read_text(), "SIGUSR1")
        assert prepared.run(tmp_path / "resume.log") == 0
    assert_same_training(reference, run)
