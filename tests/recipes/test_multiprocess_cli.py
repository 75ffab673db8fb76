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

ROOT = Path(__file__).resolve().parents[2]
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
            env_extra: dict[str, str] | None = None, expect: int = 0, nranks: int = 2) -> str:
    """Run the launcher command(s) to the end under a watchdog; returns the combined output. Fails the test on
    an exit status other than `expect` (any non-zero one for expect=-1), on a timeout (after killing every
    process) and on ranks whose collectives differ."""
    trace.mkdir(parents=True, exist_ok=True)
    for old in trace.glob("rank*.log"):
        old.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MOGAO_COLLECTIVE_TRACE": str(trace),
           "PYTHONPATH": os.pathsep.join([str(TRACE), str(ROOT), str(ROOT / "tests")]),
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
    _, report = _trace_report(trace, nranks)
    if codes == ["hung"] or any((c == 0) if expect == -1 else (c != expect) for c in codes):
        raise AssertionError(f"exit {codes} (watchdog {timeout} s)\n{report}\n--- output (tail) ---\n{out[-6000:]}")
    assert "ranks part" not in report, report
    return out


def _torchrun_cmd(args: list[str], nproc: int, port: int, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "mogao.cli",
            *args]


def torchrun(args: list[str], cwd: Path, trace: Path, detail: bool = False, nproc: int = 2, **kw) -> str:
    return _launch([_torchrun_cmd(args, nproc, _free_port())], cwd, trace, detail, nranks=nproc, **kw)


def _part_args(parts: dict[str, Path]) -> list[str]:
    return [f"--model.init_args.tokenizer={parts['tokenizer']}", f"--model.init_args.model.llm={parts['llm']}",
            f"--model.init_args.model.vit={parts['vit']}"]


def _rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ---- every tiny recipe, both strategies ------------------------------------------------------------------

def _steps_to_meet_every_source(recipe: str) -> tuple[int, set[str]]:
    """The number of training steps after which a run of `recipe` has drawn a batch from each source of its
    first mixture (the source of batch b is a function of the seed and b alone, the same on every rank), and
    those sources."""
    import types

    import yaml

    from mogao.training.datamodule import MixtureStream

    cfg = yaml.safe_load((ROOT / "recipes" / f"{recipe}.yaml").read_text())
    schedules = [c["init_args"]["milestones"] for c in cfg["trainer"].get("callbacks", [])
                 if isinstance(c, dict) and c["class_path"].endswith("CurriculumSchedule")]
    mix = ({k: v for k, v in schedules[0][0]["mixture"].items() if v > 0} if schedules
           else {s["name"]: s.get("weight", 1.0) for s in cfg["data"]["sources"]})
    stream = MixtureStream({k: types.SimpleNamespace(config=None) for k in mix}, mix,
                           seed=cfg["data"].get("data", {}).get("seed", 0))
    seen: set[str] = set()
    steps = 0
    while seen != set(mix):
        seen.add(stream.source_of(steps))
        steps += 1
    return steps, seen


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("recipe", ["understanding", "t2i", "interleaved"])
def test_fit_tiny_recipe_on_two_processes(recipe, strategy, parts, tmp_path):
    """Under DDP long enough to meet every source of the mixture (batches of questions leave the generation
    expert without input, text-to-image batches have no question: DDP stopped at the first such batch, step
    9 of tiny/t2i); under FSDP2 a few steps (tests/training/test_distributed.py has lopsided batches)."""
    run = tmp_path / "run"
    steps, sources = (3, set()) if strategy == "fsdp2" else _steps_to_meet_every_source(f"tiny/{recipe}")
    steps = max(steps, 3)
    torchrun(["fit", "--config", f"tiny/{recipe}", "--trainer.devices=2", f"--trainer.strategy={STRATEGIES[strategy]}",
              f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
              f"--trainer.default_root_dir={run}", f"--model.init_args.save_dir={run / 'model'}",
              *(["--model.init_args.exact_match_samples=2"] if recipe != "t2i" else []), *_part_args(parts)],
             tmp_path, tmp_path / "trace", detail=strategy == "fsdp2")
    assert (run / "model" / "model.safetensors").is_file()
    rows = _rows(run, "train")
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    if strategy == "ddp" and recipe != "understanding":  # (rank 0's rows) batches without and with image targets
        assert {r["source"] for r in rows} & {"vqa", "caption", "digits_read"} and sources
        assert {r["image_loss"] > 0 for r in rows} == {True, False}
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


@pytest.mark.parametrize("strategy", ["ddp", "{class_path: mogao.training.strategies.MoTFSDP2Strategy}"])
def test_two_processes_equal_one_process_through_the_cli(strategy, parts, tmp_path):
    data = _equal_batches_data(tmp_path)
    common = ["fit", "--config", "tiny/t2i", "--trainer.max_steps=4", "--trainer.val_check_interval=1000",
              f"--data.path={data}", "--data.data.token_budget=300", "--data.data.p_drop_text=0",
              "--data.data.p_drop_images=0", "--model.init_args.lambda_text=0", *_part_args(parts)]
    two, one = tmp_path / "two", tmp_path / "one"
    # (FSDP2 in fp32 here: the preset's bf16 parameters would differ from the fp32 single process)
    torchrun([*common, "--trainer.devices=2", f"--trainer.strategy={strategy}", f"--trainer.default_root_dir={two}",
              f"--model.init_args.save_dir={two / 'model'}"], tmp_path, tmp_path / "trace", detail="FSDP" in strategy)
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


# ---- the curriculum, interrupted and resumed; two "nodes"; LoRA ---------------------------------------------

def _curriculum(tmp_path: Path, parts: dict[str, Path], strategy: str) -> Path:
    """The tiny curriculum's three stage recipes, a few steps each, on 2 processes; rank 1 gets a pre-emption
    signal (SIGUSR1) after step 2 of the second stage."""
    from omegaconf import OmegaConf

    stop = "--trainer.callbacks+={class_path: mp_callbacks.SignalAt, init_args: {step: 2, rank: 1}}"
    spec = {"out": str(tmp_path / "cur"),
            "overrides": ["--trainer.max_steps=3", "--trainer.val_check_interval=2", "--trainer.devices=2",
                          f"--trainer.strategy={STRATEGIES[strategy]}", "--model.init_args.exact_match_samples=4",
                          *_part_args(parts)],
            "stages": [{"name": n, "config": str(ROOT / "recipes" / "tiny" / f"{n}.yaml"),
                        **({"overrides": [stop]} if n == "t2i" else {})}
                       for n in ("understanding", "t2i", "interleaved")]}
    path = tmp_path / "curriculum.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(spec)))
    return path


def test_curriculum_on_two_processes_resumes_after_preemption(parts, tmp_path):
    path = _curriculum(tmp_path, parts, "ddp")
    out = torchrun(["curriculum", str(path)], tmp_path, tmp_path / "trace1", expect=-1)
    cur = tmp_path / "cur"
    assert (cur / "1-understanding" / "done.json").is_file()
    assert not (cur / "2-t2i" / "done.json").exists() and (cur / "2-t2i" / "checkpoints" / "last.ckpt").is_file()
    assert [r["step"] for r in _rows(cur / "2-t2i", "train")] == [1, 2], out[-3000:]
    out = torchrun(["curriculum", str(path)], tmp_path, tmp_path / "trace2")
    assert "'understanding': finished earlier, skipped" in out
    assert "'t2i': resuming from checkpoints/last.ckpt" in out
    assert [r["step"] for r in _rows(cur / "2-t2i", "train")] == [1, 2, 3]
    for d in ("1-understanding", "2-t2i", "3-interleaved"):
        assert (cur / d / "done.json").is_file() and (cur / d / "model" / "model.safetensors").is_file()


def test_two_nodes_on_localhost(parts, tmp_path):
    """`torchrun --nnodes=2 --nproc-per-node=1` twice on one machine: the README's multi-node launch."""
    run, port = tmp_path / "run", _free_port()
    args = ["fit", "--config", "tiny/t2i", "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp",
            "--trainer.max_steps=2", "--trainer.val_check_interval=2", f"--trainer.default_root_dir={run}",
            f"--model.init_args.save_dir={run / 'model'}", *_part_args(parts)]
    _launch([_torchrun_cmd(args, 1, port, nnodes=2, node_rank=k) for k in (0, 1)], tmp_path, tmp_path / "trace",
            detail=False)
    assert [r["step"] for r in _rows(run, "train")] == [1, 2]
    assert (run / "model" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def base_model(parts, tmp_path_factory) -> Path:
    """A saved tiny model (one step of the tiny t2i recipe) for the LoRA recipes to start from."""
    d = tmp_path_factory.mktemp("base")
    subprocess.run([sys.executable, "-m", "mogao.cli", "fit", "--config", "tiny/t2i", "--trainer.max_steps=1",
                    "--trainer.val_check_interval=1000", f"--trainer.default_root_dir={d / 'run'}",
                    f"--model.init_args.save_dir={d / 'model'}", *_part_args(parts)], cwd=d, check=True,
                   capture_output=True, timeout=WATCHDOG, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return d / "model"


def _mixed_user_data(tmp_path: Path) -> Path:
    """One JSONL of a user's mixed samples (questions about images, text-to-image, edits and stories) with the
    image folder beside it: the packed batches of the two ranks hold different kinds."""
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "img").symlink_to(ROOT / "tests" / "data" / "lora" / "img")
    lines = []
    for task in ("understanding", "t2i", "interleaved"):
        lines += (ROOT / "tests" / "data" / "lora" / f"{task}.jsonl").read_text().splitlines()
    (d / "mixed.jsonl").write_text("\n".join(lines) + "\n")
    return d / "mixed.jsonl"


@pytest.mark.parametrize("recipe", ["tiny-understanding", "tiny-t2i", "tiny-interleaved"])
def test_lora_recipe_on_two_processes(recipe, base_model, tmp_path):
    """Every tiny LoRA recipe under DDP on a user's mixed JSONL, in batches of one or two samples, for 8 steps:
    batches without a generation target or without an image come on one rank while the other has one."""
    run, data = tmp_path / "run", _mixed_user_data(tmp_path)
    torchrun(["fit", "--config", f"lora/{recipe}", "--trainer.devices=2", "--trainer.strategy=ddp",
              "--trainer.max_steps=8", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
              f"--trainer.default_root_dir={run}", "--data.data.token_budget=160",
              f"--model.init_args.init_from={base_model}", f"--model.init_args.tokenizer={base_model}",
              f"--data.path={data}", f"--data.val_path={data}"],
             tmp_path, tmp_path / "trace")
    rows = _rows(run, "train")
    assert [r["step"] for r in rows] == list(range(1, 9))
    # rank 0 alone met batches with and without image targets (its metrics are logged)
    assert {r["image_loss"] > 0 for r in rows} == {True, False}
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


# ---- a user's JSONL on every recipe family ----------------------------------------------------------------

_TINY_MODEL = ["--model.init_args.model.autoencoder=pixel", "--model.init_args.model.autoencoder_subfolder=null",
               "--model.init_args.model.latent_patch=4", "--model.init_args.model.attention=sdpa_dense",
               "--model.init_args.model.vit_feature_layer=-1", "--trainer.accelerator=cpu", "--trainer.devices=1",
               "--trainer.num_nodes=1",
               "--data.num_workers=0", "--data.data.token_budget=2048", "--data.data.max_image_tokens=64"]


@pytest.mark.parametrize("recipe", ["tiny/interleaved", "lora/interleaved", "qwen2.5-3b/t2i", "qwen2.5-7b/understanding"])
def test_user_jsonl_on_every_recipe_family(recipe, parts, base_model, tmp_path):
    """`--data.path` (and `--data.sources`, replacing the recipe's list) on each family: the run reaches its
    first optimizer step on the user's file; the real-scale recipes keep their strategy (FSDP2, meta-device
    init), precision and optimizer and swap only the checkpoints for tiny ones (none can be downloaded here)."""
    task = recipe.split("/")[1]
    data = ROOT / "tests" / "data" / "lora" / f"{task}.jsonl"
    run = tmp_path / "run"
    args = ["fit", "--config", recipe, "--trainer.max_steps=1", "--trainer.val_check_interval=1000",
            f"--trainer.default_root_dir={run}"]
    if recipe.startswith("qwen"):
        args += _part_args(parts) + _TINY_MODEL + [f"--data.sources=[{{name: mine, path: {data}}}]"]
    elif recipe.startswith("lora"):  # the real-scale LoRA recipe on the tiny base (QLoRA needs CUDA)
        args += [f"--model.init_args.init_from={base_model}", f"--model.init_args.tokenizer={base_model}",
                 "--model.init_args.lora.quantize=none", "--trainer.accelerator=cpu",
                 f"--data.path={data}"]
    else:
        args += _part_args(parts) + [f"--data.path={data}"]
    torchrun(args, tmp_path, tmp_path / "trace", nproc=1)
    rows = _rows(run, "train")
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["source"] == ("mine" if recipe.startswith("qwen") else task)


def test_missing_user_file_is_named(tmp_path, monkeypatch):
    from mogao.errors import ConfigError
    from mogao.recipes import build_cli
    from mogao.training.datamodule import MogaoDataModule

    monkeypatch.chdir(tmp_path)
    # parsing alone never opens the data: a recipe's placeholder paths may be replaced on the command line
    cli = build_cli(["--config", str(ROOT / "recipes/qwen2.5-3b/t2i.yaml"), "--data.path=nothere.jsonl"],
                    run=False, instantiate=False)
    assert cli.config["data"]["path"] == "nothere.jsonl"
    with pytest.raises(ConfigError, match="file not found: 'nothere.jsonl'"):
        MogaoDataModule(tokenizer="x", path="nothere.jsonl")
