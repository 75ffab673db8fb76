"""Every `recipes/bagel-7b` recipe through `mogao fit` on a tiny BAGEL folder: the recipe's module, LoRA spec,
strategy (FSDP2 with activation checkpointing) and data settings as shipped; only what cannot be had here is
swapped (CPU instead of a GPU, fp32 instead of bf16 autocast, no NF4 base: that needs CUDA) and the image sizes fit the tiny folder's 4 x 4 position tables. With those
swaps a QLoRA recipe is its LoRA recipe (its configuration is compared, not trained twice)."""

from __future__ import annotations

import pytest
from test_multiprocess_cli import ROOT, _rows, torchrun
from tiny_bagel import write_tiny_bagel

RECIPES = sorted(p.stem for p in (ROOT / "recipes" / "bagel-7b").glob("*.yaml"))
QLORA = [r for r in RECIPES if r.startswith("qlora-")]
CPU_SWAPS = ["--model.init_args.lora.quantize=none", "--model.init_args.optimizer.class_path=torch.optim.AdamW"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_bagel(tmp_path_factory.mktemp("bagel-recipes") / "BAGEL-tiny")


def _args(recipe: str, tiny, run, budget: bool = True) -> list[str]:
    """The recipe on the tiny folder and the CPU (its own data settings but the image sizes, and the token budget
    unless `budget` is False)."""
    task = "t2i" if "t2i" in recipe else "interleaved"
    data = ROOT / "tests" / "data" / "lora" / f"{task}.jsonl"
    return ["--config", str(ROOT / "recipes" / "bagel-7b" / f"{recipe}.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.precision=32-true", f"--trainer.default_root_dir={run}", f"--model.init_args.save_dir={run / 'out'}",
            f"--model.init_args.init_from={tiny.path}", f"--model.init_args.tokenizer={tiny.path}",
            f"--data.path={data}", "--data.num_workers=0", "--data.data.max_image_tokens=16", "--data.data.max_grid=4",
            *(["--data.data.token_budget=1024"] if budget else [])]


def test_every_bagel_recipe_is_tested():
    assert set(RECIPES) >= {"lora-edit", "lora-t2i", "lora-interleaved", "qlora-edit", "qlora-t2i",
                            "qlora-interleaved", "full"}
    assert all(r.removeprefix("q") in RECIPES for r in QLORA)  # each QLoRA recipe has its LoRA recipe


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in QLORA])
def test_bagel_recipe_trains_from_a_bagel_folder(recipe, tiny, tmp_path):
    run = tmp_path / "run"
    args = ["fit", *_args(recipe, tiny, run), "--trainer.max_steps=2", "--trainer.val_check_interval=1000"]
    if recipe != "full":
        args += CPU_SWAPS
    else:
        args += ["--trainer.strategy.init_args.param_dtype=null"]
    torchrun(args, tmp_path, tmp_path / "trace", nproc=1)
    assert [r["step"] for r in _rows(run, "train")] == [1, 2]
    saved = run / "out"
    assert (saved / ("model.safetensors" if recipe == "full" else "adapter_model.safetensors")).is_file()


@pytest.mark.parametrize("recipe", QLORA)
def test_a_qlora_recipe_on_the_cpu_is_its_lora_recipe(recipe, tiny, tmp_path):
    """With the CPU swaps (no NF4, AdamW) a QLoRA recipe's whole configuration - module, adapters, optimizer
    settings, strategy, trainer and data - is its LoRA recipe's, which the test above trains; as shipped it builds
    through the same CLI with the NF4 base and its own token budget."""
    import yaml

    from mogao.recipes import build_cli

    def config(name: str, *extra: str) -> dict:
        cli = build_cli([*_args(name, tiny, tmp_path / "run"), *extra], run=False)
        cfg = cli.config.as_dict()
        cfg.pop("config")  # (the file it came from)
        return cfg

    assert config(recipe, *CPU_SWAPS) == config(recipe.removeprefix("q"), *CPU_SWAPS)
    shipped = build_cli(_args(recipe, tiny, tmp_path / "run", budget=False), run=False)
    assert shipped.model.lora.quantize == "nf4" and shipped.model.lora == shipped.model.trainable.spec
    init = shipped.config.as_dict()["model"]["init_args"]
    assert init["optimizer"]["class_path"] == "torch.optim.AdamW"  # (bitsandbytes' 8-bit ones refuse FSDP2's DTensors)
    own = yaml.safe_load((ROOT / "recipes" / "bagel-7b" / f"{recipe}.yaml").read_text())
    assert shipped.datamodule.data.token_budget == own["data"]["data"]["token_budget"]
