"""BAGEL's two JSON configs read as data: `llm_config.json` (a Qwen2 config with BAGEL's fields `qk_norm`,
`layer_module`, `freeze_und`) and `vit_config.json` (SigLIP), plus the settings BAGEL's loader hard-codes
(app.py 39-60) and no file records, into one `BagelArchitecture`.

Policy for fields from the folder: a field that would pick a class or run code (`auto_map`, a foreign
`model_type` or `architectures`, `quantization_config`, a hub `attn_implementation`, ...) is refused; the
architecture fields are read with types and bounds (an absurd size is refused before anything is allocated);
every other field is ignored and listed, never passed on. BAGEL's loader overrides three LLM fields and two
ViT fields (app.py 40-46): a folder may state them, but only with the value the loader forces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mogao.bagel.files import BagelFormatError
from mogao.bagel.flux_ae import FLUX, FluxAEConfig

# fields that choose code in transformers / BAGEL, refused wherever they appear at the top of a config
REFUSED_FIELDS = {
    "auto_map": "names Python classes to import from the folder",
    "trust_remote_code": "asks to run code from the folder",
    "custom_pipelines": "names pipeline classes to import",
    "quantization_config": "picks a quantizer (and its code)",
    "tokenizer_class": "picks a tokenizer class",
    "processor_class": "picks a processor class",
    "image_processor_type": "picks an image processor class",
    "feature_extractor_type": "picks a feature extractor class",
}
# attention implementations transformers builds in; any other value (e.g. a hub kernel repository) is refused
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flex_attention")
MOT_LAYER = "Qwen2MoTDecoderLayer"

_LIMITS = {  # inclusive upper bounds of the sizes read (far above any released model; they stop absurd sizes)
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
    "num_attention_heads": 1024, "num_key_value_heads": 1024, "max_position_embeddings": 1 << 24,
    "patch_size": 1024, "image_size": 1 << 16, "num_channels": 64,
}


def _int(cfg: dict, key: str, file: str, default: int | None = None) -> int:
    if key not in cfg:
        if default is None:
            raise BagelFormatError(file, f"lacks the field '{key}'")
        return default
    v = cfg[key]
    hi = _LIMITS[key]
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi:
        raise BagelFormatError(file, f"field '{key}' must be an integer in [1, {hi}], got {v!r}")
    return v


def _float(cfg: dict, key: str, file: str, default: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise BagelFormatError(file, f"field '{key}' must be a positive finite number, got {v!r}")
    return float(v)


def _pinned(cfg: dict, key: str, file: str, allowed: tuple, why: str) -> None:
    # same type as well as equal: JSON's 1 is not true
    if key in cfg and not any(type(cfg[key]) is type(a) and cfg[key] == a for a in allowed):
        raise BagelFormatError(file, f"field '{key}' is {cfg[key]!r}; {why} (allowed: "
                                     f"{', '.join(repr(a) for a in allowed)})")


def _common_checks(cfg: dict, file: str, model_type: str, architectures: tuple[str, ...]) -> None:
    for key, why in REFUSED_FIELDS.items():
        if key in cfg:
            raise BagelFormatError(file, f"has the field '{key}', which {why}; a BAGEL config is data only - "
                                         "remove the field if the folder is yours, or do not use this folder")
    _pinned(cfg, "model_type", file, (model_type,), "it would choose the model class")
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)
                              or not set(archs) <= set(architectures)):
        raise BagelFormatError(file, f"field 'architectures' is {archs!r}; it would choose the model class "
                                     f"(allowed: {list(architectures)})")
    for key in ("_attn_implementation", "attn_implementation"):
        _pinned(cfg, key, file, ATTN_IMPLEMENTATIONS, "it would choose the attention code")


@dataclass(frozen=True)
class LLMShape:
    """The language model of a BAGEL checkpoint (Qwen2 with BAGEL's MoT layers)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        """hidden_size / num_heads: BAGEL's Qwen2Attention ignores any `head_dim` field."""
        return self.hidden_size // self.num_heads


_LLM_READ = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act",
             "tie_word_embeddings", "qk_norm", "layer_module", "freeze_und", "is_causal", "use_sliding_window",
             "rope_scaling", "model_type", "architectures", "_attn_implementation", "attn_implementation"}


def parse_llm_config(cfg: dict, file: str = "llm_config.json") -> tuple[LLMShape, list[str]]:
    """The `LLMShape` of a BAGEL `llm_config.json` and the fields it ignores.

    BAGEL's loader forces qk_norm = True, tie_word_embeddings = False and layer_module = Qwen2MoTDecoderLayer
    (app.py 40-42); the file may state these only with those values. `freeze_und` is a training switch and
    `is_causal` must be true. RoPE scaling and sliding windows are refused (BAGEL-7B-MoT uses neither).
    """
    _common_checks(cfg, file, "qwen2", ("Qwen2ForCausalLM",))
    _pinned(cfg, "qk_norm", file, (True,), "BAGEL's loader always builds q/k norms")
    _pinned(cfg, "tie_word_embeddings", file, (False,), "BAGEL's loader unties the LM head")
    _pinned(cfg, "layer_module", file, (MOT_LAYER,), "it picks BAGEL's decoder layer class; only the MoT layer "
                                                     "BAGEL-7B-MoT is published with is supported")
    _pinned(cfg, "is_causal", file, (True,), "BAGEL's language model is causal")
    _pinned(cfg, "use_sliding_window", file, (False,), "sliding-window attention is not supported")
    _pinned(cfg, "rope_scaling", file, (None,), "RoPE scaling is not supported")
    _pinned(cfg, "hidden_act", file, ("silu",), "Qwen2's MLP uses SiLU")
    if "freeze_und" in cfg and not isinstance(cfg["freeze_und"], bool):
        raise BagelFormatError(file, f"field 'freeze_und' must be true or false, got {cfg['freeze_und']!r}")
    heads = _int(cfg, "num_attention_heads", file)
    shape = LLMShape(
        vocab_size=_int(cfg, "vocab_size", file), hidden_size=_int(cfg, "hidden_size", file),
        intermediate_size=_int(cfg, "intermediate_size", file), num_layers=_int(cfg, "num_hidden_layers", file),
        num_heads=heads, num_kv_heads=_int(cfg, "num_key_value_heads", file, heads),
        rms_norm_eps=_float(cfg, "rms_norm_eps", file, 1e-6), rope_theta=_float(cfg, "rope_theta", file, 10000.0),
        max_position_embeddings=_int(cfg, "max_position_embeddings", file, 32768),
    )
    if shape.hidden_size % heads or heads % shape.num_kv_heads or shape.head_dim % 2:
        raise BagelFormatError(file, f"hidden_size {shape.hidden_size}, num_attention_heads {heads} and "
                                     f"num_key_value_heads {shape.num_kv_heads} do not make whole (even) heads")
    return shape, sorted(k for k in cfg if k not in _LLM_READ)


@dataclass(frozen=True)
class ViTShape:
    """The SigLIP ViT of a BAGEL checkpoint. `config_layers` is the depth `vit_config.json` states (the
    pretrained SigLIP's); the checkpoint holds `layers` = config_layers - 1, BAGEL dropping the last layer to
    use the penultimate one's output (app.py 46; pretrain_unified_navit.py 493 with vit_select_layer = -2),
    then the post LayerNorm."""

    hidden_size: int
    intermediate_size: int
    config_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    num_channels: int
    layer_norm_eps: float

    @property
    def layers(self) -> int:
        return self.config_layers - 1

    @property
    def positions_per_side(self) -> int:
        """Side of the ViT's own position-embedding grid (image_size / patch_size: 70 for BAGEL)."""
        return self.image_size // self.patch_size


_VIT_READ = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size",
             "image_size", "num_channels", "layer_norm_eps", "hidden_act", "rope", "model_type", "architectures",
             "_attn_implementation", "attn_implementation", "attention_dropout"}


def parse_vit_config(cfg: dict, file: str = "vit_config.json") -> tuple[ViTShape, list[str]]:
    """The `ViTShape` of a BAGEL `vit_config.json` and the fields it ignores. BAGEL's loader forces
    rope = False (app.py 45): the ViT uses its learned position embedding."""
    _common_checks(cfg, file, "siglip_vision_model", ("SiglipVisionModel",))
    _pinned(cfg, "rope", file, (False,), "BAGEL's loader builds the ViT without 2-D RoPE")
    _pinned(cfg, "hidden_act", file, ("gelu_pytorch_tanh",), "SigLIP uses tanh-approximated GELU")
    heads = _int(cfg, "num_attention_heads", file)
    shape = ViTShape(
        hidden_size=_int(cfg, "hidden_size", file), intermediate_size=_int(cfg, "intermediate_size", file),
        config_layers=_int(cfg, "num_hidden_layers", file), num_heads=heads, patch_size=_int(cfg, "patch_size", file),
        image_size=_int(cfg, "image_size", file), num_channels=_int(cfg, "num_channels", file, 3),
        layer_norm_eps=_float(cfg, "layer_norm_eps", file, 1e-6),
    )
    if shape.config_layers < 2:
        raise BagelFormatError(file, "field 'num_hidden_layers' must be at least 2 (the checkpoint holds one "
                                     "layer fewer than the config states)")
    if shape.hidden_size % heads or shape.image_size % shape.patch_size:
        raise BagelFormatError(file, f"hidden_size {shape.hidden_size} is not a multiple of num_attention_heads "
                                     f"{heads}, or image_size {shape.image_size} of patch_size {shape.patch_size}")
    return shape, sorted(k for k in cfg if k not in _VIT_READ)


@dataclass(frozen=True)
class BagelSettings:
    """What BAGEL's loader hard-codes (app.py 50-60) and no file of the folder records; the defaults are
    BAGEL-7B-MoT's. A folder whose tensors disagree is refused, naming the setting to change.

    Attributes:
        latent_patch_size: side of the latent patch one VAE token holds (2).
        max_latent_size: side of the latent position table `latent_pos_embed` (64: up to 1024 px at /16).
        vit_max_num_patch_per_side: side of the ViT position table `vit_pos_embed` (70).
        connector_act: activation between the connector's two linear layers.
        autoencoder: sizes of the FLUX autoencoder in `ae.safetensors`.
    """

    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    autoencoder: FluxAEConfig = field(default_factory=lambda: FLUX)


@dataclass(frozen=True)
class BagelArchitecture:
    """Everything the tensor shapes of a BAGEL folder follow from."""

    llm: LLMShape
    vit: ViTShape
    settings: BagelSettings = field(default_factory=BagelSettings)

    @property
    def latent_channels(self) -> int:
        return self.settings.autoencoder.latent_channels

    @property
    def token_dim(self) -> int:
        """Numbers per VAE token: latent_patch_size^2 * latent channels (64 for BAGEL)."""
        return self.settings.latent_patch_size**2 * self.latent_channels

    def mogao_llm_config(self) -> dict:
        """`transformers.Qwen2Config` fields of the understanding expert's LLM (untied head; BAGEL's q/k norms,
        which a Qwen2 config cannot express, come from `ModelConfig.qk_norm`)."""
        m = self.llm
        return {"model_type": "qwen2", "vocab_size": m.vocab_size, "hidden_size": m.hidden_size,
                "intermediate_size": m.intermediate_size, "num_hidden_layers": m.num_layers,
                "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads, "hidden_act": "silu",
                "rms_norm_eps": m.rms_norm_eps, "max_position_embeddings": m.max_position_embeddings,
                "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
                "tie_word_embeddings": False, "use_sliding_window": False}

    def mogao_vit_config(self) -> dict:
        """`transformers.SiglipVisionConfig` fields of the ViT as the checkpoint holds it: `layers` deep, to be
        used with mogao's `vit_feature_layer = -1` (the last kept layer, then the post LayerNorm - exactly what
        BAGEL computes), and no attention-pooling head."""
        v = self.vit
        return {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size, "num_hidden_layers": v.layers,
                "num_attention_heads": v.num_heads, "patch_size": v.patch_size, "image_size": v.image_size,
                "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
                "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False}

    def mogao_autoencoder_config(self) -> dict:
        """`diffusers.AutoencoderKL` config of the FLUX autoencoder."""
        return self.settings.autoencoder.diffusers_config()


def bagel_7b_mot_configs() -> tuple[dict, dict]:
    """(llm_config.json, vit_config.json) of BAGEL-7B-MoT as published: the architecture fields of Qwen2.5-7B
    (`mogao.model.known`) with BAGEL's own fields, and SigLIP-so400m's with BAGEL's image size (980 px: 70
    positions a side, `BagelSettings.vit_max_num_patch_per_side`). Used to build the model without its folder
    (`load.random_bagel_model`: memory and speed measurements) and by `benchmarks/bagel_memory.py`."""
    from mogao.model.known import KNOWN_LLMS, KNOWN_VITS

    qwen = KNOWN_LLMS["Qwen/Qwen2.5-7B-Instruct"]
    llm = {"architectures": ["Qwen2ForCausalLM"], **{k: v for k, v in qwen.items() if k != "attention_dropout"},
           "use_sliding_window": False, "is_causal": True, "qk_norm": True, "layer_module": MOT_LAYER,
           "freeze_und": False}
    settings = BagelSettings()
    so400m = KNOWN_VITS["google/siglip-so400m-patch14-384"]
    vit = {"model_type": "siglip_vision_model", **so400m,
           "image_size": settings.vit_max_num_patch_per_side * so400m["patch_size"], "num_channels": 3,
           "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
    return llm, vit


def bagel_7b_mot() -> BagelArchitecture:
    """The `BagelArchitecture` of BAGEL-7B-MoT (`bagel_7b_mot_configs` read as a folder's configs are read)."""
    llm, vit = bagel_7b_mot_configs()
    return BagelArchitecture(parse_llm_config(llm)[0], parse_vit_config(vit)[0], BagelSettings())
