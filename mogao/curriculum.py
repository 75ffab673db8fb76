"""Staged curriculum: run stage recipes in order, each stage starting from the previous stage's saved weights.

A curriculum file names the stages (each a stage recipe plus overrides) and a run directory:

    out: runs/tiny-curriculum
    overrides: ["--trainer.accelerator=cpu"]        # every stage
    stages:
      - {name: understanding, config: understanding.yaml, overrides: ["--trainer.max_steps=200"]}
      - {name: t2i, config: t2i.yaml}

Stage k runs in `<out>/<k>-<name>/` (config.yaml, checkpoints/, metrics.jsonl, TensorBoard logs, model/). It is
resumable at both granularities: a finished stage (marked by `done.json`) is skipped, and an unfinished one
resumes from its `checkpoints/last.ckpt` (optimizer, scheduler, callbacks and data position included).

The run directory is marked as one (`mogao-run.json`); `--fresh` deletes only such a directory (or one laid out
as a curriculum run: its `curriculum.yaml`, stage folders and report), and refuses any other, naming it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from mogao.errors import ConfigError

DONE = "done.json"
RUN_MARKER = "mogao-run.json"  # written into every curriculum run directory: what `--fresh` may delete
_REPORT_FILES = {"report.html", "report.json", "losses.png"}


@dataclass
class StageSpec:
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)


@dataclass
class CurriculumSpec:
    out: Path
    stages: list[StageSpec]
    overrides: list[str] = field(default_factory=list)

    def stage_dir(self, i: int) -> Path:
        return self.out / f"{i + 1}-{self.stages[i].name}"


def _as_args(overrides: Any, where: str) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):  # {"trainer.max_steps": 10} → ["--trainer.max_steps=10"]
        return [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"{where}: overrides must be a list of '--key=value' strings or a mapping")
    return list(overrides)


def load_curriculum(path: str | Path, out: str | Path | None = None) -> CurriculumSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"curriculum file not found: '{path}'")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a curriculum is a mapping with 'stages' (and 'out', 'overrides')")
    unknown = set(raw) - {"out", "stages", "overrides"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: out, stages, overrides")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list")
    stages = []
    for i, s in enumerate(stages_raw):
        where = f"{path}: stages[{i}]"
        if not isinstance(s, dict) or not {"name", "config"} <= set(s):
            raise ConfigError(f"{where}: each stage needs 'name' and 'config'")
        bad = set(s) - {"name", "config", "overrides"}
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {sorted(bad)}; allowed: name, config, overrides")
        cfg = (path.parent / s["config"]).resolve()
        if not cfg.is_file():
            raise ConfigError(f"{where}: stage recipe not found: '{cfg}'")
        stages.append(StageSpec(str(s["name"]), cfg, _as_args(s.get("overrides"), where)))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: stage names must be unique, got {names}")
    out_dir = Path(out if out is not None else raw.get("out", f"runs/{path.stem}"))
    return CurriculumSpec(out_dir, stages, _as_args(raw.get("overrides"), f"{path}: overrides"))


def stage_args(spec: CurriculumSpec, i: int, extra: list[str] | None = None) -> list[str]:
    """The `fit` arguments of stage i (without --ckpt_path)."""
    stage, d = spec.stages[i], spec.stage_dir(i)
    args = ["fit", "--config", str(stage.config), *spec.overrides, *stage.overrides, *(extra or []),
            f"--trainer.default_root_dir={d}", f"--model.init_args.save_dir={d / 'model'}"]
    if i > 0:
        args.append(f"--model.init_args.init_from={spec.stage_dir(i - 1) / 'model'}")
    return args


def is_run_directory(spec: CurriculumSpec) -> bool:
    """Whether `spec.out` is a directory a curriculum run made: it holds the run marker, or (runs made before
    the marker existed) `curriculum.yaml` and nothing but this curriculum's stage folders and the report."""
    d = spec.out
    if not d.is_dir() or d.is_symlink():
        return False
    if (d / RUN_MARKER).is_file():
        return True
    names = {p.name for p in d.iterdir()}
    stages = {spec.stage_dir(i).name for i in range(len(spec.stages))}
    return "curriculum.yaml" in names and names <= {"curriculum.yaml", *_REPORT_FILES, *stages}


def check_removable(spec: CurriculumSpec) -> bool:
    """Whether `--fresh` has a run directory to delete (False: none, or an empty one); ConfigError naming it
    when it is not one a curriculum run made."""
    d = spec.out
    if not d.exists() or (d.is_dir() and not d.is_symlink() and not any(d.iterdir())):
        return False
    if not is_run_directory(spec):
        raise ConfigError(f"--fresh would delete '{d}', which is not a run directory made by `mogao curriculum` "
                          f"(no {RUN_MARKER} in it); nothing was deleted - give a new --out, or remove it yourself")
    return True


def remove_run_directory(spec: CurriculumSpec) -> None:
    """Delete the run directory for `--fresh`: only one a curriculum run made (an empty one is kept);
    ConfigError naming it otherwise."""
    if check_removable(spec):
        shutil.rmtree(spec.out)


def run_curriculum(path: str | Path, out: str | Path | None = None, fresh: bool = False,
                   overrides: list[str] | None = None, stage_callbacks: dict[str, list[Any]] | None = None,
                   ) -> list[Path]:
    """Run every stage not yet finished; returns the stages' saved model directories.

    `stage_callbacks` adds callback objects to named stages (used by tests and tools, e.g. to interrupt a run).
    """
    from mogao.recipes import build_cli

    spec = load_curriculum(path, out)
    if fresh:  # every process refuses a folder that is not a run directory, before any waits for another
        check_removable(spec)
    rank, barrier = _join_launch()
    if rank == 0:  # the run directory is laid out by one process; the others wait for it
        if fresh:
            remove_run_directory(spec)
        spec.out.mkdir(parents=True, exist_ok=True)
        marker = spec.out / RUN_MARKER
        if not marker.is_file():
            marker.write_text(json.dumps({"written_by": "mogao curriculum", "curriculum": str(path)}, indent=1))
        shutil.copyfile(path, spec.out / "curriculum.yaml")
    barrier()
    models = []
    for i, stage in enumerate(spec.stages):
        d = spec.stage_dir(i)
        models.append(d / "model")
        if (d / DONE).is_file():
            print(f"[curriculum] stage {i + 1}/{len(spec.stages)} '{stage.name}': finished earlier, skipped")
            continue
        args = stage_args(spec, i, overrides)
        resume = (d / "checkpoints" / "last.ckpt").is_file()
        if resume:
            args.append("--ckpt_path=last")
        how = "resuming from checkpoints/last.ckpt" if resume else "starting"
        print(f"[curriculum] stage {i + 1}/{len(spec.stages)} '{stage.name}': {how} in {d}")
        cli = build_cli(args, callbacks=(stage_callbacks or {}).get(stage.name))
        trainer = cli.trainer
        barrier()  # the first process has written the stage's model before any process looks for it
        if trainer.interrupted or not (d / "model" / "model.safetensors").is_file():
            raise ConfigError(f"stage '{stage.name}' did not finish (status {trainer.state.status}); run the "
                              "same command again to resume it")
        if rank == 0:
            (d / DONE).write_text(json.dumps({"stage": stage.name, "global_step": trainer.global_step,
                                              "model": str(d / "model")}, indent=1))
        barrier()
    return models


def _join_launch() -> tuple[int, Any]:
    """(this process's rank, a barrier over every process) under a multi-process launcher (torchrun, srun),
    else (0, a no-op).

    Every process runs the whole curriculum; the stages' trainers then use the process group joined here, so
    that the run directory is laid out and each stage's end marked by one process while the others wait.
    """
    import os

    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    env = next((e() for e in (TorchElasticEnvironment, SLURMEnvironment) if e.detect()), None)
    if env is None or env.world_size() <= 1:
        return 0, lambda: None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.main_address)
        os.environ.setdefault("MASTER_PORT", str(env.main_port))
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank())
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                rank=env.global_rank(), world_size=env.world_size())
    return dist.get_rank(), dist.barrier
