"""Faults at run time: bad data met while training (an image corrupted or deleted after the data set was
validated, a sample over the token budget) and non-finite losses or gradients are skipped, counted and
reported - never a crash or a hang - until a limit stops the run with a clear error."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import mogao.data.packer as packer
from mogao.data import DataConfig
from mogao.errors import DataError, NumericalError
from mogao.recipes import build_cli
from mogao.training.datamodule import MogaoDataModule, Source
from mogao.training.rundir import read_history

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ["circle", "square", "triangle"]


def write_source(root: Path, n: int = 24, name: str = "pics.jsonl") -> Path:
    """A JSONL source of `n` text-to-image samples with one PNG each (ids s0, s1, ...; images img/<i>.png)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        Image.new("RGB", (16, 16), COLOURS[colour]).save(root / "img" / f"{i}.png")
        lines.append({"id": f"s{i}", "segments": [{"text": f"A {colour} {SHAPES[i % 3]}.", "loss": False},
                                                   {"image": f"img/{i}.png", "generate": True}]})
    path = root / name
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(7, 71)))  # a PNG signature, then garbage


class Break(pl.Callback):
    """Damage image files once the data set is validated (callbacks' `setup` runs after the data module's)."""

    def __init__(self, corrupt: list[Path] = (), delete: list[Path] = ()) -> None:
        self.corrupt, self.delete = list(corrupt), list(delete)

    def setup(self, trainer, pl_module, stage):
        for p in self.corrupt:
            corrupt(p)
        for p in self.delete:
            p.unlink(missing_ok=True)


def args(parts, run: Path, source: Path, steps: int = 3, *extra: str) -> list[str]:
    """A T2I stage on one JSONL source, shrunk to seconds: no validation, no checkpoints, no progress bar."""
    return [
        "fit", "--model=mogao.training.module.T2IModule",
        f"--model.init_args.tokenizer={parts['tokenizer']}", f"--model.init_args.model.llm={parts['llm']}",
        f"--model.init_args.model.vit={parts['vit']}", "--model.init_args.model.autoencoder=pixel",
        "--model.init_args.model.latent_patch=8",
        f"--data.sources=[{{name: pics, path: '{source}'}}]",
        "--data.data.token_budget=36", "--data.data.max_image_tokens=4", "--data.data.lookahead=2",  # 2 a pack
        "--data.data.p_drop_text=0.0", "--data.data.p_drop_images=0.0",
        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
        f"--trainer.default_root_dir={run}", *extra,
    ]


class Seen(pl.Callback):
    def __init__(self) -> None:
        self.ids: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ids += batch.sample_ids


# ---- bad data -----------------------------------------------------------------------------------------


def test_corrupt_and_deleted_images_are_skipped_counted_and_reported(parts, tmp_path, caplog, one_thread):
    source = write_source(tmp_path / "data", n=12)
    seen = Seen()
    img = tmp_path / "data" / "img"
    broken = Break(corrupt=[img / "3.png"], delete=[img / "7.png"])
    with caplog.at_level(logging.WARNING, logger="mogao"):
        cli = build_cli(args(parts, tmp_path / "run", source, 5), callbacks=[broken, seen])
    assert cli.trainer.global_step == 5  # the run finished: one epoch of the 10 good samples, 2 a batch
    assert sorted(seen.ids) == sorted(f"s{i}" for i in range(12) if i not in (3, 7))
    warnings = [r.getMessage() for r in caplog.records if "skipping bad sample" in r.getMessage()]
    assert any("'s3'" in w and "pics.jsonl:4" in w and "cannot read image" in w for w in warnings), warnings
    assert any("'s7'" in w and "pics.jsonl:8" in w and "not found" in w for w in warnings), warnings
    report = json.loads((tmp_path / "run" / "data_faults.json").read_text())
    pics = report["train"]["sources"]["pics"]
    assert report["train"]["bad"] == pics["bad"] == 2 and pics["read"] == 12
    assert {r["id"]: r["line"] for r in pics["bad_samples"]} == {"s3": 4, "s7": 8}
    assert "cannot read image" in {r["id"]: r["reason"] for r in pics["bad_samples"]}["s3"]
    rows = [r for r in read_history(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert rows[-1]["bad_samples"] == 2
    assert cli.trainer.logged_metrics["data/bad_samples"] == 2


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(parts, tmp_path, one_thread):
    source = write_source(tmp_path / "data", n=12)
    broken = Break(delete=[tmp_path / "data" / "img" / f"{i}.png" for i in range(0, 12, 2)])  # half of them
    with pytest.raises(DataError) as info:
        build_cli(args(parts, tmp_path / "run", source, 6, "--data.data.bad_sample_grace=2",
                       "--data.data.max_bad_fraction=0.2"), callbacks=[broken])
    msg = str(info.value)
    assert "too many bad samples in data source 'pics'" in msg and "data.max_bad_fraction=0.2" in msg
    assert "3 of the" in msg and "image file not found" in msg and f"mogao data check {source}" in msg
    report = json.loads((tmp_path / "run" / "data_faults.json").read_text())
    assert report["train"]["bad"] == 3 and "too many bad samples" in report["stopped_by"]


def test_a_sample_over_the_budget_is_bad_data_with_too_long_error(tmp_path, caplog):
    from conftest_data import small_config, tiny_tokenizer

    from mogao.data import PackedDataset, load_samples

    root = tmp_path / "data"
    source = write_source(root, n=6)
    long = {"id": "long", "segments": [{"text": " ".join(["red circle"] * 200)}]}
    source.write_text(source.read_text() + json.dumps(long) + "\n")
    ds = PackedDataset(load_samples(source), tiny_tokenizer(), small_config(token_budget=64), name="pics")
    with caplog.at_level(logging.WARNING, logger="mogao"):
        ids = [i for b in ds for i in b.sample_ids]
    assert sorted(ids) == [f"s{i}" for i in range(6)]
    assert ds.stats.bad == 1 and ds.stats.read == 7 and ds.stats.bad_reasons[0]["id"] == "long"
    assert "token budget of 64" in ds.stats.bad_reasons[0]["reason"]
    assert any("'long'" in r.getMessage() and "pics.jsonl:7" in r.getMessage() for r in caplog.records)


class Interrupt(pl.Callback):
    """Stop a run with an exception at the start of step `at` (its checkpoint of step `at` is written)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError(f"interrupted at step {self.at}")


CHECKPOINTS = ["--trainer.enable_checkpointing=true",
               "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
               "init_args: {save_last: true, every_n_train_steps: 1}}]"]


def test_a_resumed_run_skips_the_same_samples_and_continues_the_fault_counts(parts, tmp_path, one_thread):
    img = tmp_path / "data" / "img"

    def run(name: str, *callbacks: pl.Callback, resume: bool = False) -> None:
        source = write_source(tmp_path / "data", n=12)  # valid at start-up (which checks every image)
        extra = [*CHECKPOINTS, *(["--ckpt_path=last"] if resume else [])]
        build_cli(args(parts, tmp_path / name, source, 7, *extra),
                  callbacks=[Break(corrupt=[img / "3.png"], delete=[img / "7.png"]), NaNAt({4}), *callbacks])

    seen_a, seen_b = Seen(), Seen()
    run("a", seen_a)  # 7 steps over 10 good samples, 2 a batch: into the second epoch
    with pytest.raises(RuntimeError, match="interrupted at step 3"):
        run("b", seen_b, Interrupt(3))
    run("b", seen_b, resume=True)
    assert seen_a.ids == seen_b.ids and not {"s3", "s7"} & set(seen_a.ids)
    a, b = (json.loads((tmp_path / r / "data_faults.json").read_text())["train"] for r in ("a", "b"))
    assert a == b and a["bad"] >= 2 and a["read"] > 12  # (into the second epoch)
    a, b = (json.loads((tmp_path / r / "numerical_faults.json").read_text()) for r in ("a", "b"))
    assert a == b and a["nonfinite_steps"] == 1 and a["faults"][0]["step"] == 5
    rows_a, rows_b = ({r["step"]: r for r in read_history(tmp_path / name / "metrics.jsonl")
                       if r["kind"] == "train"} for name in ("a", "b"))
    for step in (4, 6, 7):
        assert abs(rows_a[step]["loss"] - rows_b[step]["loss"]) <= 1e-6, step


def _dm(tok, source: Path, num_workers: int = 0, **data) -> MogaoDataModule:
    cfg = DataConfig(token_budget=48, max_image_tokens=4, vit_patch=4, vae_patch=4, lookahead=3, seed=1,
                     **data)
    dm = MogaoDataModule(str(tok), [Source(name="pics", path=str(source))], cfg, num_workers=num_workers,
                         worker_timeout=30)
    dm.setup("fit")
    return dm


def _take(dm: MogaoDataModule, k: int) -> list[tuple[str, ...]]:
    out = []
    for batch in dm.train_dataloader():
        dm.consumed(batch)
        out.append(tuple(batch.sample_ids))
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize(("workers", "k"), [(0, 5), (2, 5)])
def test_exact_resume_holds_with_bad_samples_in_the_stream(parts, tmp_path, workers, k):
    source = write_source(tmp_path / "data", n=16)
    fresh = [_dm(parts["tokenizer"], source, workers) for _ in range(3)]  # validated while the data was good
    corrupt(tmp_path / "data" / "img" / "5.png")
    (tmp_path / "data" / "img" / "11.png").unlink()
    full = _take(fresh[0], 14)  # crosses epoch boundaries: the bad samples are met (and skipped) again
    first = _take(fresh[1], k)
    state = fresh[1].state_dict()
    fresh[2].load_state_dict(state)
    rest = _take(fresh[2], 14 - k)
    assert first + rest == full
    assert not {"s5", "s11"} & {i for b in full for i in b}
    a, b = fresh[0].fault_report()["train"], fresh[2].fault_report()["train"]
    assert a["bad"] == b["bad"] >= 4 and a["read"] == b["read"]  # counts continue across the resume
    assert {r["id"] for r in b["sources"]["pics"]["bad_samples"]} == {"s5", "s11"}


def test_bad_samples_inside_workers_are_counted_in_the_main_process(parts, tmp_path):
    source = write_source(tmp_path / "data", n=16)
    dm = _dm(parts["tokenizer"], source, num_workers=2)
    for i in (2, 3, 9):
        corrupt(tmp_path / "data" / "img" / f"{i}.png")
    batches = _take(dm, 6)  # 16 samples, 2 a batch, 2 workers: the whole epoch is read
    assert len(batches) == 6
    report = dm.fault_report()["train"]
    assert report["bad"] == dm.bad_sample_count() == 3 and report["read"] == 16
    assert sorted(r["id"] for r in report["sources"]["pics"]["bad_samples"]) == ["s2", "s3", "s9"]


def _crash_on(sample_id: str, how: str):
    real = packer.lower_sample

    def lower(sample, *a, **kw):
        if sample.id == sample_id:
            if how == "exit":
                os._exit(3)  # the worker process dies without a word
            time.sleep(60)  # the worker hangs
        return real(sample, *a, **kw)

    return lower


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_dead_or_hung_worker_stops_the_run_promptly(parts, tmp_path, monkeypatch, how):
    source = write_source(tmp_path / "data", n=8)
    dm = _dm(parts["tokenizer"], source, num_workers=2)
    dm.worker_timeout = 2
    monkeypatch.setattr(packer, "lower_sample", _crash_on("s1", how))  # (forked workers see the patch)
    t0 = time.perf_counter()
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.timeout == 2
    it = iter(loader)
    try:
        with pytest.raises(RuntimeError, match="exited unexpectedly" if how == "exit" else "timed out"):
            for _ in range(20):
                dm.consumed(next(it))
    finally:
        # every worker can meet s1; the iterator's workers stay registered for torch's SIGCHLD handler until it
        # shuts down, and a second worker's death would otherwise raise later, inside another test
        it._shutdown_workers()
    assert time.perf_counter() - t0 < 20


# ---- numerical faults ---------------------------------------------------------------------------------


class NaNAt(pl.Callback):
    """Make the loss (`what="loss"`) or one gradient (`what="grad"`) non-finite at the given optimizer steps
    (0-based: global_step before the step), and keep the weights before and after every step."""

    def __init__(self, steps: set[int], what: str = "loss") -> None:
        self.steps, self.what = steps, what
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.ids: dict[int, list[str]] = {}

    @staticmethod
    def _weights(pl_module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.model.named_parameters() if v.requires_grad}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.before[step] = self._weights(pl_module)
        self.ids[step] = list(batch.sample_ids)
        model = pl_module.model
        if self.what == "loss" and step in self.steps:
            forward = type(model).forward

            def poisoned(*a, **kw):
                out = forward(model, *a, **kw)
                out.terms.image_sum = out.terms.image_sum * float("nan")
                return out

            model.forward = poisoned

    def on_after_backward(self, trainer, pl_module):
        if self.what == "grad" and trainer.global_step in self.steps:
            p = next(p for p in pl_module.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.model.__dict__.pop("forward", None)
        self.after[trainer.global_step - 1] = self._weights(pl_module)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_a_nonfinite_step_is_skipped_logged_and_counted(parts, tmp_path, caplog, one_thread, what):
    source = write_source(tmp_path / "data", n=12)
    nan = NaNAt({1}, what)
    with caplog.at_level(logging.WARNING, logger="mogao"):
        cli = build_cli(args(parts, tmp_path / "run", source, 4), callbacks=[nan])
    assert cli.trainer.global_step == 4
    assert _same(nan.before[1], nan.after[1])  # the faulty step changed no weight
    assert not _same(nan.before[0], nan.after[0]) and not _same(nan.before[2], nan.after[2])
    kind = {"loss": "loss", "grad": "gradient norm"}[what]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("non-finite")]
    assert len(logged) == 1 and f"non-finite {kind}" in logged[0] and "at step 2" in logged[0]
    assert all(repr(i) in logged[0] for i in nan.ids[1])
    assert cli.trainer.logged_metrics["train/nonfinite_steps"] == 1
    report = json.loads((tmp_path / "run" / "numerical_faults.json").read_text())
    assert report["nonfinite_steps"] == 1 and report["consecutive"] == 0
    fault = report["faults"][0]
    assert fault["step"] == 2 and fault["kind"] == {"loss": "loss", "grad": "grad_norm"}[what]
    assert fault["sample_ids"] == nan.ids[1] and fault["value"] in ("nan", "inf")
    rows = {r["step"]: r for r in read_history(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"}
    assert rows[1]["nonfinite_steps"] == 0 and rows[2]["nonfinite_steps"] == rows[4]["nonfinite_steps"] == 1


def test_repeated_nonfinite_steps_stop_with_a_numerical_error(parts, tmp_path, one_thread):
    source = write_source(tmp_path / "data", n=12)
    nan = NaNAt({1, 2, 3}, "loss")
    with pytest.raises(NumericalError) as info:
        build_cli(args(parts, tmp_path / "run", source, 8, "--model.init_args.max_nonfinite_consecutive=3"),
                  callbacks=[nan])
    msg = str(info.value)
    assert "3 consecutive steps" in msg and "max_nonfinite_consecutive=3" in msg
    for step in (2, 3, 4):
        assert f"step {step}: loss = nan on samples" in msg
    assert repr(nan.ids[3][0]) in msg and "learning rate" in msg and "numerical_faults.json" in msg
    report = json.loads((tmp_path / "run" / "numerical_faults.json").read_text())
    assert report["nonfinite_steps"] == report["consecutive"] == 3
    assert [f["step"] for f in report["faults"]] == [2, 3, 4]


def test_nonfinite_stop_policy_stops_at_the_first_fault(parts, tmp_path, one_thread):
    source = write_source(tmp_path / "data", n=12)
    with pytest.raises(NumericalError, match=r"nonfinite='stop'.*\n  step 2: gradient norm = inf"):
        build_cli(args(parts, tmp_path / "run", source, 4, "--model.init_args.nonfinite=stop"),
                  callbacks=[NaNAt({1}, "grad")])
