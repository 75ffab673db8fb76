"""Stages, recipes, the Lightning CLI and the curriculum: every shipped recipe instantiates, every stage trains,
the curriculum chains stages, and interrupted runs resume to the same losses and data."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import shrunk_recipe
from safetensors.torch import load_file
from test_runtime_faults import Interrupt

from mogao.cli import main
from mogao.curriculum import run_curriculum
from mogao.recipes import RECIPES_DIR, build_cli, list_recipes
from mogao.training.rundir import read_history

TINY = ["understanding", "t2i", "interleaved"]


def small(parts, root: Path, steps: int = 4) -> list[str]:
    """Overrides shrinking a tiny recipe to seconds: test parts, few samples, small budget, no progress bar."""
    return [
        f"--model.init_args.tokenizer={parts['tokenizer']}", f"--model.init_args.model.llm={parts['llm']}",
        f"--model.init_args.model.vit={parts['vit']}", "--model.init_args.tiny=null",
        "--model.init_args.model.latent_patch=8", "--model.init_args.exact_match_samples=2",
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
        "init_args: {save_last: true, every_n_train_steps: 1}}]",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
        "--data.data.token_budget=400", "--data.data.max_image_tokens=16",
    ]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    d = tmp_path_factory.mktemp("recipes")
    for name in TINY:
        shrunk_recipe(d, name, n=24, val_n=4)
    (d / "curriculum.yaml").write_text((RECIPES_DIR / "tiny" / "curriculum.yaml").read_text())
    return d


def train_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_history(run / "metrics.jsonl") if r["kind"] == "train"}


class SeenSamples(pl.Callback):
    def __init__(self) -> None:
        self.ids: list[list[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ids.append(list(batch.sample_ids))


# ---- recipes ------------------------------------------------------------------------------------------


def test_every_recipe_is_listed_with_a_description_and_its_command():
    rows = dict(list_recipes())
    files = sorted(RECIPES_DIR.rglob("*.yaml"))
    assert len(rows) == len(files) >= 12
    for f in files:
        name = str(f.relative_to(RECIPES_DIR).with_suffix(""))
        assert rows[name], f"{name} has no description line"
        first = f.read_text().splitlines()[0]
        assert first.startswith("# mogao ") and str(f.relative_to(RECIPES_DIR.parent)) in first, first


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipe_instantiates(name, parts, recipes, tmp_path):
    cli = build_cli(["--config", str(recipes / f"{name}.yaml"), *small(parts, tmp_path)], run=False)
    assert type(cli.model).__name__.lower().startswith(name[:3])
    n = sum(p.numel() for p in cli.model.model.parameters())
    trainable = sum(p.numel() for p in cli.model.model.parameters() if p.requires_grad)
    print(f"tiny/{name}: {n} parameters, {trainable} trainable, parts {cli.model.train_parts}")
    assert 0 < trainable < n


def _layer_params(c: dict) -> int:
    """Parameters of one Qwen2 decoder layer from its config numbers (q/k/v have biases, o does not)."""
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h


@pytest.mark.parametrize("size", ["3b", "7b"])
@pytest.mark.parametrize("stage", TINY)
def test_real_scale_recipe_on_meta_device(size, stage):
    from mogao.model.io import load_model
    from mogao.model.known import KNOWN_LLMS, PUBLISHED_LLM_PARAMS, known_architecture

    cli = build_cli(["--config", str(RECIPES_DIR / f"qwen2.5-{size}" / f"{stage}.yaml")], run=False,
                    instantiate=False)
    cfg = cli.model_config
    model = load_model(known_architecture(cfg), meta=True)
    assert all(p.is_meta for p in model.parameters())
    llm = KNOWN_LLMS[cfg.llm]
    h, L, V = llm["hidden_size"], llm["num_hidden_layers"], llm["vocab_size"]
    und = sum(p.numel() for p in model.backbone.understanding_parameters())
    heads = 1 if llm["tie_word_embeddings"] else 2
    assert und == heads * V * h + L * _layer_params(llm) + h
    assert abs(und - PUBLISHED_LLM_PARAMS[cfg.llm]) / PUBLISHED_LLM_PARAMS[cfg.llm] < 0.01
    gen_layers = sum(p.numel() for layer in model.backbone.layers for p in layer.gen.parameters())
    assert gen_layers == L * _layer_params(llm)  # the generation expert: a full copy of every layer
    total = sum(p.numel() for p in model.parameters())
    print(f"qwen2.5-{size}/{stage}: {total / 1e9:.2f}B parameters (understanding expert {und / 1e9:.2f}B, "
          f"generation expert layers {gen_layers / 1e9:.2f}B)")


# ---- one stage ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_stage_fast_dev_run(name, parts, recipes, tmp_path):
    cli = build_cli(["fit", "--config", str(recipes / f"{name}.yaml"), *small(parts, tmp_path),
                     "--trainer.fast_dev_run=true"])
    assert cli.trainer.global_step == 1
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_stage_run_writes_model_config_history_and_validation(parts, recipes, tmp_path):
    build_cli(["fit", "--config", str(recipes / "t2i.yaml"), *small(parts, tmp_path, steps=4)])
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "model" / "model.safetensors").is_file()
    rows = read_history(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and "val/t2i/image_loss" in val[0]


def test_exact_match_reads_images_on_the_data_token_grid(parts, recipes, tmp_path, monkeypatch):
    """Exact-match validation answers about images lowered as the data lowers them (max_image_tokens 16 here),
    not on the default generation grid."""
    import mogao.inference.tasks as tasks

    seen, real = [], tasks.text_replies

    def recording(*args, **kwargs):
        seen.append(kwargs["config"].condition_tokens)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "text_replies", recording)
    build_cli(["fit", "--config", str(recipes / "understanding.yaml"), *small(parts, tmp_path, steps=2)])
    assert seen and set(seen) == {16}


def test_resume_from_last_checkpoint_gives_the_same_losses_and_data(parts, recipes, tmp_path):
    cfg = str(recipes / "interleaved.yaml")
    seen_a = SeenSamples()
    build_cli(["fit", "--config", cfg, *small(parts, tmp_path / "a", steps=6)], callbacks=[seen_a])
    seen_b = SeenSamples()
    with pytest.raises(RuntimeError, match="interrupted at step 3"):
        build_cli(["fit", "--config", cfg, *small(parts, tmp_path / "b", steps=6)], callbacks=[Interrupt(3), seen_b])
    build_cli(["fit", "--config", cfg, *small(parts, tmp_path / "b", steps=6), "--ckpt_path=last"],
              callbacks=[seen_b])
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(4, 7):
        for key in ("loss", "text_loss", "image_loss"):
            assert abs(a[step][key] - b[step][key]) <= 1e-6, (step, key, a[step][key], b[step][key])
        assert a[step]["source"] == b[step]["source"]
    assert seen_a.ids == seen_b.ids  # no sample skipped or repeated across the interruption


def test_unfreezing_schedule_survives_resume(parts, recipes, tmp_path):
    sched = ("--trainer.callbacks+={class_path: callbacks.CurriculumSchedule, init_args: {milestones: "
             "[{step: 0, train: [gen]}, {step: 2, train: [gen, und], lambda_text: 0.5, shift: 2.0}]}}")
    cfg = str(recipes / "t2i.yaml")
    # the optimizer starts with the generation expert's groups; those of the part unfrozen later join it, at a
    # quarter of the rate
    scale = ["--model.init_args.train=[gen]", "--model.init_args.lr_scale={und: 0.25}"]
    build_cli(["fit", "--config", cfg, *small(parts, tmp_path / "a", steps=4), sched, *scale])
    with pytest.raises(RuntimeError):
        build_cli(["fit", "--config", cfg, *small(parts, tmp_path / "b", steps=4), sched, *scale],
                  callbacks=[Interrupt(3)])
    cli = build_cli(["fit", "--config", cfg, *small(parts, tmp_path / "b", steps=4), sched, *scale,
                     "--ckpt_path=last"])
    assert cli.model.train_parts == ["gen", "und"] and cli.model.lambda_text == 0.5
    assert cli.model.model.cfg.timestep_sampling.shift == 2.0
    from mogao.model.checkpoint_files import load_checkpoint_file

    saved = load_checkpoint_file(tmp_path / "a" / "checkpoints" / "last.ckpt")["hyper_parameters"]["model"]
    ts = saved["timestep_sampling"] if isinstance(saved, dict) else saved.timestep_sampling
    assert (ts["shift"] if isinstance(ts, dict) else ts.shift) == 3.0  # the recipe's, as configured
    groups = cli.trainer.optimizers[0].param_groups
    assert [g["part"] for g in groups] == ["gen", "gen", "und", "und"]  # (decay, no decay) each
    gen = next(g for g in groups if g["part"] == "gen")
    for key in ("lr", "initial_lr"):  # the scheduler moves both parts' rates alike
        want = [gen[key] * (0.25 if g["part"] == "und" else 1.0) for g in groups]
        assert [g[key] for g in groups] == pytest.approx(want, rel=1e-12) and gen[key] > 0
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert abs(a[4]["loss"] - b[4]["loss"]) <= 1e-6


# ---- curriculum ---------------------------------------------------------------------------------------


def _curriculum(recipes: Path, parts, out: Path, **kw):
    over = [o for o in small(parts, out, steps=3) if not o.startswith("--trainer.default_root_dir")]
    return run_curriculum(recipes / "curriculum.yaml", out=out, overrides=over, **kw)


@pytest.fixture(scope="module")
def curriculum_run(parts, recipes, tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    models = _curriculum(recipes, parts, out)
    return out, models


def test_curriculum_runs_three_stages_each_from_the_last(curriculum_run, parts, recipes):
    out, models = curriculum_run
    assert [m.parent.name for m in models] == ["1-understanding", "2-t2i", "3-interleaved"]
    for m in models:
        assert (m / "model.safetensors").is_file() and (m.parent / "done.json").is_file()
        assert [r["step"] for r in read_history(m.parent / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]
    # stage 2 starts from stage 1's weights: instantiate it without training and compare
    from mogao.curriculum import load_curriculum, stage_args

    spec = load_curriculum(recipes / "curriculum.yaml", out=out)
    over = [o for o in small(parts, out, steps=3) if not o.startswith("--trainer.default_root_dir")]
    cli = build_cli(stage_args(spec, 1, over)[1:], run=False)
    saved = load_file(str(models[0] / "model.safetensors"))
    state = cli.model.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    # a finished curriculum run again skips every stage
    assert _curriculum(recipes, parts, out) == models


def test_curriculum_resumes_inside_a_stage_with_the_same_losses(curriculum_run, parts, recipes, tmp_path):
    ref, _ = curriculum_run
    with pytest.raises(RuntimeError, match="interrupted at step 2"):
        _curriculum(recipes, parts, tmp_path, stage_callbacks={"t2i": [Interrupt(2)]})
    assert (tmp_path / "1-understanding" / "done.json").is_file()
    assert not (tmp_path / "2-t2i" / "done.json").is_file()
    _curriculum(recipes, parts, tmp_path)
    for stage in ("2-t2i", "3-interleaved"):
        a, b = train_rows(ref / stage), train_rows(tmp_path / stage)
        assert sorted(a) == sorted(b) == [1, 2, 3]
        for step in a:
            assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6, (stage, step)


def test_demo_runs_the_curriculum_and_writes_the_report(parts, tmp_path):
    from mogao.demo import main as demo_main

    over = [o for o in small(parts, tmp_path, steps=2) if not o.startswith("--trainer.default_root_dir")]
    report = demo_main(["--out", str(tmp_path), "--eval-n", "1", "--sample-steps", "2", *over])
    text = report.read_text()
    assert text.count("<h2>After stage") == 3 and text.count("<img") >= 3 * (12 + 8 + 12)
    summary = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == TINY
    assert all(s["validation"] for s in summary["stages"])
    assert all(len(s["scores"]) == 9 for s in summary["stages"]) and "What each stage can do" in text
    assert (tmp_path / "losses.png").is_file() and summary["seconds_total"] > 0


# ---- bad configs --------------------------------------------------------------------------------------


def _fails_before_building(args, capsys, expect: str, monkeypatch) -> None:
    """The command fails with a message containing `expect`, before any model is built or trained."""
    from mogao.model.mogao import MogaoModel

    def no_build(*a, **k):
        raise AssertionError("a model was built before the configuration error was reported")

    monkeypatch.setattr(MogaoModel, "__init__", no_build)  # every way of building one goes through it
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert expect in err, err


def test_unknown_key_fails_naming_it(capsys, monkeypatch):
    _fails_before_building(["fit", "--config", "tiny/t2i", "--model.init_args.no_such_key=1"], capsys, "no_such_key",
                           monkeypatch)


def test_wrong_type_fails_naming_the_key(capsys, monkeypatch):
    _fails_before_building(["fit", "--config", "tiny/t2i", "--trainer.max_steps=many"], capsys, "max_steps", monkeypatch)


def test_missing_checkpoint_fails_naming_the_path(capsys, tmp_path, monkeypatch):
    _fails_before_building(["fit", "--config", "tiny/t2i", "--model.init_args.tiny=null",
                 f"--model.init_args.tokenizer={tmp_path}/nowhere-tok"], capsys, f"{tmp_path}/nowhere-tok",
                           monkeypatch)


def test_a_learning_rate_scale_of_an_unknown_part_fails_naming_it(capsys, monkeypatch):
    _fails_before_building(["fit", "--config", "tiny/t2i", "--model.init_args.lr_scale={vision: 0.5}"], capsys,
                           "model.lr_scale: unknown part(s) ['vision']", monkeypatch)
    for bad in ("-1", "0"):  # (a part that must not learn is left out of `train`)
        _fails_before_building(["fit", "--config", "tiny/t2i", f"--model.init_args.lr_scale={{und: {bad}}}"], capsys,
                               "model.lr_scale: multipliers must be finite numbers > 0", monkeypatch)


def test_recipe_not_found_fails_naming_it(capsys, monkeypatch):
    _fails_before_building(["fit", "--config", "tiny/no-such-recipe"], capsys, "tiny/no-such-recipe", monkeypatch)


def test_curriculum_file_errors_name_the_problem(tmp_path):
    from mogao.curriculum import load_curriculum
    from mogao.errors import ConfigError

    f = tmp_path / "c.yaml"
    f.write_text(json.dumps({"stages": [{"name": "a", "config": "missing.yaml"}]}))
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_curriculum(f)
    f.write_text(json.dumps({"stages": [], "colour": 1}))
    with pytest.raises(ConfigError, match="colour"):
        load_curriculum(f)


def test_long_curriculum_runs_the_same_stages_three_times_longer(parts, recipes, tmp_path):
    from mogao.curriculum import load_curriculum, stage_args

    (recipes / "curriculum-long.yaml").write_text((RECIPES_DIR / "tiny" / "curriculum-long.yaml").read_text())
    long = load_curriculum(recipes / "curriculum-long.yaml", out=tmp_path)
    short = load_curriculum(recipes / "curriculum.yaml", out=tmp_path)
    assert [s.name for s in long.stages] == [s.name for s in short.stages]
    keep = [o for o in small(parts, tmp_path) if not o.startswith(("--trainer.max_steps", "--trainer.val_check"))]
    for i, steps in enumerate((1500, 4800, 4800)):
        fresh = ["--model.init_args.init_from=null"]  # (the earlier stages' models do not exist here)
        cli = build_cli(stage_args(long, i, keep)[1:] + fresh, run=False)
        base = build_cli(stage_args(short, i, keep)[1:] + fresh, run=False)
        assert cli.trainer.max_steps == steps == 3 * base.trainer.max_steps
        assert cli.config.model.init_args.lr_scheduler.init_args.total_steps == steps
