"""End to end: a LoRA fine-tune on the committed teal set (tests/data/lora/t2i.jsonl) teaches a tiny model that
already draws the shapes world a colour word its palette does not have.

The base is the tiny text-to-image recipe trained briefly on the built-in shapes (16x16 images, so it draws
the prompted colour within a few hundred steps); the adapter is `recipes/lora/tiny-t2i.yaml` on top of it.
Images come from the KV-cached generation loop with classifier-free guidance (`mogao.eval.generation.t2i`),
one per shape and size, fixed seeds. The score is `mogao.report.prompted_colour_share` with teal added to the
palette: the share of generated ink nearest to a colour. "teal" prompts must go from below chance to well above
it, while prompts for colours the base already knows keep their colour and do not turn teal.
"""

from __future__ import annotations

import numpy as np
import pytest

from mogao.data.builtin.shapes import COLOURS
from mogao.eval.generation import t2i
from mogao.lora import load_adapter
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel
from mogao.recipes import RECIPES_DIR, build_cli
from mogao.report import prompted_colour_share

PALETTE = {**COLOURS, "teal": (0, 128, 128)}
CHANCE = 1 / len(PALETTE)
PROMPTS = [f"A {size} {{colour}} {shape} on a white background."
           for shape in ("circle", "square", "triangle", "cross") for size in ("large", "small")]
KNOWN = ("red", "blue")
REPO = RECIPES_DIR.parent
IMAGE_SIZE = 16
IMAGE_TOKENS = 16  # (16 / latent patch 4)^2: the base and the adapter train at the size they are scored at
# The geometry this test was built on (the tiny recipes draw 32-pixel images at patch 8 under M-RoPE; a 16-pixel
# image would be 2x2 tokens there): patch 4, IL-RoPE.
GEOMETRY = ["--model.init_args.tiny.vit_patch_size=4", "--model.init_args.model.latent_patch=4",
            "--model.init_args.model.positions=il_rope",
            # the base starts from random components, with no understanding stage before it: its understanding
            # expert learns the captions here, at the full rate (the recipe's quarter is for a trained one)
            "--model.init_args.lr_scale={}"]
BASE_STEPS = 450
LORA_STEPS = 150
QUIET = ["--trainer.val_check_interval=100000", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]",
         "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
         "--trainer.enable_model_summary=false", f"--data.data.max_image_tokens={IMAGE_TOKENS}",
         "--data.data.token_budget=384"]  # 8 samples a pack (a T2I sample: 47 tokens)


@pytest.fixture(scope="module")
def base(one_thread, tmp_path_factory):
    """The tiny T2I recipe trained for `BASE_STEPS` on one-object shapes (no digits): a model that draws the
    prompted palette colour, saved with its tokenizer in `<run>/model`."""
    root = tmp_path_factory.mktemp("e2e_base")
    parts = root / "parts"  # built from the recipe's `tiny` spec on first use
    build_cli(["fit", "--config", str(RECIPES_DIR / "tiny" / "t2i.yaml"), *QUIET, *GEOMETRY,
               f"--model.init_args.tokenizer={parts / 'tokenizer'}", f"--model.init_args.model.llm={parts / 'llm'}",
               f"--model.init_args.model.vit={parts / 'vit'}", "--model.init_args.tiny.vit_pretrain_steps=0",
               f"--trainer.max_steps={BASE_STEPS}",
               f"--model.init_args.lr_scheduler.init_args.total_steps={BASE_STEPS}",
               f"--trainer.default_root_dir={root / 'run'}",
               "--data.sources=[{name: t2i, builtin: t2i, n: 1000, val_n: 8, options: {max_objects: 1}}]"])
    return root / "run" / "model"


def colour_share(img, colour: str) -> float:
    """`mogao.report.prompted_colour_share` over `PALETTE` (the shapes palette + teal)."""
    return prompted_colour_share(img, colour, PALETTE)


def shares(model: MogaoModel, tok, colour: str) -> dict[str, float]:
    """Mean share of `colour` and of teal in the images generated for the `colour` prompts."""
    images = t2i(model.eval(), tok, [p.format(colour=colour) for p in PROMPTS], seed=0, steps=12, cfg=3.0,
                 image_size=IMAGE_SIZE)
    return {c: float(np.mean([colour_share(i, c) for i in images])) for c in {colour, "teal"}}


def scores(model: MogaoModel, tok) -> dict[str, dict[str, float]]:
    return {c: shares(model, tok, c) for c in ("teal", *KNOWN)}


def test_lora_teaches_a_new_colour_word(base, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    monkeypatch.chdir(REPO)  # the recipe's data paths are relative to the repository
    tok = AutoTokenizer.from_pretrained(base)
    before = scores(load_model(base), tok)
    build_cli(["fit", "--config", "recipes/lora/tiny-t2i.yaml", *QUIET, f"--model.init_args.init_from={base}",
               f"--model.init_args.tokenizer={base}", f"--trainer.max_steps={LORA_STEPS}",
               f"--model.init_args.lr_scheduler.init_args.total_steps={LORA_STEPS}",
               f"--trainer.default_root_dir={tmp_path}"])
    after = scores(load_adapter(load_model(base), tmp_path / "adapter"), tok)
    with capsys.disabled():
        print(f"\nshare of generated ink (chance 1/{len(PALETTE)} = {CHANCE:.3f}), base {BASE_STEPS} steps "
              f"-> LoRA {LORA_STEPS} steps:")
        for c in before:
            line = f"teal {before[c]['teal']:.3f} -> {after[c]['teal']:.3f}"
            if c != "teal":
                line = f"{c} {before[c][c]:.3f} -> {after[c][c]:.3f}, " + line
            print(f"  '{c}' prompts: {line}")
    teal_before, teal_after = before["teal"]["teal"], after["teal"]["teal"]
    assert teal_before < CHANCE, "the base already draws teal: nothing new to learn"
    assert teal_after > 2 * CHANCE and teal_after > teal_before + 0.25, "the adapter did not learn 'teal'"
    for c in KNOWN:
        assert before[c][c] > 2 * CHANCE, f"the base does not draw {c} for '{c}': a weak test of specificity"
        assert after[c]["teal"] < 0.1 and after[c]["teal"] < teal_after / 4, f"'{c}' prompts drift to teal"
        assert after[c][c] > 0.75 * before[c][c], f"'{c}' prompts lost their colour"
