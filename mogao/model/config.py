"""`ModelConfig`: what a Mogao model is built from, and its one dict form (`to_dict` / `from_dict`), used by a
saved model's `mogao_config.json`, a training checkpoint's architecture record and recipes read as plain data;
`model_architecture`, that record; `resolve_checkpoint`, where the component checkpoints a config names are."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from mogao.diffusion.flow import TimestepSampling
from mogao.errors import ConfigError

# the files of a saved model folder: the architecture record (`model_architecture`) and the weights
CONFIG_NAME = "mogao_config.json"
WEIGHTS_NAME = "model.safetensors"

# fields older saves hold that no longer mean anything (the loss weights live on the training module): read
# and dropped, so that models saved before still load
REMOVED_FIELDS = ("lambda_text", "lambda_image")


@dataclass
class ModelConfig:
    """How to build a Mogao model from pretrained components.

    Attributes:
        llm: directory of a `transformers` decoder LLM (Qwen2/Qwen3/Llama-style), loaded with `from_pretrained`.
        vit: directory of a `transformers` SigLIP vision model.
        autoencoder: "pixel" for the pixel-space autoencoder of tiny recipes, else a directory of a
            `diffusers` AutoencoderKL (frozen).
        autoencoder_subfolder: subfolder of `autoencoder` holding the VAE (e.g. "vae" inside a pipeline).
        latent_patch: side of the latent patch that becomes one VAE token (2 = 2x2 latent cells).
        attention: ECTF attention backend: "sdpa_dense", "flash_varlen" or "flex".
        text_sees_vae: whether text/ViT queries may attend to VAE tokens (Mogao: false).
        timestep_conditioning: "adaln" (Mogao: AdaLN in the generation expert) or "additive" (BAGEL).
        vit_feature_layer: -1 = last ViT layer, -2 = penultimate.
        vocab_size: grow the LLM's embeddings to at least this size (e.g. the tokenizer's length); None = keep.
        timestep_sampling: how sigma is drawn for generation targets.
        latent_position_embedding: add a fixed 2-D sin-cos code of each VAE token's (row, column) to its
            embedding (clean and noisy copies), so a noisy token can find its cell in a condition image.
        prediction: what the generation head outputs. "velocity": v = ε − x₀ directly. "x0": the clean tokens
            x̂₀, turned into v̂ = (x_σ − x̂₀) / max(σ, min_sigma_x0) for the sampler; the training loss is then
            the flow MSE with both velocities scaled by max(σ, min_sigma_x0), i.e. the MSE of x̂₀ (unscaled,
            the 1/σ² of small σ dominates and training stalls). The head never has to reproduce the noise, which matters
            when a token holds many raw values (pixel-space autoencoders: 48 values a token for 4x4 RGB
            patches on a 64-wide model): memorising 8 edits went from 0/8 to 5-6/8 in the same 700 steps.
        min_sigma_x0: the smallest σ the x0 parameterisation divides by.

    Options a BAGEL checkpoint needs (`mogao.bagel.features.bagel_model_options`); their defaults leave the model
    as it is without them:
        qk_norm: add a per-head RMSNorm (weight of size head_dim, the LLM's rms_norm_eps) of queries and keys,
            after the projections and before RoPE, to both experts of an LLM that has none (Qwen2): BAGEL's
            `q_norm` / `k_norm` (and their `_moe_gen` copies).
        timestep_embedding: "mogao": σ·1000 into the sinusoid (the AdaLN embedder `time_embed`; with additive
            conditioning a second, zero-initialised embedder `additive_time` gives the added term). "bagel"
            (additive conditioning only): BAGEL's timestep embedder - the sinusoid of σ itself (256 frequencies,
            cos before sin), then Linear-SiLU-Linear - held in `time_embed` and added to every VAE token (clean
            copies at σ = 0); no second embedder. Mogao's σ is BAGEL's t (σ = 1 is pure noise).
        latent_position_table: side S of a frozen stored table (S*S, hidden) whose row `row * S + column` is added
            to every VAE token (clean and noisy) after the in-projection (BAGEL's `latent_pos_embed`, S =
            max_latent_size); a buffer, initialised to BAGEL's 2-D sin-cos code, saved with the weights, never
            trained. None: no table. Excludes `latent_position_embedding`.
        vit_position_table: side S of the same kind of table added to the connector output of every ViT token
            (BAGEL's `vit_pos_embed`, S = vit_max_num_patch_per_side). None: no table.
        vit_positions: how the ViT's learned position embedding meets an image of another grid than its native
            one: "interpolate" (bicubic resize of the whole table, HF's) or "navit" (rows `row * S + column`
            of the table, S its native side: the top-left part, no interpolation - BAGEL's NaViT indexing).
        vae_sample_posterior: encode images with a sample of the diffusers VAE's posterior instead of its mean
            (BAGEL samples); in training each image's draw comes from its own seed.
        positions: the rotary position scheme (`mogao.sequence.positions`). "il_rope": IL-RoPE, all copies of an
            image at one T with (H, W) their grid cell. "bagel": BAGEL's 1-D RoPE as (p, p, p) - every token of
            one image copy at one position, text advancing by its length, a clean copy by 1, a noisy copy by 0;
            each image token's (row, column), which the latent position code and tables read, then comes from
            the batch's `grid_cells`. "mrope": M-RoPE, as IL-RoPE with (H, W) = (T + row, T + column) and the
            next T past the image's largest position, so that every rotary angle is relative (shift-invariant;
            cells from `grid_cells`). "mrope_aligned": M-RoPE with every image after a sample's first moved
            up to a whole number of 32-position strides after the image before it, so that the images of an edit
            or a story turn are one fixed offset apart and the same cell of the previous image one fixed rotary
            angle away. The data side follows it
            (`DataConfig.for_model`). Models saved before this option existed have no key and load as "il_rope".
        rope_axes: which rotary frequencies the H and W axes take (`mogao.model.rope.frequency_axes`).
            "interleaved": T, H, W in turn from the highest frequency, the lowest quarter all T (IL-RoPE's
            split). "hw_high": the same number of frequencies for H and W, but the highest ones (H, W, H, W, ...
            then all T): a rotary lookup of an image cell sharpens (a key one cell away scores lower). Text alone
            is the LLM's 1-D RoPE under either split (its three coordinates are equal).
        sequence_format: "mogao" (an image's copies inside one <|vision_start|>/<|vision_end|> pair) or "bagel"
            (every text segment wrapped in <|im_start|>/<|im_end|>, every image copy in its own marker pair,
            the markers inside the copy's block, copies ordered noisy, clean VAE, ViT; `mogao.sequence.formats`).
            The lowering and the generation loop follow it; "bagel" needs the attention backend "sdpa_dense" or
            "flex" (flash_varlen's decomposition has no place for markers inside image blocks).

    The loss weights are not part of the model: they are the training module's `lambda_text` / `lambda_image`.
    """

    llm: str
    vit: str
    autoencoder: str = "pixel"
    autoencoder_subfolder: str | None = None
    latent_patch: int = 2
    attention: str = "sdpa_dense"
    text_sees_vae: bool = False
    timestep_conditioning: Literal["adaln", "additive"] = "adaln"
    vit_feature_layer: int = -1
    vocab_size: int | None = None
    timestep_sampling: TimestepSampling = field(default_factory=TimestepSampling)
    latent_position_embedding: bool = True
    prediction: Literal["velocity", "x0"] = "velocity"
    min_sigma_x0: float = 0.05
    qk_norm: bool = False
    timestep_embedding: Literal["mogao", "bagel"] = "mogao"
    latent_position_table: int | None = None
    vit_position_table: int | None = None
    vit_positions: Literal["interpolate", "navit"] = "interpolate"
    vae_sample_posterior: bool = False
    positions: Literal["il_rope", "mrope", "mrope_aligned", "bagel"] = "il_rope"
    rope_axes: Literal["interleaved", "hw_high"] = "interleaved"
    sequence_format: Literal["mogao", "bagel"] = "mogao"

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready): every field, `timestep_sampling` as a dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ModelConfig:
        """The config `d` (a mapping, as `to_dict` writes it) describes; `timestep_sampling` may be a dict or a
        `TimestepSampling`. ConfigError naming unknown keys and missing required ones."""
        if not hasattr(d, "keys"):
            raise ConfigError(f"a model config must be a mapping of its fields, got {type(d).__name__}")
        values = {k: v for k, v in dict(d).items() if k not in REMOVED_FIELDS}
        names = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in values if k not in names)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        missing = [k for k in ("llm", "vit") if k not in values]
        if missing:
            raise ConfigError(f"model config lacks required key(s) {', '.join(missing)}")
        ts = values.get("timestep_sampling")
        if ts is None:
            values.pop("timestep_sampling", None)
        elif not isinstance(ts, TimestepSampling):
            if not hasattr(ts, "keys"):
                raise ConfigError(f"model config key timestep_sampling must be a mapping, got {type(ts).__name__}")
            known = {f.name for f in fields(TimestepSampling)}
            bad = sorted(str(k) for k in ts if k not in known)
            if bad:
                raise ConfigError(f"unknown timestep_sampling key(s) {', '.join(bad)}; known: "
                                  f"{', '.join(sorted(known))}")
            values["timestep_sampling"] = TimestepSampling(**ts)
        return cls(**values)


# configs travel inside Lightning checkpoints (hyper-parameters): allow them in weights-only loading (ModelConfig
# also under mogao.model.mogao, where checkpoints of earlier versions name it)
torch.serialization.add_safe_globals([ModelConfig, TimestepSampling, (ModelConfig, "mogao.model.mogao.ModelConfig")])


def architecture_record(cfg: ModelConfig, llm_config: dict, vit_config: dict,
                        autoencoder_config: dict | None) -> dict[str, Any]:
    """The architecture record: the `ModelConfig` (`to_dict`) and the LLM, ViT and autoencoder configs (None:
    the pixel autoencoder). A saved model's `mogao_config.json` and a training checkpoint's `mogao_architecture`
    entry hold it; `mogao.model.io.load_model` builds the model from it. A component config's `auto_map` (the
    code a hub checkpoint may name, never run here) is left out: a record that holds one is refused."""

    def without_auto_map(config: Any) -> Any:  # (sub-configs too: a record that holds one anywhere is refused)
        if isinstance(config, dict):
            return {k: without_auto_map(v) for k, v in config.items() if k != "auto_map"}
        return [without_auto_map(v) for v in config] if isinstance(config, list) else config

    return {"model": cfg.to_dict(), "llm_config": without_auto_map(llm_config),
            "vit_config": without_auto_map(vit_config),
            "autoencoder_config": without_auto_map(autoencoder_config)}


def model_architecture(model: Any) -> dict[str, Any]:
    """The architecture record of a built `MogaoModel`."""
    from mogao.model.autoencoder import PixelAutoencoder

    ae = model.autoencoder
    return architecture_record(model.cfg, model.backbone.config.to_dict(), model.vit.config.to_dict(),
                               None if isinstance(ae, PixelAutoencoder) else dict(ae.config))


def resolve_checkpoint(path: str, what: str) -> Path:
    """A local checkpoint directory: the path itself, or a hub id ("org/name") already in the local HF cache.

    Nothing is ever downloaded here; a missing checkpoint is a ConfigError naming it and saying how to get it.
    The weight indexes the folder holds are checked (`check_weight_indexes`): none may name a file outside it.
    """
    from mogao.model.checkpoint_files import check_weight_indexes

    p = Path(path).expanduser()
    if p.is_dir():
        check_weight_indexes(p)
        return p
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached (or no hub library): report below
            pass
        else:
            check_weight_indexes(cached)
            return cached
        raise ConfigError(f"{what} checkpoint '{path}' is neither a local directory nor in the local Hugging Face "
                          f"cache; fetch it first (`huggingface-cli download {path}`) or give a local directory")
    raise ConfigError(f"{what} checkpoint directory not found: '{path}' (give a local directory saved with "
                      "save_pretrained, or a hub id already downloaded)")
