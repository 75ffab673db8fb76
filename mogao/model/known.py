"""Architectures of the real checkpoints the shipped recipes name, so a recipe can be instantiated on the `meta`
device (parameter counts, memory planning, sharding plans) on a machine that does not have the weights:
`load_model(known_architecture(cfg), meta=True)`.

The numbers are those of the published `config.json` files. Loading real weights never uses this table: it
reads the checkpoint's own config.
"""

from __future__ import annotations

from mogao.errors import ConfigError
from mogao.model.config import ModelConfig, architecture_record

_QWEN2 = {"model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
          "max_position_embeddings": 32768, "attention_dropout": 0.0}

KNOWN_LLMS: dict[str, dict] = {
    "Qwen/Qwen2.5-0.5B-Instruct": {**_QWEN2, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                                   "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                                   "tie_word_embeddings": True},
    "Qwen/Qwen2.5-1.5B-Instruct": {**_QWEN2, "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
                                   "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                                   "tie_word_embeddings": True},
    "Qwen/Qwen2.5-3B-Instruct": {**_QWEN2, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008,
                                 "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                                 "tie_word_embeddings": True},
    "Qwen/Qwen2.5-7B-Instruct": {**_QWEN2, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                                 "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                                 "tie_word_embeddings": False},
}

KNOWN_VITS: dict[str, dict] = {
    "google/siglip-so400m-patch14-384": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                         "num_attention_heads": 16, "patch_size": 14, "image_size": 384},
}

_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
        "norm_num_groups": 32, "sample_size": 1024}
KNOWN_VAES: dict[str, dict] = {
    "black-forest-labs/FLUX.1-dev": {**_VAE, "latent_channels": 16, "scaling_factor": 0.3611,
                                     "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
    "stabilityai/sdxl-vae": {**_VAE, "latent_channels": 4, "scaling_factor": 0.13025},
}

# published parameter counts of the LLMs (for checks): Qwen2.5 model cards
PUBLISHED_LLM_PARAMS = {"Qwen/Qwen2.5-0.5B-Instruct": 0.49e9, "Qwen/Qwen2.5-1.5B-Instruct": 1.54e9,
                        "Qwen/Qwen2.5-3B-Instruct": 3.09e9, "Qwen/Qwen2.5-7B-Instruct": 7.61e9}


def _lookup(table: dict[str, dict], name: str, what: str) -> dict:
    if name not in table:
        raise ConfigError(f"no known {what} architecture for '{name}'; known: {sorted(table)}")
    return dict(table[name])


def known_architecture(cfg: ModelConfig) -> dict:
    """The architecture record (`architecture_record`) of the model a ModelConfig naming
    known checkpoints describes, from the published configs: `load_model(known_architecture(cfg), meta=True)`
    builds it on the meta device (no memory, no weights, no checkpoint files)."""
    llm = _lookup(KNOWN_LLMS, cfg.llm, "LLM")
    if cfg.vocab_size is not None:
        llm["vocab_size"] = cfg.vocab_size
    vit = _lookup(KNOWN_VITS, cfg.vit, "ViT")
    vae = None if cfg.autoencoder == "pixel" else _lookup(KNOWN_VAES, cfg.autoencoder, "VAE")
    return architecture_record(cfg, llm, vit, vae)
