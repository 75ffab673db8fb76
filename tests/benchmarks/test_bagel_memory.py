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


def _yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "recipes" / "bagel-7b" / f"{name}.yaml").read_text())


def test_each_recipes_figure_follows_its_yaml():
    """What trains, the optimizer's state, the token budget and the GPUs of each row come from the recipe file."""
    from mogao.lora.spec import LoraSpec

    c = bagel_memory.counts()
    for name in bagel_memory.recipe_names():
        cfg = _yaml(name)
        m = bagel_memory.recipe_memory(name)
        assert m["tokens"] == cfg["data"]["data"]["token_budget"]
        assert abs(m["activations"] - bagel_memory.activations(m["tokens"]) / bagel_memory.GB) < 1e-9
        lora = cfg["model"]["init_args"].get("lora")
        if lora is None:
            assert m["label"] == f"full (per GPU of {cfg['trainer']['devices']})"
            continue
        spec = LoraSpec(**lora)
        adapters = bagel_memory.lora_params(c, spec.rank, spec.modules("und"), spec.modules("gen"))
        assert m["trained"] >= adapters and (m["trained"] > adapters) == bool(spec.full)
        state = 2 if "8bit" in cfg["model"]["init_args"]["optimizer"]["class_path"] else 8
        assert abs(m["optimizer"] - m["trained"] * state / bagel_memory.GB) < 1e-9
    assert bagel_memory.recipe_memory("lora-edit", tokens=4096)["total"] < bagel_memory.recipe_memory("lora-edit")["total"]


def test_recipes_with_the_same_settings_are_measured_once():
    names = bagel_memory.recipe_names()
    plan = bagel_memory.measurement_plan(names)
    assert sorted(n for run, twins in plan for n in (run, *twins)) == sorted(names)
    for run, twins in plan:
        for t in twins:  # the same file apart from its run folder
            a, b = _yaml(run), _yaml(t)
            a["trainer"].pop("default_root_dir"), b["trainer"].pop("default_root_dir")
            assert a == b, (run, t)
    assert ("lora-edit", ["lora-interleaved"]) in plan and ("qlora-edit", ["qlora-interleaved"]) in plan


def test_measured_row_sets_the_peak_beside_the_computed_figure():
    gib = 2**30
    r = {"recipe": "qlora-t2i", "trainable": 10, "tokens": [3000, 3200], "step_s": 1.0, "first_step_s": 2.0,
         "peak_allocated": 11 * gib, "peak_reserved": 12 * gib, "device_peak": 23.5 * gib}
    row = bagel_memory.measured_row(r)
    same = bagel_memory.recipe_memory("qlora-t2i", tokens=3200)["total"]
    assert row["tokens"] == 3200 and row["computed_same_tokens_gib"] == same
    assert row["ratio"] == 11 / same and row["peak_gib"] == 11 and row["reserved_gib"] == 12
    assert row["computed_gib"] == bagel_memory.recipe_memory("qlora-t2i")["total"]
    assert row["fits_24gb"].startswith("yes")
    assert bagel_memory.measured_row({**r, "device_peak": 24.5 * gib})["fits_24gb"].startswith("NO")
    lora = bagel_memory.measured_row({**r, "recipe": "lora-t2i"})
    assert "fits_24gb" not in lora  # (the 24 GB question is QLoRA's)
    cpu = bagel_memory.measured_row({**r, "peak_allocated": None})
    assert "peak_gib" not in cpu and "ratio" not in cpu
