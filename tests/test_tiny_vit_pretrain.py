"""`pretrain_tiny_vit`: the tiny recipes' stand-in for pretrained SigLIP weights."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from mogao.model.tiny import TinySpec, ensure_tiny_parts, pretrain_tiny_vit, save_tiny_vit


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_pretraining_learns_scenes_and_digits_and_is_deterministic(tmp_path):
    runs = []
    for name in ("a", "b"):
        d = save_tiny_vit(tmp_path / name, hidden_size=32, patch_size=8)
        first = pretrain_tiny_vit(d, steps=1, scenes=256, batch_size=64)
        d2 = save_tiny_vit(tmp_path / f"{name}2", hidden_size=32, patch_size=8)
        last = pretrain_tiny_vit(d2, steps=300, scenes=256, batch_size=64)
        runs.append((first, last, _weights(d2)))
    (first, last, weights), (_, last_b, weights_b) = runs
    # both losses fall well below their start (digits: 10 classes, ln 10 = 2.3; scenes: two heads of 5 positions
    # x 49 classes, 2 ln 49 = 7.8); measured: digit 2.4 -> 0.7, scene 7.6 -> 2.9
    assert last["digit"] < 0.5 * first["digit"] and last["scene"] < 0.5 * first["scene"]
    assert last == last_b and all(torch.equal(weights[k], weights_b[k]) for k in weights)
    random = _weights(save_tiny_vit(tmp_path / "random", hidden_size=32, patch_size=8))
    assert random.keys() == weights.keys()  # the same architecture, loadable wherever the random one is
    assert not torch.equal(random["embeddings.patch_embedding.weight"],
                           weights["embeddings.patch_embedding.weight"])


def test_ensure_tiny_parts_pretrains_only_when_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("mogao.model.tiny.pretrain_tiny_vit", lambda d, steps, seed: calls.append((steps, seed)))
    spec = TinySpec(hidden_size=32, layers=1, heads=2, kv_heads=1, vit_hidden_size=16, vit_patch_size=8)
    for steps, vit in ((0, "vit0"), (7, "vit7")):
        ensure_tiny_parts(TinySpec(**{**vars(spec), "vit_pretrain_steps": steps}), tokenizer=tmp_path / "tok",
                          llm=tmp_path / "llm", vit=tmp_path / vit)
        assert (tmp_path / vit / "config.json").is_file()
    assert calls == [(7, 0)]
    ensure_tiny_parts(TinySpec(**{**vars(spec), "vit_pretrain_steps": 7}), tokenizer=tmp_path / "tok",
                      llm=tmp_path / "llm", vit=tmp_path / "vit7")
    assert calls == [(7, 0)]  # an existing directory is left as it is
