"""What the learnability tests share (DESIGN §8; the tests: `test_learnability.py`, `test_learnability_stories.py`).

A tiny model memorises a handful of samples of each kind and reproduces them through the public generation loop
(`mogao.inference` tasks and `GenerationSession`), judged by the project's judges. Equivalence tests (cached vs
recomputed, ...) cannot catch a pathway that carries no signal; these can. Each test trains a fresh tiny model
(CPU, fp32) on its own samples, with no condition dropout, then generates without guidance: a memorised sample
needs none, and guidance would mix in the unconditional branches, which these samples never train. A failure
means the pathway cannot learn, not that a threshold is strict.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from mogao.data import DataConfig, collate_plans, lower_sample, samples_from_dicts, stable_seed
from mogao.diffusion.flow import TimestepSampling
from mogao.inference import GenerationConfig, Guidance
from mogao.model.config import ModelConfig
from mogao.model.io import load_model
from mogao.model.mogao import MogaoModel
from mogao.model.tiny import TinySpec, ensure_tiny_components
from mogao.training.objectives import combine_losses

IMAGE_SIZE = 32  # pixels; the pixel autoencoder with latent patch 4 makes it an 8x8 token grid, as the demo
NO_GUIDANCE = Guidance(text_scale=1.0, image_scale=1.0)
SHIFT = 3.0  # training σ shifted towards noise, where a memorised layout is decided (sampling uses the same)
SAMPLING = GenerationConfig(steps=20, image_size=IMAGE_SIZE)
SPEC = dict(hidden_size=64, layers=2, heads=2, kv_heads=2, vit_hidden_size=32, vit_patch_size=4)
LR = 2e-3
STEPS = {"keep": 600, "edit": 1000, "t2i": 1500, "text": 100, "story": 1800}
"""Full-batch steps each test trains for: what its samples take to be reproduced exactly (measured: edits 8/8 at
1000, T2I 12/12 at 1500, stories 7/8 at 1500 and 8/8 at 2000 on 2 cores; fewer steps leave shape edges soft)."""


def build_parts(root) -> dict:
    """Tiny parts as the recipes build them (tokenizer on the built-in corpus), sized for fast memorising."""
    spec = TinySpec(**SPEC)
    d = {k: root / k for k in ("tokenizer", "llm", "vit")}
    ensure_tiny_components(spec, **d)
    return {**d, "tok": AutoTokenizer.from_pretrained(d["tokenizer"])}


def memorise(parts: dict, samples: list[dict], steps: int, lr: float = LR, seed: int = 0) -> MogaoModel:
    """Train a fresh tiny model on `samples` (all of them in every step) and return it in eval mode.

    Every step draws new σ and noise for each generation target (the seeds follow the step); the learning rate
    warms up for 10 steps and then decays to zero on a cosine.
    """
    tok = parts["tok"]
    torch.manual_seed(seed)
    cfg = ModelConfig(llm=str(parts["llm"]), vit=str(parts["vit"]), autoencoder="pixel", latent_patch=4,
                      vocab_size=len(tok), timestep_sampling=TimestepSampling(shift=SHIFT), prediction="x0")
    model = load_model(cfg)
    data = DataConfig(token_budget=1 << 20, max_image_tokens=64, vit_patch=model.vit_patch,
                      vae_patch=model.vae_patch, p_drop_text=0.0, p_drop_images=0.0)
    plans = [lower_sample(s, tok, data) for s in samples_from_dicts(samples)]
    batch = collate_plans(plans, data.token_budget)
    base_seeds = batch.image_seed.clone()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for step in range(steps):
        batch.image_seed = torch.tensor([stable_seed("learn", int(s), step) for s in base_seeds])
        loss = combine_losses(model(batch).terms).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
