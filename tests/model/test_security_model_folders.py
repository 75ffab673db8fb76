"""Model folders from others (SECURITY.md): a folder never gets to run its own Python - `transformers` is never
left to ask about it on standard input, where a "y" piped into `mogao chat` would say yes - and a config that
names huge sizes is refused from the safetensors header before any memory is allocated for the model."""

from __future__ import annotations

import builtins
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mogao.errors import ConfigError
from mogao.model.config import ModelConfig
from mogao.model.io import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tiny_parts, tmp_path_factory) -> Path:
    """A model folder as a fit saves it: model, config and tokenizer."""
    d = tmp_path_factory.mktemp("saved") / "model"
    torch.manual_seed(0)
    load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], latent_patch=4)).save_pretrained(d)
    tiny_parts["tokenizer"].save_pretrained(d)
    return d


@pytest.fixture
def no_remote_code(monkeypatch):
    """Records every question on standard input and every attempt to import a folder's code (answering "n" and
    refusing, so that nothing runs even where the code under test would ask)."""
    import transformers.models.auto.auto_factory as auto_factory
    import transformers.models.auto.configuration_auto as configuration_auto
    import transformers.models.auto.tokenization_auto as tokenization_auto

    calls: list[str] = []

    def ask(prompt: str = "") -> str:
        calls.append(f"input: {prompt[:80]}")
        return "n"

    def load_code(class_ref, *args, **kwargs):
        calls.append(f"import {class_ref}")
        raise OSError("a folder's code may not be imported here")

    monkeypatch.setattr(builtins, "input", ask)
    for module in (auto_factory, configuration_auto, tokenization_auto):
        monkeypatch.setattr(module, "get_class_from_dynamic_module", load_code)
    return calls


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _with_tokenizer_code(folder: Path, marker: Path) -> Path:
    """`folder`'s tokenizer config names a tokenizer class that only a Python file beside it defines (importing
    it writes `marker`)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the code ran')\n"
        "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    return folder


# ---- a model folder never runs its own code, and nothing asks about it -------------------------------------


def test_a_tokenizer_that_needs_its_own_code_is_refused_without_a_prompt(saved, tmp_path, no_remote_code):
    marker = tmp_path / "marker"
    folder = _with_tokenizer_code(_copy(saved, tmp_path / "m"), marker)
    with pytest.raises(ConfigError, match="could not load the tokenizer") as e:
        load_tokenizer(folder)
    assert str(folder) in str(e.value)
    assert no_remote_code == [] and not marker.exists()
    # with a tokenizer class transformers has, an `auto_map` beside it is not needed: the class is used
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = json.loads((saved / "tokenizer_config.json").read_text())["tokenizer_class"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert len(load_tokenizer(folder)) == len(load_tokenizer(saved))
    assert no_remote_code == [] and not marker.exists()


def test_chat_with_a_y_on_stdin_never_runs_the_folders_code(saved, tmp_path, no_remote_code, monkeypatch,
                                                            capsys):
    from mogao.inference.cli import chat_main

    marker = tmp_path / "marker"
    folder = _with_tokenizer_code(_copy(saved, tmp_path / "m"), marker)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n/quit\n"))
    assert chat_main(["--ckpt", str(folder), "--out", str(tmp_path / "chat"), "--max-new-tokens", "1"]) == 2
    assert str(folder) in capsys.readouterr().err
    assert no_remote_code == [] and not marker.exists()


@pytest.mark.parametrize("model_type", ["qwen2", "siglip_vision_model"],
                         ids=["a known LLM type", "a type transformers has no LLM class for"])
def test_a_saved_config_whose_llm_names_code_is_refused(saved, tmp_path, no_remote_code, model_type):
    folder = _copy(saved, tmp_path / "m")
    record = json.loads((folder / "mogao_config.json").read_text())
    record["llm_config"].update(model_type=model_type, _name_or_path=str(folder),
                                auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "mogao_config.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="llm_config.auto_map") as e:
        load_model(folder)
    assert str(folder / "mogao_config.json") in str(e.value)
    assert no_remote_code == []


def test_a_saved_record_leaves_a_components_auto_map_out(saved):
    from mogao.model.config import architecture_record

    llm = {"model_type": "qwen2", "auto_map": {"x": "y"}, "text_config": {"auto_map": {}, "hidden_size": 8}}
    record = architecture_record(ModelConfig(llm="l", vit="v"), llm, {"auto_map": {}}, None)
    assert record["llm_config"] == {"model_type": "qwen2", "text_config": {"hidden_size": 8}}
    assert record["vit_config"] == {}


# ---- sizes are checked against the weights before memory is allocated --------------------------------------


HUGE_VOCAB = 2**22  # x the tiny hidden size: 1 GiB of embeddings, which the saved weights do not hold


def _huge_record(saved: Path) -> dict:
    record = json.loads((saved / "mogao_config.json").read_text())
    record["llm_config"]["vocab_size"] = HUGE_VOCAB
    return record


def test_a_saved_config_with_huge_sizes_is_refused_before_allocating(saved, tmp_path, no_large_allocation):
    folder = _copy(saved, tmp_path / "m")
    (folder / "mogao_config.json").write_text(json.dumps(_huge_record(saved)))
    for meta in (False, True):
        with pytest.raises(ConfigError, match=r"another architecture.*embed_tokens.weight: saved \(\d+, 64\), "
                                              rf"model \({HUGE_VOCAB}, 64\)") as e:
            load_model(folder, meta=meta)
        assert str(folder / "model.safetensors") in str(e.value)
    assert sum(p.numel() for p in load_model(saved).parameters()) > 0  # the folder as saved loads


def test_a_checkpoint_whose_architecture_has_huge_sizes_is_refused_before_allocating(saved, tmp_path,
                                                                                      no_large_allocation):
    from mogao.model.checkpoint_files import CheckpointError
    from mogao.model.io import ARCHITECTURE_KEY

    model = load_model(saved)
    ckpt = tmp_path / "huge.ckpt"
    torch.save({"global_step": 1, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                ARCHITECTURE_KEY: _huge_record(saved)}, ckpt)
    with pytest.raises(CheckpointError, match="wrong shape.*embed_tokens") as e:
        load_model(ckpt)
    assert str(ckpt) in str(e.value)
