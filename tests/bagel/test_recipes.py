"""Every `recipes/bagel-7b` recipe through `mogao fit` on a tiny BAGEL folder: the recipe's module, LoRA spec,
strategy (FSDP2 with activation checkpointing) and data settings as shipped; only what cannot be had here is
swapped (CPU instead of a GPU, fp32 instead of bf16 autocast, no NF4 base and AdamW instead of bitsandbytes'
paged optimizer: those need CUDA) and the image sizes fit the tiny folder's 4 x 4 position tables."""

from __future__ import annotations

import pytest
from test_multiprocess_cli import ROOT, _rows, torchrun
from tiny_bagel import write_tiny_bagel

RECIPES = sorted(p.stem for p in (ROOT / "recipes" / "bagel-7b").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_bagel(tmp_path_factory.mktemp("bagel-recipes") / "BAGEL-tiny")


def test_every_bagel_recipe_is_tested():
    assert set(RECIPES) >= {"lora-edit", "lora-t2i", "lora-interleaved", "qlora-edit", "qlora-t2i",
                            "qlora-interleaved", "full"}


@pytest.mark.parametrize("recipe", RECIPES)
def test_bagel_recipe_trains_from_a_bagel_folder(recipe, tiny, tmp_path):
    run = tmp_path / "run"
    task = "t2i" if "t2i" in recipe else "interleaved"
    data = ROOT / "tests" / "data" / "lora" / f"{task}.jsonl"
    args = ["fit", "--config", f"bagel-7b/{recipe}", "--trainer.max_steps=2", "--trainer.val_check_interval=1000",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
            f"--trainer.default_root_dir={run}", f"--model.init_args.save_dir={run / 'out'}",
            f"--model.init_args.init_from={tiny.path}", f"--model.init_args.tokenizer={tiny.path}",
            f"--data.path={data}", "--data.num_workers=0", "--data.data.max_image_tokens=16",
            "--data.data.max_grid=4", "--data.data.token_budget=1024"]
    if recipe != "full":
        args += ["--model.init_args.lora.quantize=none", "--model.init_args.optimizer.class_path=torch.optim.AdamW"]
    else:
        args += ["--trainer.strategy.init_args.param_dtype=null"]
    torchrun(args, tmp_path, tmp_path / "trace", nproc=1)
    assert [r["step"] for r in _rows(run, "train")] == [1, 2]
    saved = run / "out"
    assert (saved / ("model.safetensors" if recipe == "full" else "adapter_model.safetensors")).is_file()
