"""LoRA adapters from others (SECURITY.md): the adapters a config asks for are checked against its weights file's
header before they are built (a rank the weights do not back allocates nothing), and what the config says is
escaped before it reaches a terminal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mogao.cli import main
from mogao.errors import ConfigError
from mogao.lora import LoraSpec, apply_lora, load_adapter, save_adapter
from mogao.model.config import ModelConfig
from mogao.model.io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tiny_parts, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base") / "model"
    torch.manual_seed(0)
    load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], latent_patch=4)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    model = load_model(base)
    apply_lora(model, LoraSpec(und=["q_proj"], gen=["q_proj", "down_proj"], rank=2, alpha=4, dora=True,
                               full=["connector"]), base_path=base)
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(model, d)
    return d


def _edited(adapter: Path, dst: Path, edit) -> Path:
    d = Path(shutil.copytree(adapter, dst))
    config = json.loads((d / "adapter_config.json").read_text())
    edit(config)
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


# ---- a rank the weights do not back is refused before any adapter is built ---------------------------------


def test_an_adapter_config_with_a_huge_rank_is_refused_before_building(base, adapter, tmp_path,
                                                                       no_large_allocation):
    bad = _edited(adapter, tmp_path / "a", lambda c: c["spec"].update(rank=2**20))
    with pytest.raises(ConfigError, match=r"rank 1048576.*wrong shape") as e:
        load_adapter(load_model(base), bad)
    assert str(bad / "adapter_model.safetensors") in str(e.value)
    load_adapter(load_model(base), adapter)  # the adapter as saved (DoRA, a part in full) loads


def test_an_adapter_config_naming_more_layers_than_its_weights_is_refused_before_building(base, adapter,
                                                                                          tmp_path,
                                                                                          monkeypatch):
    """A spec that adapts every module of both experts, with weights for three of them: refused from the header,
    so no adapter is injected into the model given."""
    import mogao.lora.adapter as lora_adapter

    bad = _edited(adapter, tmp_path / "a", lambda c: c["spec"].update(und=["all"], gen=["all"]))
    built = []
    monkeypatch.setattr(lora_adapter, "apply_lora", lambda *a, **k: built.append(a))
    with pytest.raises(ConfigError) as e:
        load_adapter(load_model(base), bad)
    assert built == []
    assert "missing" in str(e.value) and str(bad / "adapter_model.safetensors") in str(e.value)


# ---- what an adapter's config says is escaped --------------------------------------------------------------


def test_lora_merge_escapes_the_base_path_an_adapter_names(base, adapter, tmp_path, capsys):
    hostile = "\x1b]0;pwned\x07\x1b[2J/elsewhere/\u202emodel"
    bad = _edited(adapter, tmp_path / "a", lambda c: c["base"].update(path=hostile, fingerprint="0" * 16))
    assert main(["lora", "merge", "--base", str(base), "--adapter", str(bad), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "was trained on base" in err and "\\x1b]0;pwned\\x07\\x1b[2J/elsewhere/\\u202emodel" in err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
