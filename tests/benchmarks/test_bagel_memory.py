"""benchmarks/bagel_memory.py: the parameter count it works from is BAGEL-7B-MoT's (about 14.7 B: two Qwen2.5-7B
experts sharing embeddings, SigLIP-so400m less a layer, the FLUX autoencoder), and it gives a row per recipe."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bagel_memory  # noqa: E402


def test_counts_are_bagel_7b_mots():
    c = bagel_memory.counts()
    total = sum(v for k, v in c.items() if not k.startswith("layer_"))
    assert 14.5e9 < total < 14.9e9
    assert 6.4e9 < c["gen"] < 6.7e9 and 80e6 < c["ae"] < 90e6  # (the FLUX autoencoder: about 84 M)
    assert bagel_memory.lora_params(c, 1, ["q_proj"], []) == 28 * (3584 + 3584)


def test_a_row_per_recipe(capsys):
    sys.argv = ["bagel_memory.py"]
    bagel_memory.main()
    out = capsys.readouterr().out
    recipes = sorted(p.stem for p in (ROOT / "recipes" / "bagel-7b").glob("*.yaml"))
    for name in recipes:
        assert f"| {name}" in out, name
