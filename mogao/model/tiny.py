"""Tiny random parts (LLM, SigLIP, VAE) saved with `save_pretrained`, so tests and the CPU demo load them
through exactly the code path real checkpoints use (no hub downloads anywhere)."""

from __future__ import annotations

import os
import shutil
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
    model = AutoModelForCausalLM.from_config(cfg)
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
    """Sizes of the tiny random parts the CPU recipes build on first use (then load like real checkpoints)."""

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


def ensure_tiny_parts(spec: TinySpec, *, tokenizer: str | Path, llm: str | Path, vit: str | Path) -> None:
    """Create whichever of the tokenizer / LLM / ViT directories is missing, deterministically from `spec`.

    The tokenizer is trained on `mogao.data.builtin.builtin_corpus()`; the LLM's vocabulary matches it.
    Existing directories are left as they are (they may be real checkpoints).
    """
    from transformers import AutoTokenizer

    from mogao.data.builtin import builtin_corpus
    from mogao.data.tokenizer import train_tokenizer

    tokenizer, llm, vit = Path(tokenizer), Path(llm), Path(vit)
    _build_atomically(tokenizer, lambda d: train_tokenizer(builtin_corpus(), vocab_size=spec.vocab_size).save_pretrained(d))
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    _build_atomically(llm, lambda d: save_tiny_llm(d, vocab_size=vocab, hidden_size=spec.hidden_size,
                                                   layers=spec.layers, heads=spec.heads, kv_heads=spec.kv_heads,
                                                   family=spec.family, seed=spec.seed,
                                                   rope_theta=getattr(spec, "rope_theta", None)))
    _build_atomically(vit, lambda d: save_tiny_vit(d, hidden_size=spec.vit_hidden_size,
                                                   patch_size=spec.vit_patch_size))
