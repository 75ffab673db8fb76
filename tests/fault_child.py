"""Training processes for the checkpoint fault tests (`test_checkpoint_faults.py`), served by forking.

    python tests/fault_child.py

Starting `mogao fit` costs seconds before the first step (importing Lightning, parsing and checking the
arguments, building the model), which would dominate a test that kills dozens of training processes. So:

- this script (the *zygote*) imports everything once, then per `prepare` request forks a *prepared run*;
- the prepared run calls `mogao.cli.main(args)`, which parses the arguments and instantiates the model,
  data and trainer exactly as `mogao fit` does. Where LightningCLI would now run the subcommand, it waits
  instead and forks one *attempt* per request;
- an attempt continues from that very point as the `mogao fit` process would: `before_fit` (which resolves
  `--ckpt_path=last` against what is on disk now), `trainer.fit`, and `main`'s exit status.

So every attempt is a separate process, in the state of a freshly started `mogao fit` just before it looks at
the run directory (nothing before that point depends on the run directory), and what it leaves on disk is
exactly what it wrote before it ended or was killed.

Protocol, one JSON object per line on stdin / stdout:

    zygote        -> {"ready": true}
    {"prepare": [args...], "log": path}      -> {"prepared": true}   (or {"released": status} if it failed)
    {"attempt": log_path, "slow_write": s}   -> {"pid": n}, then {"pid": n, "status": s} when it has ended
    {"done": true}                           -> {"released": 0}      (the prepared run ends)

A status is the exit status, or minus the signal that killed the process. `slow_write` > 0 makes the attempt
write checkpoint files in 64 KiB pieces with that pause after each piece (through `AtomicCheckpointIO.write`),
like slow storage, so that a kill can be timed to land inside a write.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CHUNK = 64 * 1024


def _redirect_output(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _slow_storage(pause: float) -> None:
    """Make this process's checkpoint writes take `pause` seconds per 64 KiB."""
    import torch

    from mogao.training.checkpointing import AtomicCheckpointIO

    def write(self, checkpoint, f) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        data = buf.getbuffer()
        for start in range(0, len(data), CHUNK):
            f.write(data[start:start + CHUNK])
            f.flush()
            time.sleep(pause)

    AtomicCheckpointIO.write = write


def _send(reply, **message: Any) -> None:
    reply.write(json.dumps(message) + "\n")
    reply.flush()


def _prepared_run(args: list[str], log: str, reply) -> None:
    """Parse and instantiate `mogao fit args`, then fork attempts that run it (see the module docstring)."""
    from lightning.pytorch.cli import LightningCLI

    from mogao.cli import main

    run_subcommand = LightningCLI._run_subcommand

    def fork_attempts(cli: LightningCLI, subcommand: str) -> None:
        _send(reply, prepared=True)
        while True:
            line = sys.stdin.readline()
            req = json.loads(line) if line.strip() else {"done": True}
            if req.get("done"):
                os._exit(0)
            pid = os.fork()
            if pid == 0:  # the attempt: carry on as `mogao fit` would from here
                _redirect_output(req["attempt"])
                if req.get("slow_write"):
                    _slow_storage(float(req["slow_write"]))
                return run_subcommand(cli, subcommand)
            _send(reply, pid=pid)
            _, status = os.waitpid(pid, 0)
            _send(reply, pid=pid, status=os.waitstatus_to_exitcode(status))

    LightningCLI._run_subcommand = fork_attempts
    _redirect_output(log)
    code = 1
    try:
        code = main(args)  # returns only in an attempt (or when parsing / instantiating failed)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def serve() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # no tokenizer threads in a process that forks
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(1)
    import lightning.pytorch  # noqa: F401  (the imports every run needs, done once)
    import tqdm
    import transformers  # noqa: F401

    import callbacks.history  # noqa: F401
    import callbacks.preemption  # noqa: F401
    import mogao.cli  # noqa: F401
    import mogao.training.datamodule  # noqa: F401
    import mogao.training.module  # noqa: F401

    tqdm.tqdm.monitor_interval = 0  # no progress-bar monitor thread in a process that forks
    reply = os.fdopen(os.dup(1), "w")  # the protocol's own channel: output of the runs goes to their logs
    _send(reply, ready=True)
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _prepared_run(req["prepare"], req["log"], reply)
        _, status = os.waitpid(pid, 0)
        _send(reply, released=os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    serve()
