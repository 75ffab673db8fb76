"""Hostile input (DESIGN §8): checkpoints, adapters and data files from others never run code, choose classes or
paths, or delete anything.

The payload is harmless: a pickled object whose `__reduce__` writes a marker file. It is put where each loader
looks - a whole checkpoint file, a sharded checkpoint's `meta.pt`, its shard index `.metadata` and a non-tensor
record of a shard, an adapter's weights file, a saved model's weights file - and sent through every command
that loads such a thing (`fit`/`validate --ckpt_path`, `checkpoint consolidate`, `generate`, `lora merge`, and
a resume under `MoTFSDP2Strategy` on gloo, with 1 and 2 processes). None may write the marker; each must fail
with the project's error naming the file. Checkpoints the project writes itself still load.

Further down: `checkpoint consolidate` never follows the tokenizer path a checkpoint names; what the commands
print from files is escaped; a checkpoint member that would inflate, or a shard record that reaches past its
file, is refused. Prepared data folders, image files, model folders, adapters and weight indexes have their own
files (tests/<package>/test_security_*.py).
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import stat
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_distributed import _launch
from test_distributed import _wait as wait_for_ranks

from mogao.cli import main
from mogao.errors import ConfigError, DataError
from mogao.model.checkpoint_files import CheckpointError, check_checkpoint
from mogao.model.io import load_model
from mogao.training.consolidate import consolidate
from mogao.training.strategies import ARCHITECTURE_KEY

pytestmark = pytest.mark.usefixtures("one_thread")


class Payload:
    """Unpickling this writes `marker` (through a standard-library function, so it works in any process)."""

    def __init__(self, marker: Path) -> None:
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "the payload ran")


def payload_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker), protocol=4)


def assert_refused(rc: int, err: str, marker: Path, named: Path) -> None:
    assert not marker.exists(), "the payload ran"
    assert rc != 0
    assert str(named) in err, err


# ---- a tiny model and checkpoints of it, as the project writes them --------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny_parts):
    from mogao.model.config import ModelConfig

    torch.manual_seed(0)
    return load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], autoencoder="pixel",
                                  latent_patch=4))


@pytest.fixture(scope="module")
def saved_model(tiny_model, tiny_parts, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved") / "model"
    tiny_model.save_pretrained(d)
    tiny_parts["tokenizer"].save_pretrained(d)
    return d


def _meta(model, tokenizer_dir: Path) -> dict:
    from mogao.model.io import model_architecture

    return {"global_step": 2, "epoch": 0, ARCHITECTURE_KEY: model_architecture(model),
            "hyper_parameters": {"tokenizer": str(tokenizer_dir)}}


def sharded_checkpoint(model, tokenizer_dir: Path, d: Path, extra: dict | None = None) -> Path:
    """A sharded checkpoint folder as MoTFSDP2Strategy writes one (meta.pt, .metadata, one shard file)."""
    import torch.distributed.checkpoint as dcp

    state = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, **(extra or {})}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(d), no_dist=True)
    torch.save(_meta(model, tokenizer_dir), d / "meta.pt")
    return d


def whole_checkpoint(model, tokenizer_dir: Path, path: Path, state: dict | None = None) -> Path:
    state = state if state is not None else {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({**_meta(model, tokenizer_dir), "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def own_sharded(tiny_model, tiny_parts, tmp_path_factory):
    return sharded_checkpoint(tiny_model, tiny_parts["root"] / "tokenizer", tmp_path_factory.mktemp("own") / "s.ckpt")


# ---- 1, 2, 4: checkpoints are read weights-only; the shard index is checked before torch reads it -----------


@pytest.fixture
def payloads(own_sharded, tiny_model, tiny_parts, tmp_path):
    """name -> (checkpoint path, the file that holds the payload), all writing `tmp_path / marker`."""
    import shutil

    marker = tmp_path / "marker"
    out = {}
    whole = tmp_path / "whole.ckpt"
    torch.save({"global_step": 2, "state_dict": {}, "x": Payload(marker)}, whole)
    out["whole file"] = (whole, whole)
    meta = shutil.copytree(own_sharded, tmp_path / "meta.ckpt")
    torch.save({**_meta(tiny_model, tiny_parts["root"] / "tokenizer"), "x": Payload(marker)}, meta / "meta.pt")
    out["meta.pt"] = (meta, meta / "meta.pt")
    index = shutil.copytree(own_sharded, tmp_path / "index.ckpt")
    (index / ".metadata").write_bytes(payload_pickle(marker))
    out[".metadata"] = (index, index / ".metadata")
    return marker, out


@pytest.mark.parametrize("kind", ["whole file", "meta.pt", ".metadata"])
def test_consolidate_never_runs_a_checkpoint_payload(payloads, kind, tmp_path, capsys):
    marker, cases = payloads
    ckpt, holder = cases[kind]
    rc = main(["checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "out")])
    assert_refused(rc, capsys.readouterr().err, marker, holder)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["whole file", ".metadata"])
@pytest.mark.parametrize("verb", ["fit", "validate"])
def test_fit_and_validate_never_run_a_checkpoint_payload(payloads, kind, verb, parts, recipe, tmp_path, capsys):
    from test_checkpoint_faults import fit_args

    marker, cases = payloads
    ckpt, holder = cases[kind]
    args = fit_args(parts, recipe, tmp_path / "run", steps=1)
    rc = main([verb, *args[1:], f"--ckpt_path={ckpt}"])
    assert_refused(rc, capsys.readouterr().err, marker, holder)


def test_the_checkpoint_io_reads_weights_only_whatever_it_is_asked(payloads):
    """What a trainer with the default strategy calls to resume (`trainer.fit(ckpt_path=..., weights_only=False)`
    from Python included)."""
    from mogao.training.checkpointing import AtomicCheckpointIO

    marker, cases = payloads
    ckpt, _ = cases["whole file"]
    for weights_only in (None, False):
        with pytest.raises(CheckpointError, match=str(ckpt)):
            AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=weights_only)
    assert not marker.exists(), "the payload ran"


def test_check_checkpoint_reads_the_shard_index_and_records_without_running_them(own_sharded, tiny_model,
                                                                                   tiny_parts, tmp_path):
    import shutil

    from mogao.model.checkpoint_files import read_shard_index

    assert check_checkpoint(own_sharded) == 2  # the project's own folder passes
    assert type(read_shard_index(own_sharded / ".metadata")).__name__ == "Metadata"
    marker = tmp_path / "marker"
    index = shutil.copytree(own_sharded, tmp_path / "index.ckpt")
    (index / ".metadata").write_bytes(payload_pickle(marker))
    with pytest.raises(CheckpointError, match=r"\.metadata"):
        check_checkpoint(index)
    # a non-tensor record of a shard file (optimizer settings are saved so) that holds a payload
    record = sharded_checkpoint(tiny_model, tiny_parts["root"] / "tokenizer", tmp_path / "record.ckpt",
                                extra={"optimizer": {"x": Payload(marker)}})
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp"):
        check_checkpoint(record)
    assert not marker.exists()


def test_own_sharded_and_whole_checkpoints_still_consolidate(own_sharded, tiny_model, tiny_parts, tmp_path):
    whole = whole_checkpoint(tiny_model, tiny_parts["root"] / "tokenizer", tmp_path / "w.ckpt")
    for ckpt in (own_sharded, whole):
        out = consolidate(ckpt, tmp_path / f"{ckpt.stem}-out", str(tiny_parts["root"] / "tokenizer"))
        saved = load_file(str(out / "model.safetensors"))
        own = tiny_model.state_dict()
        assert all(torch.equal(saved[k], own[k]) for k in saved)


# ---- 4: resume under MoTFSDP2Strategy (gloo), paths that bypass `--ckpt_path=last` ---------------------


def test_fsdp2_resume_never_runs_a_checkpoint_payload(payloads, tiny_parts, tmp_path):
    """`MoTFSDP2Strategy.load_checkpoint` - what every resume calls, however its path was chosen (`--ckpt_path`,
    `trainer.fit(ckpt_path=...)` from Python, SLURM's hpc checkpoints) - on 2 gloo processes: the payloads are
    refused on every rank, naming the file; the sharded checkpoint the run itself saves loads."""
    marker, cases = payloads
    out = tmp_path / "run"
    spec = {"tokenizer": str(tiny_parts["root"] / "tokenizer"), "llm": tiny_parts["llm"], "vit": tiny_parts["vit"],
            "vae": tiny_parts["vae"], "devices": 2, "out": str(out), "load": [str(c) for c, _ in cases.values()]}
    child = Path(__file__).resolve().parent / "security_child.py"
    wait_for_ranks(_launch(spec, 2, child), str(out), relaunch=lambda: _launch(spec, 2, child))
    for rank in range(2):
        results = json.loads((out / f"results.rank{rank}.json").read_text())
        assert results.pop(str(out / "own.ckpt")) == "loaded"
        for kind, (ckpt, holder) in cases.items():
            assert results[str(ckpt)].startswith("CheckpointError") and str(holder) in results[str(ckpt)], kind
    assert not marker.exists(), "the payload ran"


# ---- 3: the config wins over the checkpoint's hyper-parameters ----------------------------------------------


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from conftest import shrunk_recipe

    return shrunk_recipe(tmp_path_factory.mktemp("sec_recipe"), "t2i", n=8, val_n=2)


@pytest.fixture(scope="module")
def one_step_run(parts, recipe, tmp_path_factory):
    from test_checkpoint_faults import fit_args

    from mogao.recipes import build_cli

    root = tmp_path_factory.mktemp("one_step")
    build_cli(fit_args(parts, recipe, root, steps=1))
    return root


def test_checkpoint_hyper_parameters_choose_neither_classes_nor_paths(one_step_run, parts, recipe, tmp_path,
                                                                      capsys):
    from test_checkpoint_faults import fit_args

    from mogao.recipes import build_cli

    ckpt = torch.load(one_step_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    hp["_class_path"] = "mogao.training.module.InterleavedModule"
    hp["save_dir"] = str(tmp_path / "chosen_by_the_checkpoint")
    hp["init_from"] = str(tmp_path / "elsewhere")
    hostile = tmp_path / "hostile.ckpt"
    torch.save(ckpt, hostile)
    mine = tmp_path / "mine"
    old = os.umask(0o022)
    try:
        cli = build_cli([*fit_args(parts, recipe, tmp_path / "run", steps=1),
                         f"--model.init_args.save_dir={mine}", f"--ckpt_path={hostile}"])
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    assert type(cli.model).__name__ == "T2IModule"
    assert cli.model.hparams.save_dir == str(mine) and cli.model.hparams.get("init_from") is None
    assert (mine / "model.safetensors").is_file() and not (tmp_path / "chosen_by_the_checkpoint").exists()
    (line,) = [ln for ln in out.splitlines() if "other hyper-parameters than the config" in ln]
    reported = line.split(" than the config in ", 1)[1].split(": the config's values are used", 1)[0]
    assert set(reported.split(", ")) == {"model.class_path", "model.init_args.save_dir",
                                         "model.init_args.init_from"}, line
    # 12: the model folder is written whole and readable by the group (the user's umask, not 0600)
    assert stat.S_IMODE((mine / "model.safetensors").stat().st_mode) == 0o644
    assert not [p for p in mine.parent.iterdir() if p.name.startswith(".mine.")]


# ---- generate and lora merge: weights files that are pickles, adapters of the wrong shape ---------------------


@pytest.fixture(scope="module")
def adapter(tiny_parts, saved_model, tmp_path_factory):
    from mogao.lora import LoraSpec, apply_lora, save_adapter

    model = load_model(saved_model)
    apply_lora(model, LoraSpec(und=["q_proj"], gen=["q_proj"], rank=2, alpha=4), base_path=saved_model)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, d)
    return d


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_generate_never_runs_a_payload_in_a_model_or_adapter(saved_model, adapter, tmp_path, capsys):
    from mogao.inference.cli import generate_main

    marker = tmp_path / "marker"
    model = _copy(saved_model, tmp_path / "model")
    (model / "model.safetensors").write_bytes(payload_pickle(marker))
    rc = generate_main(["--ckpt", str(model), "--prompt", "hi", "--out", str(tmp_path / "o1")])
    assert_refused(rc, capsys.readouterr().err, marker, model / "model.safetensors")
    bad = _copy(adapter, tmp_path / "adapter")
    (bad / "adapter_model.safetensors").write_bytes(payload_pickle(marker))
    rc = generate_main(["--ckpt", str(saved_model), "--lora", str(bad), "--prompt", "hi", "--out",
                        str(tmp_path / "o2")])
    assert_refused(rc, capsys.readouterr().err, marker, bad / "adapter_model.safetensors")
    ckpt = tmp_path / "payload.ckpt"  # a training checkpoint is no model directory: refused unread
    torch.save({"x": Payload(marker)}, ckpt)
    rc = generate_main(["--ckpt", str(ckpt), "--prompt", "hi", "--out", str(tmp_path / "o3")])
    assert_refused(rc, capsys.readouterr().err, marker, ckpt)


def test_lora_merge_never_runs_a_payload_adapter(saved_model, adapter, tmp_path, capsys):
    marker = tmp_path / "marker"
    bad = _copy(adapter, tmp_path / "adapter")
    (bad / "adapter_model.safetensors").write_bytes(payload_pickle(marker))
    rc = main(["lora", "merge", "--base", str(saved_model), "--adapter", str(bad), "--out", str(tmp_path / "m")])
    assert_refused(rc, capsys.readouterr().err, marker, bad / "adapter_model.safetensors")
    assert not (tmp_path / "m").exists()


# ---- 9: shapes are checked, never broadcast -----------------------------------------------------------------


def test_adapter_weights_of_the_wrong_shape_are_refused(saved_model, adapter, tmp_path):
    from mogao.lora import load_adapter

    bad = _copy(adapter, tmp_path / "adapter")
    weights = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in sorted(weights) if "lora_A" in k)
    weights[key] = torch.ones(1)  # would broadcast over the whole matrix
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_adapter(load_model(saved_model), bad)
    load_adapter(load_model(saved_model), adapter)  # the adapter as saved loads


def test_consolidating_weights_of_the_wrong_shape_is_refused(tiny_model, tiny_parts, tmp_path, capsys):
    state = {f"model.{k}": v for k, v in tiny_model.state_dict().items()}
    key = "model.latent_proj.proj_in.weight"
    state[key] = torch.ones(1)
    ckpt = whole_checkpoint(tiny_model, tiny_parts["root"] / "tokenizer", tmp_path / "w.ckpt", state)
    rc = main(["checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and key in err and str(ckpt) in err


# ---- 5: --fresh deletes only a run directory ------------------------------------------------------------------


def test_fresh_refuses_a_folder_that_is_not_a_run_directory(tmp_path):
    from mogao.curriculum import load_curriculum, run_curriculum
    from mogao.demo import main as demo_main
    from mogao.recipes import RECIPES_DIR

    project = tmp_path / "project"
    project.mkdir()
    (project / "precious.py").write_text("keep me")
    curriculum = RECIPES_DIR / "tiny" / "curriculum.yaml"
    stop = ["--trainer.max_steps=not-a-number"]  # (were anything deleted, no training would follow)
    with pytest.raises(ConfigError, match="project"):
        run_curriculum(curriculum, out=project, fresh=True, overrides=stop)
    assert (project / "precious.py").read_text() == "keep me"
    with pytest.raises(ConfigError, match="project"):
        demo_main(["--out", str(project), "--fresh", *stop])
    assert main(["curriculum", str(curriculum), "--out", str(project), "--fresh", *stop]) == 2
    assert (project / "precious.py").read_text() == "keep me"
    # a folder the curriculum made (its marker) is deleted
    from mogao.curriculum import RUN_MARKER, remove_run_directory

    run = tmp_path / "run"
    (run / "1-understanding").mkdir(parents=True)
    (run / RUN_MARKER).write_text("{}")
    remove_run_directory(load_curriculum(curriculum, out=run))
    assert not run.exists()


# ---- 6, 7: importers ---------------------------------------------------------------------------------------


def test_import_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = tmp_path / "chat.json"
    text = json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    src.write_text(text)
    assert main(["data", "import", "llava", str(src), "--out", str(src)]) == 1
    assert src.read_text() == text and "input file" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'[{"id": ' + b"9" * 5000 + b"}]", "invalid JSON"),
    (b'[{"conversations": [{"from": "gpt", "value": "\xff\xfe"}]}]', "not UTF-8"),
    (b'[{"conversations": [{"from": "gpt", "value": "\\ud800"}]}]', "not valid Unicode"),
], ids=["deep", "huge int", "not utf-8", "surrogate"])
def test_llava_import_gives_data_errors(tmp_path, content, message):
    from mogao.data.importers import llava_to_samples

    src = tmp_path / "chat.json"
    src.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        llava_to_samples(src, tmp_path / "out.jsonl")
    assert str(src) in str(e.value)


def test_caption_import_gives_data_errors_and_limits_sizes(tmp_path, capsys):
    from PIL import Image

    from mogao.data.importers import captions_to_samples

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    with pytest.raises(DataError, match="not UTF-8") as e:
        captions_to_samples(tmp_path, tmp_path / "out.jsonl")
    assert "a.txt" in str(e.value)
    (tmp_path / "a.txt").write_text("x" * 5000)
    assert main(["data", "import", "captions", str(tmp_path), "--out", str(tmp_path / "o.jsonl"),
                 "--max-caption-bytes", "1000"]) == 1
    err = capsys.readouterr().err
    assert "1000 bytes" in err and "--max-caption-bytes" in err
    assert captions_to_samples(tmp_path, tmp_path / "out.jsonl", max_caption_bytes=10000)
    big = tmp_path / "chat.json"
    big.write_text("[" + " " * 3000 + "]")
    assert main(["data", "import", "llava", str(big), "--out", str(tmp_path / "b.jsonl"),
                 "--max-file-bytes", "1000"]) == 1
    assert "--max-file-bytes" in capsys.readouterr().err


# ---- 8: line and file limits; --fix streams ------------------------------------------------------------------


def test_a_line_over_the_limit_is_a_problem_named_with_the_limit(tmp_path, capsys):
    from mogao.data.check import summarise

    path = tmp_path / "d.jsonl"
    good = json.dumps({"id": "a", "segments": [{"text": "hi"}]})
    path.write_text(good + "\n" + json.dumps({"id": "b", "segments": [{"text": "x" * 5000}]}) + "\n" + good.replace(
        '"a"', '"c"') + "\n")
    (problem,) = summarise(path, max_line_bytes=1000).problems
    assert problem.line == 2 and "1000 bytes" in str(problem) and "--max-line-bytes" in str(problem)
    assert main(["data", "check", str(path), "--max-line-bytes", "1000"]) == 1
    assert "--max-line-bytes" in capsys.readouterr().out
    assert main(["data", "check", str(path)]) == 0  # the default limit is far above a sample
    assert main(["data", "check", str(path), "--max-file-bytes", "100"]) == 1
    assert "--max-file-bytes" in capsys.readouterr().err


def test_fix_does_not_hold_the_file_in_memory(tmp_path):
    import tracemalloc

    from mogao.data.check import fix

    path = tmp_path / "d.jsonl"
    filler = "y" * 400
    with open(path, "w") as f:
        for i in range(4000):
            f.write(json.dumps({"id": f"s{i}", "segments": [{"text": filler}]}) + "\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        _, _, kept, dropped = fix(path, tmp_path / "clean.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (kept, dropped) == (4000, 0)
    assert peak < size / 2, (peak, size)


# ---- 10: escapes in what is printed -------------------------------------------------------------------------


def test_data_check_escapes_control_characters_from_the_data(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"segments": [{"image": "\x1b]0;pwned\x07\x1b[2J.png"}]}) + "\n")
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr()
    assert "\x1b" not in out.out + out.err and "\x07" not in out.out + out.err
    assert "\\x1b]0;pwned" in out.out


class _Segment:
    def __init__(self, text=None, image=None, role="model"):
        self.text, self.image, self.role = text, image, role


class _Response:
    stop_reason = "eos"

    def __init__(self, segments):
        self.segments = segments


class _Session:
    """Stands in for GenerationSession: answers with text holding terminal escape sequences."""

    text = "red \x1b[31mcircle\x1b[0m\x1b]52;c;Y2xpcGJvYXJk\x07\u202edone\nsecond line"

    def __init__(self, *args, **kwargs):
        self.history = [[]]

    def add_user_turn(self, turns):
        self.history[0].append(_Segment(text="q", role="user"))

    def respond(self, draw=False, **kwargs):
        seg = _Segment(text=self.text)
        self.history[0].append(seg)
        return [_Response([seg])]


def test_generate_and_chat_escape_what_the_model_wrote(tmp_path, monkeypatch, capsys):
    import mogao.inference.cli as inference_cli
    import mogao.inference.session as session

    monkeypatch.setattr(inference_cli, "_load", lambda args: (None, None))
    monkeypatch.setattr(session, "GenerationSession", _Session)
    rc = inference_cli.generate_main(["--ckpt", "x", "--prompt", "hi", "--out", str(tmp_path / "g")])
    out = capsys.readouterr().out
    assert rc == 0 and "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[31mcircle" in out and "\\u202edone\nsecond line" in out
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/quit\n"))
    assert inference_cli.chat_main(["--ckpt", "x", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b]52;c;" in out


# ---- 11: no silent overwrites ------------------------------------------------------------------------------


def test_outputs_refuse_a_folder_that_is_not_empty(saved_model, own_sharded, tiny_parts, tmp_path, capsys):
    from mogao.inference.cli import chat_main, generate_main

    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.png").write_text("keep")
    assert generate_main(["--ckpt", str(saved_model), "--prompt", "hi", "--out", str(full)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    monkeypatch_stdin = io.StringIO("")
    old, sys.stdin = sys.stdin, monkeypatch_stdin
    try:
        assert chat_main(["--ckpt", str(saved_model), "--out", str(full)]) == 2
    finally:
        sys.stdin = old
    assert "--overwrite" in capsys.readouterr().err
    # an input image inside --out is never written over, even with --overwrite
    assert generate_main(["--ckpt", str(saved_model), "--prompt", "hi", "--image", str(full / "mine.png"),
                          "--out", str(full), "--overwrite"]) == 2
    assert "--image" in capsys.readouterr().err
    assert main(["checkpoint", "consolidate", str(own_sharded), "--out", str(full)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (full / "mine.png").read_text() == "keep"
    # --overwrite replaces a model saved there before, never another folder
    tok = str(tiny_parts["root"] / "tokenizer")
    consolidate(own_sharded, tmp_path / "m", tok)
    consolidate(own_sharded, tmp_path / "m", tok, overwrite=True)
    with pytest.raises(ConfigError, match="not a folder this project saved"):
        consolidate(own_sharded, full, tok, overwrite=True)
    assert (full / "mine.png").read_text() == "keep"


# ---- 12: saved folders are written as one unit, with the user's umask -----------------------------------------


def test_a_failed_save_leaves_the_previous_folder_whole(tmp_path, tiny_model, tiny_parts, monkeypatch):
    from mogao.lora import LoraSpec, apply_lora, save_adapter
    d = tmp_path / "adapter"
    model = load_model(_saved(tiny_model, tmp_path))
    apply_lora(model, LoraSpec(und=["q_proj"], rank=2, alpha=4))
    old = os.umask(0o027)
    try:
        save_adapter(model, d)
    finally:
        os.umask(old)
    assert stat.S_IMODE((d / "adapter_model.safetensors").stat().st_mode) == 0o640
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.add_(1.0)

    def killed(self, *args, **kwargs):  # the process dies between the weights and the config
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, d)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    from mogao.model.io import write_directory

    with pytest.raises(ConfigError, match="not a folder this project saved"):
        write_directory(tmp_path, lambda _: None)  # a folder with other files is never replaced


def _saved(model, tmp_path: Path) -> Path:
    d = tmp_path / "base"
    if not d.exists():
        model.save_pretrained(d)
    return d


# ---- a checkpoint chooses no tokenizer path ----------------------------------------------------------------


def _other_tokenizer(tiny_parts, d: Path) -> Path:
    """A tokenizer folder the checkpoint names that is not the run's: the tiny one with one token more."""
    import copy

    tok = copy.deepcopy(tiny_parts["tokenizer"])
    tok.add_tokens(["<private>"])
    tok.save_pretrained(d)
    return d


def test_consolidate_never_follows_the_tokenizer_path_a_checkpoint_names(tiny_model, tiny_parts, tmp_path,
                                                                          capsys):
    private = _other_tokenizer(tiny_parts, tmp_path / "private")
    (tmp_path / "elsewhere").mkdir()
    ckpt = whole_checkpoint(tiny_model, private, tmp_path / "elsewhere" / "w.ckpt")
    rc = main(["checkpoint", "consolidate", str(ckpt), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--tokenizer" in err and str(private) in err and str(ckpt) in err
    assert not (tmp_path / "out").exists()
    # with --tokenizer, that folder is used: the user chose it
    out = consolidate(ckpt, tmp_path / "out", tokenizer=str(private))
    assert "<private>" in (out / "tokenizer.json").read_text()


def test_consolidate_takes_the_tokenizer_the_run_saved_in_its_folder(tiny_model, tiny_parts, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    tiny_parts["tokenizer"].save_pretrained(run / "model")  # what a fit saves at its end
    private = _other_tokenizer(tiny_parts, tmp_path / "private")
    ckpt = whole_checkpoint(tiny_model, private, run / "checkpoints" / "last.ckpt")
    for source in (ckpt, run):
        out = consolidate(source, tmp_path / f"out-{source.name}")
        text = (out / "tokenizer.json").read_text()
        assert "<private>" not in text and text == (run / "model" / "tokenizer.json").read_text()


# ---- what the command line prints from files is escaped ----------------------------------------------------

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\u202e"
ESCAPED = "\\x1b]0;pwned\\x07\\x1b[2J\\u202e"


def _no_raw_escapes(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text, text


@pytest.mark.parametrize("error, status", [(ConfigError, 2), (DataError, 1)])
def test_the_mogao_command_escapes_the_errors_it_prints(monkeypatch, capsys, error, status):
    import mogao.cli as cli

    def fail(argv):
        raise error(f"bad file {HOSTILE}.json")

    monkeypatch.setattr(cli, "_main", fail)
    assert cli.main(["fit"]) == status
    err = capsys.readouterr().err
    _no_raw_escapes(err)
    assert f"bad file {ESCAPED}.json" in err


def test_consolidate_escapes_the_errors_it_prints(tmp_path, capsys):
    bad = tmp_path / f"{HOSTILE}.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["checkpoint", "consolidate", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    _no_raw_escapes(err)
    assert f"{ESCAPED}.ckpt" in err


def test_the_hyper_parameter_names_a_checkpoint_holds_are_escaped(tmp_path, capsys):
    from mogao.recipes import report_checkpoint_hparams

    ckpt = tmp_path / "c.ckpt"
    torch.save({"global_step": 0, "state_dict": {}, "hyper_parameters": {HOSTILE: 1, "lr": 2}}, ckpt)
    keys = report_checkpoint_hparams(ckpt, {"class_path": "x", "init_args": {"lr": 2}})
    out = capsys.readouterr().out
    assert keys == [f"model.init_args.{HOSTILE}"]
    _no_raw_escapes(out)
    assert f"model.init_args.{ESCAPED}" in out


# ---- checkpoints whose records would inflate or reach past their files -------------------------------------


def _deflated(src: Path, dst: Path) -> Path:
    """`src` (a torch.save archive) with every member compressed: a few kilobytes of zeros inflate a
    thousandfold, so a small file could ask for far more memory than it holds."""
    import zipfile

    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w") as out:
        for info in z.infolist():
            out.writestr(info, z.read(info), compress_type=zipfile.ZIP_DEFLATED)
    return dst


def test_a_checkpoint_with_compressed_members_is_refused_by_every_loader(tiny_model, tiny_parts, tmp_path):
    from mogao.model.checkpoint_files import load_checkpoint_file
    from mogao.training.checkpointing import AtomicCheckpointIO

    whole = whole_checkpoint(tiny_model, tiny_parts["root"] / "tokenizer", tmp_path / "w.ckpt")
    bad = _deflated(whole, tmp_path / "bad.ckpt")
    for load in (check_checkpoint, load_model, load_checkpoint_file, AtomicCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match="compressed member") as e:
            load(bad)
        assert str(bad) in str(e.value)
    assert check_checkpoint(whole) == 2


def test_a_shard_index_record_reaching_past_its_file_is_refused(own_sharded, tmp_path):
    import dataclasses
    import shutil

    from mogao.model.checkpoint_files import read_shard_index

    d = Path(shutil.copytree(own_sharded, tmp_path / "s.ckpt"))
    index = read_shard_index(d / ".metadata")
    key = next(iter(index.storage_data))
    index.storage_data[key] = dataclasses.replace(index.storage_data[key], length=2**40)
    (d / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(CheckpointError, match="lies outside the file") as e:
        check_checkpoint(d)
    assert "__0_0.distcp" in str(e.value)
