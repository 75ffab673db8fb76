"""What a `MogaoModel` still lacks to compute what a BAGEL checkpoint computes, as data for an integrator.

`missing_features()` lists each missing model or sampling feature with the BAGEL tensors it involves (key
patterns, `{N}` a layer index) and the rule in `mogao.bagel.rules` that defines it; `key_mappings` points
its unmapped tensors at these by name. `mogao_model_settings()` gives the existing `ModelConfig` fields that
must take particular values for a BAGEL checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from mogao.bagel.configs import BagelArchitecture


@dataclass(frozen=True)
class MissingFeature:
    """One thing MogaoModel / ModelConfig / the sampler must gain.

    name: the id `KeyMapping.feature` uses. what: what to add, precisely. where: the part of mogao it touches.
    bagel_keys: the BAGEL tensors involved (patterns; empty for a behaviour without weights). source: the BAGEL
    code that defines it.
    """

    name: str
    what: str
    where: str
    bagel_keys: tuple[str, ...]
    source: str


_LAYER = "language_model.model.layers.{N}.self_attn."

MISSING_FEATURES: tuple[MissingFeature, ...] = (
    MissingFeature(
        "qk_norm",
        "per-head RMSNorm (weight of size head_dim, eps = rms_norm_eps) of queries and keys in BOTH experts, after "
        "the q/k projections and before RoPE, with q/k/v biases and no o_proj bias (Qwen2's attention plus "
        "Qwen3's q_norm/k_norm). MoTDecoderLayer already applies `self_attn.q_norm`/`k_norm` where the layer has "
        "them; what is missing is an LLM config that builds them on a Qwen2 attention (a Qwen3 config with "
        "attention_bias=True also adds an o_proj bias, which would have to stay zero).",
        "ModelConfig / the LLM built in mogao.model.io (backbone layers und and gen)",
        (_LAYER + "q_norm.weight", _LAYER + "k_norm.weight", _LAYER + "q_norm_moe_gen.weight",
         _LAYER + "k_norm_moe_gen.weight"),
        "qwen2_navit.py 381-398, 440-448; app.py 40",
    ),
    MissingFeature(
        "timestep_embedding",
        "BAGEL's timestep conditioning: e(t) = Linear(h, h)(SiLU(Linear(256, h)(rules.timestep_embedding(t)))) "
        "with t UNSCALED (mogao's TimestepEmbedder multiplies σ by 1000), added once to the input embedding of "
        "EVERY VAE token - noisy tokens at their t, clean VAE copies at t = 0. mogao's 'additive' option today "
        "feeds `time_embed`'s output into a second embedder (`additive_time`), so it cannot hold this one MLP; "
        "it needs a timestep-scale option (1.0) and additive conditioning that adds `time_embed(σ)` itself.",
        "mogao.model.timestep / MogaoModel.embed_inputs / ModelConfig",
        ("time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias", "time_embedder.mlp.2.weight",
         "time_embedder.mlp.2.bias"),
        "modeling_utils.py 74-110; bagel.py 191-196, 522-523, 802-803",
    ),
    MissingFeature(
        "latent_position_table",
        "add the frozen table rules.sincos_position_table(max_latent_size, hidden) (stored in the checkpoint) "
        "at rows rules.flattened_position_ids(gh, gw, max_latent_size) to every VAE token (clean and noisy), "
        "after `vae2llm`; mogao's `latent_position_embedding` adds a differently laid-out code (other "
        "frequencies and channel order) and must be off.",
        "MogaoModel.embed_latents / ModelConfig",
        ("latent_pos_embed.pos_embed",),
        "modeling_utils.py 24-66, 127-144; bagel.py 195-196, 439-444, 521-523",
    ),
    MissingFeature(
        "vit_position_table",
        "add the frozen table rules.sincos_position_table(vit_max_num_patch_per_side, hidden) at rows "
        "rules.flattened_position_ids(gh, gw, vit_max_num_patch_per_side) to the connector output of every "
        "ViT token.",
        "MogaoModel.embed_inputs (ViT path) / ModelConfig",
        ("vit_pos_embed.pos_embed",),
        "bagel.py 86, 176-179, 390-392",
    ),
    MissingFeature(
        "vit_navit_positions",
        "index the ViT's learned position embedding at row * vit_max_num_patch_per_side + column for any image "
        "size (the top-left part of the table, no interpolation; 70 = image_size / patch_size in BAGEL-7B-MoT); "
        "mogao's VisionEncoder interpolates it (HF `interpolate_pos_encoding`) for grids other than the native "
        "one, so only 980x980 inputs agree.",
        "mogao.model.vision.VisionEncoder",
        ("vit_model.vision_model.embeddings.position_embedding.weight",),
        "siglip_navit.py 184-195; bagel.py 319-323; data_utils.py 53-58",
    ),
    MissingFeature(
        "one_position_per_image",
        "a position scheme where every token of an image copy (markers included) takes ONE 1-D position, i.e. "
        "IL-RoPE positions (p, p, p), laid out by rules.position_ids (text +len, ViT/clean VAE copy +1, noisy "
        "copy +0); ModelConfig has no such scheme (DESIGN §2 asks for the scheme to be a named option).",
        "mogao.sequence / mogao.data plan lowering / ModelConfig",
        (),
        "dataset_base.py 349-458; bagel.py 340-343, 462-465, 592",
    ),
    MissingFeature(
        "bagel_sequence_format",
        "BAGEL's lowering: every text chunk [<|im_start|>] + text + [<|im_end|>] (rules.wrap_text); every "
        "image copy (noisy VAE, clean VAE, ViT - in that order) wrapped in ITS OWN <|vision_start|> ... "
        "<|vision_end|> (rules.wrap_image), the markers inside the copy's bidirectional block and routed to "
        "the understanding expert; mogao wraps all copies of an image in one marker pair, ordered noisy, ViT, "
        "clean VAE.",
        "mogao.data.plan",
        (),
        "dataset_base.py 316-458; interleave_t2i_dataset.py 36-86; bagel.py 232-264",
    ),
    MissingFeature(
        "bagel_guidance",
        "BAGEL's CFG branches and formula (rules.combine_cfg): the unconditional branches are 'without the last "
        "text' and 'without the condition images (text kept)', nested as image(text(v)), renorm 'global', "
        "'channel' or 'text_channel', applied only when text_scale > 1, and the interval lo < t <= hi on the "
        "shifted t (rules.cfg_applies); mogao's Guidance uses branches full / image-only / none, one global "
        "renorm and lo <= σ <= hi.",
        "mogao.inference.guidance",
        (),
        "bagel.py 693-746, 873-907; inferencer.py 242-282",
    ),
    MissingFeature(
        "vae_posterior_sample",
        "BAGEL encodes images with a SAMPLE of the autoencoder posterior (DiagonalGaussian(sample=True)), not "
        "its mean; DiffusersVAE has `sample_posterior`, but ModelConfig cannot set it.",
        "ModelConfig / mogao.model.io",
        (),
        "modeling/autoencoder.py 275-318",
    ),
)


def missing_features() -> tuple[MissingFeature, ...]:
    """The features MogaoModel / ModelConfig / the sampler lack for a BAGEL checkpoint (see MISSING_FEATURES)."""
    return MISSING_FEATURES


def mogao_model_settings(arch: BagelArchitecture) -> dict:
    """`ModelConfig` fields that exist today and must take these values for a BAGEL checkpoint (the
    component paths `llm`, `vit`, `autoencoder` are the integrator's)."""
    return {
        "latent_patch": arch.settings.latent_patch_size,
        "timestep_conditioning": "additive",  # BAGEL adds its timestep embedding; no AdaLN
        "text_sees_vae": True,  # BAGEL's text and ViT tokens attend to earlier clean VAE copies
        "vit_feature_layer": -1,  # with the ViT built `layers` deep (BagelArchitecture.mogao_vit_config)
        "latent_position_embedding": False,  # BAGEL's own table replaces it (feature latent_position_table)
        "prediction": "velocity",  # llm2vae predicts v = noise - x0
    }
