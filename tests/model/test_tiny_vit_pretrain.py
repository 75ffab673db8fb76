"""`pretrain_tiny_vit`: the tiny recipes' stand-in for pretrained SigLIP weights."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from mogao.model.tiny import TinySpec, ensure_tiny_components, pretrain_tiny_vit, save_tiny_vit


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
    # both losses fall well below their start (digits: 10 classes, ln 10 = 2.3; scenes: two heads, each the sum
    # over 5 positions of four attributes' CE, 33 colour classes among them); measured: digit 2.8 -> 0.9,
    # scene 13.1 -> 4.7
    assert last["digit"] < 0.5 * first["digit"] and last["scene"] < 0.5 * first["scene"]
    assert last == last_b and all(torch.equal(weights[k], weights_b[k]) for k in weights)
    random = _weights(save_tiny_vit(tmp_path / "random", hidden_size=32, patch_size=8))
    assert random.keys() == weights.keys()  # the same architecture, loadable wherever the random one is
    assert not torch.equal(random["embeddings.patch_embedding.weight"],
                           weights["embeddings.patch_embedding.weight"])


def test_ensure_tiny_components_pretrains_only_when_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("mogao.model.tiny.pretrain_tiny_vit", lambda d, steps, seed: calls.append((steps, seed)))
    spec = TinySpec(hidden_size=32, layers=1, heads=2, kv_heads=1, vit_hidden_size=16, vit_patch_size=8)
    for steps, vit in ((0, "vit0"), (7, "vit7")):
        ensure_tiny_components(TinySpec(**{**vars(spec), "vit_pretrain_steps": steps}), tokenizer=tmp_path / "tok",
                          llm=tmp_path / "llm", vit=tmp_path / vit)
        assert (tmp_path / vit / "config.json").is_file()
    assert calls == [(7, 0)]
    ensure_tiny_components(TinySpec(**{**vars(spec), "vit_pretrain_steps": 7}), tokenizer=tmp_path / "tok",
                      llm=tmp_path / "llm", vit=tmp_path / "vit7")
    assert calls == [(7, 0)]  # an existing directory is left as it is


def test_colour_classes_name_each_swapped_rgb_once_and_keep_the_palette_first():
    from mogao.data.builtin.shapes import COLOURS
    from mogao.model.tiny import _CHANNEL_ORDERS, colour_classes

    rgb, cls = colour_classes()
    palette = list(COLOURS.values())
    assert rgb[:len(palette)] == palette and cls[0].tolist() == list(range(len(palette)))
    assert len(set(rgb)) == len(rgb)
    for o, order in enumerate(_CHANNEL_ORDERS):
        for c, colour in enumerate(palette):
            assert rgb[cls[o, c]] == tuple(colour[k] for k in order)
    # a swap that leaves a colour's RGB as it was (red's equal green and blue) keeps its palette class, so no
    # swapped scene ever carries a palette label that its pixels contradict
    red = list(COLOURS).index("red")
    assert cls[_CHANNEL_ORDERS.index((0, 2, 1)), red] == red


def test_pretraining_reports_validation_accuracies(tmp_path):
    d = save_tiny_vit(tmp_path / "v", hidden_size=32, patch_size=8)
    out = pretrain_tiny_vit(d, steps=2, scenes=64, batch_size=16)
    for key in ("val_occupied", "val_colour", "val_shape", "val_size", "val_colour_held_out",
                "val_shape_held_out", "val_digit"):
        assert 0.0 <= out[key] <= 1.0


def test_building_tiny_components_leaves_the_global_random_states_alone(tmp_path):
    """A run that builds its tiny components first must draw the same new layers and data as one that finds them."""
    import random

    import numpy as np
    import torch

    from mogao.model.tiny import TinySpec, ensure_tiny_components

    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    ensure_tiny_components(TinySpec(hidden_size=32, layers=1, heads=2, kv_heads=1, vit_hidden_size=16,
                                    vit_pretrain_steps=2),
                           tokenizer=tmp_path / "tok", llm=tmp_path / "llm", vit=tmp_path / "vit")
    assert (tmp_path / "vit").is_dir() and (tmp_path / "llm").is_dir()
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
