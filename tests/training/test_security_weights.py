"""Weight indexes of component and saved-model folders (SECURITY.md): every file a `*.safetensors.index.json`
names must be a file of that folder. An index that points elsewhere - an absolute path, or `..` - is refused
before any loader follows it: when the components are loaded whole (`transformers` / `diffusers`), when each
rank reads its shards (`meta_init: true`, `mogao.training.shard_load`), and for a saved model (`init_from`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mogao.errors import ConfigError
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.training.shard_load import load_weights, plan_weights

pytestmark = pytest.mark.usefixtures("one_thread")

INDEX = "model.safetensors.index.json"


def _indexed_elsewhere(src: Path, folder: Path, where: str) -> Path:
    """A copy of the checkpoint folder `src` whose weights moved out to `folder/../outside/` and whose index
    names them there, as `where` says: "relative" (../outside/...) or "absolute"."""
    d = Path(shutil.copytree(src, folder))
    outside = folder.parent / "outside"
    outside.mkdir(exist_ok=True)
    moved = outside / f"{folder.name}.safetensors"
    shutil.move(d / "model.safetensors", moved)
    name = f"../outside/{moved.name}" if where == "relative" else str(moved)
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {k: name for k in load_file(str(moved))}}))
    return d


def _meta_load(cfg_or_dir, init_from=None):
    rng = torch.get_rng_state()  # (the new layers are drawn from the state before building)
    model = load_model(cfg_or_dir, meta=True)
    load_weights(model, plan_weights(model, init_from=init_from, rng_state=rng))
    return model


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.parametrize("part", ["llm", "vit"])
def test_a_component_index_naming_files_outside_its_folder_is_refused(tiny_parts, tmp_path, where, part):
    folder = _indexed_elsewhere(Path(tiny_parts[part]), tmp_path / part, where)
    paths = {"llm": tiny_parts["llm"], "vit": tiny_parts["vit"], part: str(folder)}
    cfg = ModelConfig(llm=paths["llm"], vit=paths["vit"], latent_patch=4)
    for load in (lambda: _meta_load(cfg), lambda: load_model(cfg)):  # per-shard loading, and whole
        with pytest.raises(ConfigError, match="not a file of its folder") as e:
            load()
        assert str(folder / INDEX) in str(e.value)
    # the same weights as a shard inside the folder load, and give the weights the folder had
    index = json.loads((folder / INDEX).read_text())
    shutil.copy(folder.parent / "outside" / f"{part}.safetensors", folder / "model-00001-of-00001.safetensors")
    index["weight_map"] = {k: "model-00001-of-00001.safetensors" for k in index["weight_map"]}
    (folder / INDEX).write_text(json.dumps(index))
    torch.manual_seed(0)
    got = _meta_load(cfg).state_dict()
    torch.manual_seed(0)
    want = load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], latent_patch=4)).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_saved_model_index_naming_files_outside_is_refused(tiny_parts, tmp_path):
    saved = tmp_path / "saved"
    load_model(ModelConfig(llm=tiny_parts["llm"], vit=tiny_parts["vit"], latent_patch=4)).save_pretrained(saved)
    outside = tmp_path / "outside.safetensors"
    shutil.copy(saved / "model.safetensors", outside)
    (saved / INDEX).write_text(json.dumps({"weight_map": {k: "../outside.safetensors"
                                                          for k in load_file(str(outside))}}))
    with pytest.raises(ConfigError, match="not a file of its folder") as e:
        _meta_load(saved, init_from=saved)  # `init_from` under meta_init: true
    assert str(saved / INDEX) in str(e.value)
