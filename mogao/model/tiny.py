"""Tiny random components (tokenizer, LLM, SigLIP, VAE) saved with `save_pretrained`, so tests and the CPU demo
load them through exactly the code path real checkpoints use (no hub downloads anywhere)."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch


def save_tiny_llm(
    directory: str | Path,
    vocab_size: int = 512,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    family: Literal["qwen2", "llama", "qwen3"] = "qwen2",
    seed: int = 0,
    rope_theta: float | None = None,
) -> Path:
    """Save a random decoder LLM of the given family and return its directory.

    rope_theta: RoPE base (None: the family's default, 10000).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
    )
    if rope_theta is not None:
        common["rope_parameters"] = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if family == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=hidden_size // heads, tie_word_embeddings=True)
    elif family == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False)
    else:
        raise ValueError(f"unknown family '{family}': qwen2, qwen3 or llama")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    with torch.no_grad():  # HF init is tiny; a larger spread makes parity tests meaningful
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    out = Path(directory)
    model.save_pretrained(out)
    return out


def save_tiny_vit(directory: str | Path, hidden_size: int = 32, patch_size: int = 4, image_size: int = 32,
                  layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """Save a random SigLIP vision model."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(
        hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=layers,
        num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
    )
    out = Path(directory)
    SiglipVisionModel(cfg).save_pretrained(out)
    return out


def save_tiny_vae(directory: str | Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """Save a random `diffusers` AutoencoderKL (downsample 2)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
    )
    out = Path(directory)
    vae.save_pretrained(out)
    return out


@dataclass
class TinySpec:
    """Sizes of the tiny random components the CPU recipes build on first use (then load like real checkpoints)."""

    hidden_size: int = 96
    """Hidden size of the tiny LLM (both experts)."""
    layers: int = 3
    """Decoder layers."""
    heads: int = 4
    """Attention heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    family: str = "qwen2"
    """LLM family: qwen2, qwen3 or llama."""
    vit_hidden_size: int = 48
    """Hidden size of the tiny SigLIP."""
    vit_patch_size: int = 4
    """Pixels per ViT patch side."""
    vocab_size: int = 400
    """Target vocabulary of the tokenizer trained on the built-in corpus."""
    rope_theta: float = 100.0
    """RoPE base of the tiny LLM. IL-RoPE gives an image's rows and columns every third of the highest rotary
    frequencies; with a head_dim of 32 and the usual base of 10000 the fastest of them turns only 0.3-0.6 rad
    per token-grid cell, too flat for a generated token to find the same cell of a condition image, and
    copying a condition image (editing) learns several times slower. A base of 100 turns them 0.56-0.75 rad
    per cell while text positions stay distinct over about 500 tokens, far more than the built-in samples."""
    vit_pretrain_steps: int = 0
    """Steps of supervised pretraining of the tiny SigLIP on the built-in world's train split before first use
    (`pretrain_tiny_vit`; 0: a random ViT). Real recipes load pretrained SigLIP weights; a random, frozen ViT is
    no stand-in for them: its tokens hold the pixels but not what is where, and a 128-wide LLM then takes
    thousands of steps to learn to read shapes, counts or digits through attention."""
    seed: int = 0
    """Seed of the random weights."""


torch.serialization.add_safe_globals([TinySpec])  # travels in checkpoints' hyper-parameters


def _build_atomically(target: Path, build) -> None:
    """Build into a temporary sibling directory and rename it into place (safe if interrupted or raced)."""
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_components(spec: TinySpec, *, tokenizer: str | Path, llm: str | Path, vit: str | Path) -> None:
    """Create whichever of the tokenizer / LLM / ViT directories is missing, deterministically from `spec`.

    The tokenizer is trained on `mogao.data.builtin.builtin_corpus()`; the LLM's vocabulary matches it.
    Existing directories are left as they are (they may be real checkpoints). The global random states (torch,
    numpy, `random`) are as they were afterwards, so a run that builds its components first draws the same new
    layers and data as a run that finds them.
    """
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        _build_tiny_components(spec, tokenizer=tokenizer, llm=llm, vit=vit)
    random.setstate(py_state)
    np.random.set_state(np_state)


def _build_tiny_components(spec: TinySpec, *, tokenizer: str | Path, llm: str | Path, vit: str | Path) -> None:
    from transformers import AutoTokenizer

    from mogao.data.builtin import builtin_corpus
    from mogao.data.tokenizer import train_tokenizer

    tokenizer, llm, vit = Path(tokenizer), Path(llm), Path(vit)
    _build_atomically(tokenizer, lambda d: train_tokenizer(builtin_corpus(), vocab_size=spec.vocab_size).save_pretrained(d))
    vocab = len(AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False))
    _build_atomically(llm, lambda d: save_tiny_llm(d, vocab_size=vocab, hidden_size=spec.hidden_size,
                                                   layers=spec.layers, heads=spec.heads, kv_heads=spec.kv_heads,
                                                   family=spec.family, seed=spec.seed,
                                                   rope_theta=getattr(spec, "rope_theta", None)))
    def build_vit(d: Path) -> None:
        save_tiny_vit(d, hidden_size=spec.vit_hidden_size, patch_size=spec.vit_patch_size)
        if spec.vit_pretrain_steps > 0:
            pretrain_tiny_vit(d, steps=spec.vit_pretrain_steps, seed=spec.seed)

    _build_atomically(vit, build_vit)


#: the orders of the RGB channels (the first: unchanged)
_CHANNEL_ORDERS = tuple(itertools.permutations(range(3)))


def colour_classes() -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """The colour classes of the tiny ViT's pretraining: every distinct RGB value a palette colour takes under
    some order of the channels, the palette itself first and in its order. Returns (the classes' RGB values,
    class[channel order, palette index])."""
    from mogao.data.builtin.shapes import COLOURS

    rgb = [tuple(c[k] for k in order) for order in _CHANNEL_ORDERS for c in COLOURS.values()]
    distinct = list(dict.fromkeys(rgb))
    return distinct, torch.tensor([distinct.index(v) for v in rgb]).reshape(len(_CHANNEL_ORDERS), len(COLOURS))


#: scene positions the pretraining labels: the four cells and the centre
_PRETRAIN_POSITIONS = ("top left", "top right", "bottom left", "bottom right", None)


def _scene_labels(meta: dict) -> list[list[int]]:
    """Per position: [occupied, colour, shape, size], the last three -100 (no label) where it is empty. Colour,
    shape and size are labelled apart, so a held-out colour-shape pair is as representable as any other."""
    from mogao.data.builtin.shapes import COLOURS, SHAPES, SIZES

    colours = list(COLOURS)
    labels = [[0, -100, -100, -100] for _ in _PRETRAIN_POSITIONS]
    for o in meta["scenes"][0]["objects"]:
        labels[_PRETRAIN_POSITIONS.index(o["cell"])] = [1, colours.index(o["colour"]), SHAPES.index(o["shape"]),
                                                        SIZES.index(o["size"])]
    return labels


def pretrain_tiny_vit(directory: str | Path, steps: int = 600, seed: int = 0, batch_size: int = 128,
                      lr: float = 4e-3, scenes: int = 12000, colour_swaps: float = 0.5) -> dict[str, float]:
    """Supervised pretraining of the SigLIP saved in `directory`, in place: the stand-in for pretrained SigLIP
    weights in tiny recipes.

    Data: the built-in world's *train* split only (no held-out colour-shape pair, no validation digit), at the
    ViT's image size: scenes of 1-4 objects (three quarters of each batch), labelled per cell and centre with
    occupied or not and the object's colour, shape and size (each its own label), and real digits shifted by
    up to 2 pixels, labelled 0-9. Linear heads read SigLIP's attention-pooled output (scene and digit) and the
    mean token of each cell's quadrant and of the centre (that position's label), so what they need is pushed
    into the tokens; the heads are then dropped (the pooling head stays in the checkpoint, unused by
    `VisionEncoder`).

    colour_swaps: share of scenes whose RGB channels are put in another order, each object's colour labelled as
    the RGB value it then has (`colour_classes`). Without it the train split's missing colour-shape pairs teach
    the ViT that colour tells shape: on validation objects of held-out pairs it read shape right 40 % of the
    time and colour 78 % (seen pairs: about 85 % and 95 %); with half the scenes swapped, 94 % and 93 %, in
    the same 600 steps. No held-out pair is ever labelled: a swapped red is no longer the palette's red.

    Returns the last step's losses and, measured on 512 validation scenes (half of them with a held-out pair)
    and the validation digits, the heads' accuracies: `val_occupied`, `val_colour`, `val_shape`, `val_size`,
    `val_colour_held_out`, `val_shape_held_out` (objects of held-out pairs only) and `val_digit`.
    """
    import math
    import time

    import numpy as np
    from torch import nn
    from transformers import SiglipVisionModel

    from mogao.data.builtin import make_builtin
    from mogao.data.builtin.digits import load_digit_images, render_digit, split_indices
    from mogao.data.builtin.shapes import COLOURS, SHAPES, SIZES, is_held_out

    colour_names = list(COLOURS)
    directory = Path(directory)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vit = SiglipVisionModel.from_pretrained(directory)
    size, hidden = vit.config.image_size, vit.config.hidden_size

    def to_tensor(img) -> torch.Tensor:
        return torch.from_numpy(np.array(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

    data = make_builtin("caption", split="train", n=scenes, seed=seed + 1, image_size=size, max_objects=4)
    scene_x = torch.stack([to_tensor(s["segments"][0]["image"]) for s in data.samples])
    scene_y = torch.tensor([_scene_labels(m) for m in data.meta])
    train = split_indices("train")
    digit_x = torch.stack([to_tensor(render_digit(int(i), size)) for i in train])
    digit_y = torch.from_numpy(load_digit_images()[1][train])
    distinct, colour_class = colour_classes()
    n_pos = len(_PRETRAIN_POSITIONS)
    sizes = (2, len(distinct), len(SHAPES), len(SIZES))  # occupied, colour, shape, size
    heads = nn.ModuleDict({"scene": nn.Linear(hidden, n_pos * sum(sizes)), "local": nn.Linear(hidden, sum(sizes)),
                           "digit": nn.Linear(hidden, 10)})

    def attribute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """logits (B, positions, sum(sizes)), labels (B, positions, 4): the sum of the four attributes' CE."""
        parts = logits.split(sizes, dim=-1)
        return sum(nn.functional.cross_entropy(x.reshape(-1, x.shape[-1]), labels[..., k].reshape(-1))
                   for k, x in enumerate(parts))

    params = [*vit.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    n_scene = batch_size * 3 // 4
    n_digit = batch_size - n_scene
    shift = 2
    n = size // vit.config.patch_size  # tokens a side

    def cell_means(states: torch.Tensor) -> torch.Tensor:
        """(B, n*n, hidden) tokens -> (B, positions, hidden): the mean token of each cell's quadrant and of the
        centre square, in `_PRETRAIN_POSITIONS` order."""
        tok, h, q = states.reshape(len(states), n, n, hidden), n // 2, n // 4
        regions = [tok[:, :h, :h], tok[:, :h, h:], tok[:, h:, :h], tok[:, h:, h:], tok[:, q:n - q, q:n - q]]
        return torch.stack([r.mean((1, 2)) for r in regions], 1)

    t0 = time.perf_counter()
    print(f"[mogao] pretraining the tiny ViT in {directory}: {steps} steps on built-in scenes and digits (once; "
          "later runs reuse it)", flush=True)
    losses = {}
    vit.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="tiny ViT", disable=not sys.stderr.isatty(), leave=False):
        for g in opt.param_groups:  # warm-up, then cosine to 10 %
            g["lr"] = lr * min(1.0, (step + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        i = torch.randint(0, len(scene_x), (n_scene,), generator=gen)
        j = torch.randint(0, len(digit_x), (n_digit,), generator=gen)
        padded = nn.functional.pad(digit_x[j], (shift,) * 4, value=1.0)  # white margin, then a random crop
        dy, dx = torch.randint(0, 2 * shift + 1, (2, n_digit), generator=gen).tolist()
        digits = torch.stack([padded[k, :, a:a + size, b:b + size] for k, (a, b) in enumerate(zip(dy, dx))])
        scenes_now, labels_now = scene_x[i], scene_y[i]
        if colour_swaps > 0:
            # the colours' channels swapped in some scenes, each object's colour labelled as the RGB value it
            # then has: shapes come in colours of every kind, and shape has to be read apart from colour
            perm = torch.randint(1, len(_CHANNEL_ORDERS), (n_scene,), generator=gen)
            perm[torch.rand(n_scene, generator=gen) >= colour_swaps] = 0
            order = torch.tensor(_CHANNEL_ORDERS)[perm]  # (B, 3)
            scenes_now = torch.gather(scenes_now, 1, order[:, :, None, None].expand_as(scenes_now))
            colour = labels_now[..., 1]
            labels_now = labels_now.clone()
            labels_now[..., 1] = torch.where(colour >= 0, colour_class[perm[:, None], colour.clamp(min=0)], colour)
        pixels = torch.cat([scenes_now, digits]) * 2.0 - 1.0  # SigLIP's normalisation: [0, 1] -> [-1, 1]
        out = vit(pixel_values=pixels)
        pooled = out.pooler_output
        scene_loss = attribute_loss(heads["scene"](pooled[:n_scene]).reshape(n_scene, n_pos, -1), labels_now)
        # ... and from the mean token of each cell's quadrant and of the centre, so tokens say what is there
        scene_loss = scene_loss + attribute_loss(heads["local"](cell_means(out.last_hidden_state[:n_scene])),
                                                 labels_now)
        digit_loss = nn.functional.cross_entropy(heads["digit"](pooled[n_scene:]), digit_y[j])
        opt.zero_grad(set_to_none=True)
        (scene_loss + digit_loss).backward()
        opt.step()
        losses = {"scene": scene_loss.item(), "digit": digit_loss.item()}
    vit.eval()
    vit.save_pretrained(directory)
    # what the tokens hold on data the pretraining never saw: validation scenes (held-out colour-shape pairs
    # among them) read by the per-position heads, and validation digits
    val = make_builtin("caption", split="validation", n=512, seed=seed + 2, image_size=size, max_objects=4)
    val_y = torch.tensor([_scene_labels(m) for m in val.meta])
    val_idx = split_indices("validation")
    with torch.no_grad():
        out = vit(pixel_values=torch.stack([to_tensor(s["segments"][0]["image"]) for s in val.samples]) * 2 - 1)
        logits = list(heads["local"](cell_means(out.last_hidden_state)).split(sizes, -1))
        logits[1] = logits[1][..., :len(COLOURS)]  # which palette colour (the swapped ones name none)
        pred = [x.argmax(-1) for x in logits]
        digit_pixels = torch.stack([to_tensor(render_digit(int(i), size)) for i in val_idx]) * 2 - 1
        digit_pred = heads["digit"](vit(pixel_values=digit_pixels).pooler_output).argmax(-1)
    held = torch.tensor([[is_held_out(colour_names[c], SHAPES[s]) if c >= 0 else False for _, c, s, _ in pos]
                         for pos in val_y.tolist()])
    for k, name in enumerate(("occupied", "colour", "shape", "size")):
        known = val_y[..., k] >= 0
        right = pred[k] == val_y[..., k]
        losses[f"val_{name}"] = float(right[known].float().mean())
        if name in ("colour", "shape"):
            losses[f"val_{name}_held_out"] = float(right[known & held].float().mean())
    losses["val_digit"] = float((digit_pred.numpy() == load_digit_images()[1][val_idx]).mean())
    print(f"[mogao] tiny ViT pretrained in {time.perf_counter() - t0:.0f} s; last losses: scene "
          f"{losses.get('scene', float('nan')):.3f}, digit {losses.get('digit', float('nan')):.3f}; validation "
          "accuracy: " + ", ".join(f"{k[4:]} {v:.3f}" for k, v in losses.items() if k.startswith("val_")), flush=True)
    return losses
