"""Tiny random parts (LLM, SigLIP, VAE) saved with `save_pretrained`, so tests and the CPU demo load them
through exactly the code path real checkpoints use (no hub downloads anywhere)."""

from __future__ import annotations

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
) -> Path:
    """Save a random decoder LLM of the given family and return its directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
    )
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
