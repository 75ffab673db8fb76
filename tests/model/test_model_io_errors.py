"""Saved models from another architecture, or damaged, are refused with a message that says what differs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mogao.errors import ConfigError
from mogao.model.config import ModelConfig
from mogao.model.io import load_model


@pytest.fixture(scope="module")
def saved(tiny_parts, tmp_path_factory):
    d = tmp_path_factory.mktemp("saved")
    model = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], latent_patch=4))
    model.save_pretrained(d / "a")
    return d / "a", model


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_round_trip_keeps_tied_weights(saved):
    d, model = saved
    again = load_model(d)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_weights_of_another_architecture_are_refused_naming_the_difference(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "b")
    weights = load_file(str(d / "model.safetensors"))
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = torch.zeros(3, 3)
    weights["extra.weight"] = torch.zeros(1)
    del weights[next(k for k in weights if k.endswith("connector.net.0.bias") or "connector" in k)]
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(ConfigError, match="another architecture") as e:
        load_model(d)
    msg = str(e.value)
    assert name in msg and "extra.weight" in msg and "missing" in msg


def test_truncated_weights_and_bad_config_are_named(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="cannot read weights"):
        load_model(d)
    d2 = _copy(saved[0], tmp_path / "e")
    (d2 / "mogao_config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(ConfigError, match="not a valid mogao config"):
        load_model(d2)
    (d2 / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_model(d2)


def test_model_config_dict_round_trip_and_unknown_keys():
    from mogao.diffusion.flow import TimestepSampling
    from mogao.model.config import ModelConfig

    cfg = ModelConfig(llm="a", vit="b", latent_patch=4, timestep_sampling=TimestepSampling(shift=3.0))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown model config key.*latent_pach"):
        ModelConfig.from_dict({**cfg.to_dict(), "latent_pach": 2})
    with pytest.raises(ConfigError, match="unknown timestep_sampling key.*shfit"):
        ModelConfig.from_dict({"llm": "a", "vit": "b", "timestep_sampling": {"shfit": 1.0}})
    with pytest.raises(ConfigError, match="lacks required key.*vit"):
        ModelConfig.from_dict({"llm": "a"})
    # configs saved with the loss weights the model used to carry still load
    assert ModelConfig.from_dict({**cfg.to_dict(), "lambda_text": 1.0, "lambda_image": 1.0}) == cfg


def test_saved_config_with_an_unknown_key_is_refused_naming_it(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "f")
    meta = json.loads((d / "mogao_config.json").read_text())
    meta["model"]["no_such_field"] = 1
    (d / "mogao_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="not a valid mogao config.*no_such_field"):
        load_model(d)
