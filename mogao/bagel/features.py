"""BAGEL's features, where a `MogaoModel` has them (a `ModelConfig` option) and what it still lacks, as data.

`BAGEL_FEATURES` lists every model or sampling feature a BAGEL checkpoint needs beyond what a MogaoModel does
with its default options, with the BAGEL tensors it involves (key patterns, `{N}` a layer index), the rule in
`mogao.bagel.rules` that defines it and the `ModelConfig` fields that provide it (`option`) - or, for a way of
sampling, the sampler's option that does (`sampling`); `MISSING_FEATURES` are those nothing provides yet. `missing_features(options)` gives what a model built with some options
lacks; `key_mappings` points BAGEL tensors at these features by name. `mogao_model_settings()` and
`bagel_model_options()` give the `ModelConfig` values a BAGEL checkpoint needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mogao.bagel.configs import BagelArchitecture


@dataclass(frozen=True)
class MissingFeature:
    """One thing a MogaoModel needs to compute what BAGEL computes.

    name: the id `KeyMapping.feature` uses. what: what it is, precisely (and the option giving it). where: the
    part of mogao it touches. bagel_keys: the BAGEL tensors involved (patterns; empty for a behaviour without
    weights). source: the BAGEL code that defines it. option: the `ModelConfig` fields that provide it, at the
    values `bagel_model_options` / `mogao_model_settings` give (empty: no model option provides it). sampling:
    the sampler's option that provides a way of sampling (any model has it; empty: none).
    """

    name: str
    what: str
    where: str
    bagel_keys: tuple[str, ...]
    source: str
    option: tuple[str, ...] = ()
    sampling: str = ""


_LAYER = "language_model.model.layers.{N}.self_attn."

BAGEL_FEATURES: tuple[MissingFeature, ...] = (
    MissingFeature(
        "qk_norm",
        "per-head RMSNorm (weight of size head_dim, eps = rms_norm_eps) of queries and keys in BOTH experts, after "
        "the q/k projections and before RoPE, with q/k/v biases and no o_proj bias (Qwen2's attention plus "
        "Qwen3's q_norm/k_norm): `ModelConfig.qk_norm` adds Qwen2 RMSNorms `self_attn.q_norm`/`k_norm` to "
        "every layer of the Qwen2 LLM before the generation expert is copied (`backbone.add_qk_norms`); "
        "`MoTDecoderLayer._qkv` applies them.",
        "mogao.model.backbone (layers und and gen) / ModelConfig.qk_norm",
        (_LAYER + "q_norm.weight", _LAYER + "k_norm.weight", _LAYER + "q_norm_moe_gen.weight",
         _LAYER + "k_norm_moe_gen.weight"),
        "qwen2_navit.py 381-398, 440-448; app.py 40",
        ("qk_norm",),
    ),
    MissingFeature(
        "timestep_embedding",
        "BAGEL's timestep conditioning: e(t) = Linear(h, h)(SiLU(Linear(256, h)(rules.timestep_embedding(t)))) "
        "with t UNSCALED (mogao's TimestepEmbedder multiplies σ by 1000), added once to the input embedding of "
        "EVERY VAE token - noisy tokens at their t, clean VAE copies at t = 0 (mogao's σ is BAGEL's t). "
        "`ModelConfig.timestep_embedding = 'bagel'` (with timestep_conditioning 'additive') makes `time_embed` "
        "a TimestepEmbedder of scale 1 (diffusers' Timesteps(256, flip_sin_to_cos) is this sinusoid) and "
        "`MogaoModel.embed_inputs` adds its output to every VAE token; no `additive_time` is built.",
        "mogao.model.timestep / MogaoModel.embed_inputs / ModelConfig.timestep_embedding",
        ("time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias", "time_embedder.mlp.2.weight",
         "time_embedder.mlp.2.bias"),
        "modeling_utils.py 74-110; bagel.py 191-196, 522-523, 802-803",
        ("timestep_conditioning", "timestep_embedding"),
    ),
    MissingFeature(
        "latent_position_table",
        "add the frozen table rules.sincos_position_table(max_latent_size, hidden) (stored in the checkpoint) "
        "at rows rules.flattened_position_ids(gh, gw, max_latent_size) to every VAE token (clean and noisy), "
        "after `vae2llm`; mogao's `latent_position_embedding` adds a differently laid-out code (other "
        "frequencies and channel order) and must be off. `ModelConfig.latent_position_table = max_latent_size` "
        "gives MogaoModel the frozen buffer `latent_position_table`, added in `embed_latents` at each token's "
        "(row, column) = its IL-RoPE (H, W).",
        "MogaoModel.embed_latents / ModelConfig.latent_position_table",
        ("latent_pos_embed.pos_embed",),
        "modeling_utils.py 24-66, 127-144; bagel.py 195-196, 439-444, 521-523",
        ("latent_position_table",),
    ),
    MissingFeature(
        "vit_position_table",
        "add the frozen table rules.sincos_position_table(vit_max_num_patch_per_side, hidden) at rows "
        "rules.flattened_position_ids(gh, gw, vit_max_num_patch_per_side) to the connector output of every "
        "ViT token: `ModelConfig.vit_position_table = vit_max_num_patch_per_side` gives MogaoModel the frozen "
        "buffer `vit_position_table`, added in `embed_vit` (cells from each image's token grid).",
        "MogaoModel.embed_vit / ModelConfig.vit_position_table",
        ("vit_pos_embed.pos_embed",),
        "bagel.py 86, 176-179, 390-392",
        ("vit_position_table",),
    ),
    MissingFeature(
        "vit_navit_positions",
        "index the ViT's learned position embedding at row * vit_max_num_patch_per_side + column for any image "
        "size (the top-left part of the table, no interpolation; 70 = image_size / patch_size in BAGEL-7B-MoT); "
        "mogao's VisionEncoder interpolates it (HF `interpolate_pos_encoding`) for grids other than the native "
        "one unless `ModelConfig.vit_positions = 'navit'` (VisionEncoder._navit_features; the native side must "
        "be vit_max_num_patch_per_side).",
        "mogao.model.vision.VisionEncoder / ModelConfig.vit_positions",
        ("vit_model.vision_model.embeddings.position_embedding.weight",),
        "siglip_navit.py 184-195; bagel.py 319-323; data_utils.py 53-58",
        ("vit_positions",),
    ),
    MissingFeature(
        "one_position_per_image",
        "a position scheme where every token of an image copy (markers included) takes ONE 1-D position, i.e. "
        "positions (p, p, p), laid out by rules.position_ids (text +len, ViT/clean VAE copy +1, noisy copy +0): "
        "`ModelConfig.positions = 'bagel'` (`mogao.sequence.positions.bagel_positions`, used by the lowering "
        "and the KV cache). The position code and tables then read each VAE token's (row, column) from the "
        "batch's `grid_cells` (`SequenceInputs.grid_cells`), not from its positions.",
        "mogao.sequence.positions / mogao.data.plan / mogao.inference.cache / ModelConfig.positions",
        (),
        "dataset_base.py 349-458; bagel.py 340-343, 462-465, 592",
        ("positions",),
    ),
    MissingFeature(
        "bagel_sequence_format",
        "BAGEL's lowering: every text chunk [<|im_start|>] + text + [<|im_end|>] (rules.wrap_text); every "
        "image copy (noisy VAE, clean VAE, ViT - in that order) wrapped in ITS OWN <|vision_start|> ... "
        "<|vision_end|> (rules.wrap_image), the markers inside the copy's bidirectional block and routed to "
        "the understanding expert: `ModelConfig.sequence_format = 'bagel'` (`mogao.sequence.formats`; the "
        "lowering of mogao.data.plan and the generation loop follow it).",
        "mogao.sequence.formats / mogao.data.plan / mogao.inference.session / ModelConfig.sequence_format",
        (),
        "dataset_base.py 316-458; interleave_t2i_dataset.py 36-86; bagel.py 232-264",
        ("sequence_format",),
    ),
    MissingFeature(
        "bagel_guidance",
        "BAGEL's CFG branches and formula (rules.combine_cfg): the unconditional branches are 'without the last "
        "text' and 'without the condition images (text kept)', nested as image(text(v)), renorm 'global', "
        "'channel' or 'text_channel', applied only when text_scale > 1, and the interval lo < t <= hi on the "
        "shifted t (rules.cfg_applies): `Guidance(mode='bagel', renorm_type=...)` (`mogao generate "
        "--cfg-mode bagel --cfg-renorm-type ...`), a way of sampling any model has.",
        "mogao.inference.guidance / mogao.inference.session",
        (),
        "bagel.py 693-746, 873-907; inferencer.py 226-282",
        sampling="Guidance.mode = 'bagel'",
    ),
    MissingFeature(
        "vae_posterior_sample",
        "BAGEL encodes images with a SAMPLE of the autoencoder posterior (DiagonalGaussian(sample=True)), not "
        "its mean: `ModelConfig.vae_sample_posterior` sets DiffusersVAE's `sample_posterior`; in training each "
        "image's draw comes from its own seed (`DiffusersVAE.encode(seeds=...)`).",
        "mogao.model.autoencoder.DiffusersVAE / ModelConfig.vae_sample_posterior",
        (),
        "modeling/autoencoder.py 275-318",
        ("vae_sample_posterior",),
    ),
)


MISSING_FEATURES: tuple[MissingFeature, ...] = tuple(f for f in BAGEL_FEATURES if not f.option and not f.sampling)
"""What MogaoModel lacks for a BAGEL checkpoint whatever its options: nothing, now that the position scheme, the
sequence format (model options) and the guidance (a sampling option) are there."""

# the values BAGEL needs of the option fields that do not depend on the checkpoint's sizes
_BAGEL_VALUES: dict[str, Any] = {"qk_norm": True, "timestep_conditioning": "additive", "timestep_embedding": "bagel",
                                 "vit_positions": "navit", "vae_sample_posterior": True, "positions": "bagel",
                                 "sequence_format": "bagel"}
_TABLE_SIDES = ("latent_position_table", "vit_position_table")  # set to the checkpoint's side (not None)


def _value(options: Any, name: str) -> Any:
    return options.get(name) if isinstance(options, Mapping) else getattr(options, name, None)


def provides(feature: MissingFeature, options: Mapping[str, Any] | Any | None) -> bool:
    """Whether a MogaoModel built with `options` (`ModelConfig` fields as a mapping, or a ModelConfig) has
    `feature`: every field of `feature.option` at BAGEL's value (a table side: set). None: the defaults. A way
    of sampling (`feature.sampling`) is the sampler's option: every model has it."""
    if feature.sampling:
        return True
    if options is None or not feature.option:
        return False
    return all(_value(options, f) is not None if f in _TABLE_SIDES else _value(options, f) == _BAGEL_VALUES[f]
               for f in feature.option)


def missing_features(options: Mapping[str, Any] | Any | None = None) -> tuple[MissingFeature, ...]:
    """The features a MogaoModel built with `options` (`ModelConfig` fields, or a ModelConfig; None: the
    defaults, which provide no model option) lacks for a BAGEL checkpoint; with `bagel_model_options`,
    `MISSING_FEATURES`."""
    return tuple(f for f in BAGEL_FEATURES if not provides(f, options))


def mogao_model_settings(arch: BagelArchitecture) -> dict:
    """`ModelConfig` fields that exist for any mogao model and must take these values for a BAGEL checkpoint
    (the component paths `llm`, `vit`, `autoencoder` are the integrator's; BAGEL's own options are
    `bagel_model_options`)."""
    return {
        "latent_patch": arch.settings.latent_patch_size,
        "timestep_conditioning": "additive",  # BAGEL adds its timestep embedding; no AdaLN
        "text_sees_vae": True,  # BAGEL's text and ViT tokens attend to earlier clean VAE copies
        "vit_feature_layer": -1,  # with the ViT built `layers` deep (BagelArchitecture.mogao_vit_config)
        "latent_position_embedding": False,  # BAGEL's own table replaces it (latent_position_table)
        "prediction": "velocity",  # llm2vae predicts v = noise - x0
    }


def bagel_model_options(arch: BagelArchitecture) -> dict:
    """The `ModelConfig` options that give a MogaoModel BAGEL's features (with `mogao_model_settings`: every
    tensor of the checkpoint has its place, `keymap.key_mappings(arch, options)`)."""
    s = arch.settings
    return {"qk_norm": True, "timestep_embedding": "bagel", "latent_position_table": s.max_latent_size,
            "vit_position_table": s.vit_max_num_patch_per_side, "vit_positions": "navit",
            "vae_sample_posterior": True, "positions": "bagel", "sequence_format": "bagel"}
