"""Loading what an evaluation runs on: a saved model directory with its tokenizer, or an untrained tiny model
built from a tiny recipe's parts (the baseline a trained model should beat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mogao.errors import ConfigError
from mogao.inference.inputs import load_model_dir as load_checkpoint
from mogao.model.io import load_model, load_tokenizer

__all__ = ["load_checkpoint", "load_tokenizer", "untrained_model"]

UNTRAINED_RECIPE = "tiny/t2i"


def untrained_model(recipe: str = UNTRAINED_RECIPE, *, tokenizer: str | Path | None = None,
                    seed: int = 0) -> tuple[Any, Any]:
    """(random model, tokenizer) built like the recipe's model before any training: the recipe's parts (its
    `model.init_args.model`), created from its `tiny` spec when missing, and the new layers seeded with `seed`.

    The tokenizer (the recipe's `model.init_args.tokenizer`, or `tokenizer`) must exist: it is the same one a
    trained model of the recipe uses, so an untrained and a trained model read the same prompts.
    """
    import torch
    import yaml

    from mogao.model.config import ModelConfig
    from mogao.model.tiny import TinySpec, ensure_tiny_components
    from mogao.recipes import resolve_recipe

    path = resolve_recipe(recipe)
    try:
        init = yaml.safe_load(path.read_text())["model"]["init_args"]
        model_cfg = dict(init["model"])
        tok_dir = Path(tokenizer if tokenizer is not None else init["tokenizer"])
    except (KeyError, TypeError, yaml.YAMLError) as e:
        raise ConfigError(f"'{path}' has no model.init_args.model / model.init_args.tokenizer to build an "
                          f"untrained model from ({type(e).__name__}: {e})") from e
    if not tok_dir.is_dir():
        raise ConfigError(f"no tokenizer at '{tok_dir}' for the untrained model; build the tiny components first (any "
                          f"tiny recipe does: `mogao fit --config recipes/{recipe}.yaml`, or `mogao demo`) or pass "
                          "--tokenizer DIR")
    tok = load_tokenizer(tok_dir)
    if init.get("tiny") is not None:
        ensure_tiny_components(TinySpec(**init["tiny"]), tokenizer=tok_dir, llm=model_cfg["llm"], vit=model_cfg["vit"])
    cfg = ModelConfig.from_dict(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model(cfg, tokenizer=tok)
    return model.eval(), tok
