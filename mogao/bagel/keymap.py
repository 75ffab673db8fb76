"""Every tensor of a BAGEL checkpoint and where it goes in a `MogaoModel`.

- `expected_ema_shapes`: the keys and shapes `ema.safetensors` must hold for a `BagelArchitecture` (BAGEL's
  module tree: bagel.py 57-94, qwen2_navit.py 381-398 / 687-705 / 943-959, siglip_navit.py 145-372).
- `key_mappings`: one `KeyMapping` per BAGEL tensor (ema and ae files): the MogaoModel parameter or buffer it
  becomes in a model built with given `ModelConfig` options (None where such a model has no place for it: with
  the default options, BAGEL's q/k norms, timestep MLP and position tables), the exact transform between the
  two, and the BAGEL feature (`features`) it needs. `to_mogao_state` / `from_mogao_state` apply it both ways,
  bit-exactly. With `features.bagel_model_options` every tensor has its place.

Three tensors change shape or order on the way, exactly (pure permutations and reshapes):
- the ViT patch embedding is a Linear over BAGEL's patchified pixels, features ordered (row, column, channel)
  (data_utils.py `patchify`, siglip_navit.py `convert_conv2d_to_linear`); mogao's SigLIP keeps the Conv2d;
- `vae2llm` / `llm2vae` act on latent tokens ordered (row, column, channel) (bagel.py 185-186); mogao's
  `patchify` orders a token (channel, row, column), so their columns / rows are permuted;
- the autoencoder's mid-block attention: 1x1 convs vs linear layers (`flux_ae`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from mogao.bagel.configs import BagelArchitecture
from mogao.bagel.features import BAGEL_FEATURES, MissingFeature, provides
from mogao.bagel.flux_ae import diffusers_key, expected_flux_shapes

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"
LLM = "language_model."
VIT = "vit_model.vision_model."
AE_PREFIX = "autoencoder.vae."  # where MogaoModel keeps a diffusers autoencoder

# transforms between a BAGEL tensor and its MogaoModel parameter
PATCH_LINEAR_TO_CONV = "patch_linear_to_conv"  # (out, p*p*c) ordered (p, q, c) <-> Conv2d (out, c, p, p)
TOKEN_FEATURES_IN = "token_features_in"  # vae2llm.weight: columns (p, q, c) <-> (c, p, q)
TOKEN_FEATURES_OUT = "token_features_out"  # llm2vae.weight rows and .bias: (p, q, c) <-> (c, p, q)
ATTENTION_CONV_TO_LINEAR = "attention_conv_to_linear"  # (C, C, 1, 1) <-> (C, C)


def expected_ema_shapes(arch: BagelArchitecture) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor `ema.safetensors` holds (BAGEL's whole model, FSDP `state_dict`)."""
    m, v, s = arch.llm, arch.vit, arch.settings
    h, kv = m.hidden_size, m.num_kv_heads * m.head_dim
    out: dict[str, tuple[int, ...]] = {f"{LLM}model.embed_tokens.weight": (m.vocab_size, h)}
    for n in range(m.num_layers):
        p = f"{LLM}model.layers.{n}."
        for suffix in ("", "_moe_gen"):
            out |= {f"{p}self_attn.q_proj{suffix}.weight": (h, h), f"{p}self_attn.q_proj{suffix}.bias": (h,),
                    f"{p}self_attn.k_proj{suffix}.weight": (kv, h), f"{p}self_attn.k_proj{suffix}.bias": (kv,),
                    f"{p}self_attn.v_proj{suffix}.weight": (kv, h), f"{p}self_attn.v_proj{suffix}.bias": (kv,),
                    f"{p}self_attn.o_proj{suffix}.weight": (h, h),
                    f"{p}self_attn.q_norm{suffix}.weight": (m.head_dim,),
                    f"{p}self_attn.k_norm{suffix}.weight": (m.head_dim,),
                    f"{p}mlp{suffix}.gate_proj.weight": (m.intermediate_size, h),
                    f"{p}mlp{suffix}.up_proj.weight": (m.intermediate_size, h),
                    f"{p}mlp{suffix}.down_proj.weight": (h, m.intermediate_size),
                    f"{p}input_layernorm{suffix}.weight": (h,),
                    f"{p}post_attention_layernorm{suffix}.weight": (h,)}
    out |= {f"{LLM}model.norm.weight": (h,), f"{LLM}model.norm_moe_gen.weight": (h,),
            f"{LLM}lm_head.weight": (m.vocab_size, h)}
    vh, pix = v.hidden_size, v.num_channels * v.patch_size**2
    out |= {f"{VIT}embeddings.patch_embedding.weight": (vh, pix), f"{VIT}embeddings.patch_embedding.bias": (vh,),
            f"{VIT}embeddings.position_embedding.weight": (v.positions_per_side**2, vh)}
    for n in range(v.layers):
        p = f"{VIT}encoder.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out |= {f"{p}self_attn.{name}.weight": (vh, vh), f"{p}self_attn.{name}.bias": (vh,)}
        out |= {f"{p}layer_norm1.weight": (vh,), f"{p}layer_norm1.bias": (vh,), f"{p}layer_norm2.weight": (vh,),
                f"{p}layer_norm2.bias": (vh,), f"{p}mlp.fc1.weight": (v.intermediate_size, vh),
                f"{p}mlp.fc1.bias": (v.intermediate_size,), f"{p}mlp.fc2.weight": (vh, v.intermediate_size),
                f"{p}mlp.fc2.bias": (vh,)}
    out |= {f"{VIT}post_layernorm.weight": (vh,), f"{VIT}post_layernorm.bias": (vh,),
            "connector.fc1.weight": (h, vh), "connector.fc1.bias": (h,), "connector.fc2.weight": (h, h),
            "connector.fc2.bias": (h,), "vit_pos_embed.pos_embed": (s.vit_max_num_patch_per_side**2, h),
            "time_embedder.mlp.0.weight": (h, 256), "time_embedder.mlp.0.bias": (h,),
            "time_embedder.mlp.2.weight": (h, h), "time_embedder.mlp.2.bias": (h,),
            "vae2llm.weight": (h, arch.token_dim), "vae2llm.bias": (h,),
            "llm2vae.weight": (arch.token_dim, h), "llm2vae.bias": (arch.token_dim,),
            "latent_pos_embed.pos_embed": (s.max_latent_size**2, h)}
    return out


@dataclass(frozen=True)
class KeyMapping:
    """Where one BAGEL tensor goes in a MogaoModel.

    file: the BAGEL file holding it (EMA_FILE or AE_FILE); bagel: its key there.
    mogao: the MogaoModel parameter or buffer (as `MogaoModel.state_dict` names it) holding the same numbers,
        or None where a model of the options asked for has none.
    transform: how the tensor changes between the two (None: unchanged); see the constants above.
    feature: the BAGEL feature (`features.BAGEL_FEATURES`, by name) the tensor needs: with mogao None, the
        feature (option) that would give it a place; with mogao set, one the model needs to USE the tensor as
        BAGEL does.
    proposed: the parameter name the tensor takes in a model with its feature, where that is a parameter
        (None: a frozen table - a buffer, `TABLES` - or no obvious place).
    """

    file: str
    bagel: str
    mogao: str | None
    transform: str | None = None
    feature: str | None = None
    proposed: str | None = None


_LAYER = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)")


def _llm_layer(n: str, rest: str) -> tuple[str | None, str | None, str | None]:
    """(mogao name, feature, proposed) of a key inside decoder layer n (`rest` after `layers.n.`)."""
    expert = "gen" if "_moe_gen" in rest else "und"
    plain = rest.replace("_moe_gen", "")
    target = f"backbone.layers.{n}.{expert}.{plain}"
    if re.fullmatch(r"self_attn\.[qk]_norm\.weight", plain):
        return None, "qk_norm", target
    return target, None, None


# the MogaoModel buffers BAGEL's frozen position tables become (`ModelConfig.latent_position_table` / ...)
TABLES = {"latent_pos_embed.pos_embed": "latent_position_table", "vit_pos_embed.pos_embed": "vit_position_table"}


def _ema_mapping(key: str) -> KeyMapping:
    def km(mogao, transform=None, feature=None, proposed=None):
        return KeyMapping(EMA_FILE, key, mogao, transform, feature, proposed)

    m = _LAYER.fullmatch(key)
    if m:
        target, feature, proposed = _llm_layer(m[1], m[2])
        return km(target, feature=feature, proposed=proposed)
    fixed = {f"{LLM}model.embed_tokens.weight": "backbone.embed_tokens.weight",
             f"{LLM}model.norm.weight": "backbone.norm.weight", f"{LLM}model.norm_moe_gen.weight": "backbone.gen_norm.weight",
             f"{LLM}lm_head.weight": "backbone.lm_head.weight"}
    if key in fixed:
        return km(fixed[key])
    if key == f"{VIT}embeddings.patch_embedding.weight":
        return km("vit.model.embeddings.patch_embedding.weight", PATCH_LINEAR_TO_CONV)
    if key == f"{VIT}embeddings.position_embedding.weight":
        return km("vit.model.embeddings.position_embedding.weight", feature="vit_navit_positions")
    if key.startswith(VIT):
        return km("vit.model." + key[len(VIT):])
    if key.startswith("connector."):
        return km(key)
    if key == "vit_pos_embed.pos_embed":
        return km(None, feature="vit_position_table")
    if key == "latent_pos_embed.pos_embed":
        return km(None, feature="latent_position_table")
    m = re.fullmatch(r"time_embedder\.mlp\.([02])\.(weight|bias)", key)
    if m:
        return km(None, feature="timestep_embedding", proposed=f"time_embed.mlp.linear_{1 if m[1] == '0' else 2}.{m[2]}")
    if key in ("vae2llm.weight", "vae2llm.bias"):
        return km("latent_proj.proj_in." + key.split(".")[1], TOKEN_FEATURES_IN if key.endswith("weight") else None)
    if key in ("llm2vae.weight", "llm2vae.bias"):
        return km("latent_proj.proj_out." + key.split(".")[1], TOKEN_FEATURES_OUT)
    raise KeyError(f"'{key}' is not a key of a BAGEL checkpoint")


def _placed(m: KeyMapping, features: dict[str, MissingFeature], options: Mapping[str, Any] | Any | None) -> KeyMapping:
    """`m` in a model built with `options`: a tensor without a place gets the one its feature gives, when the
    options provide the feature."""
    if m.mogao is not None or m.feature is None or not provides(features[m.feature], options):
        return m
    return replace(m, mogao=m.proposed if m.proposed is not None else TABLES[m.bagel])


def key_mappings(arch: BagelArchitecture, options: Mapping[str, Any] | Any | None = None) -> list[KeyMapping]:
    """One `KeyMapping` per tensor of `ema.safetensors` and `ae.safetensors`, in the files' expected order, for
    a MogaoModel built with `options` (`ModelConfig` fields as a mapping, or a ModelConfig; None: the defaults,
    which have no place for BAGEL's q/k norms, timestep MLP and position tables). With
    `features.bagel_model_options(arch)` every tensor has its place."""
    levels = arch.settings.autoencoder.levels
    by_name = {f.name: f for f in BAGEL_FEATURES}
    out = [_placed(_ema_mapping(k), by_name, options) for k in expected_ema_shapes(arch)]
    for k in expected_flux_shapes(arch.settings.autoencoder):
        name = diffusers_key(k, levels)
        attn = re.search(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", name)
        out.append(KeyMapping(AE_FILE, k, AE_PREFIX + name, ATTENTION_CONV_TO_LINEAR if attn else None))
    return out


# ---- the exact transforms -----------------------------------------------------------------------------------


def token_feature_permutation(channels: int, patch: int) -> torch.Tensor:
    """perm with mogao_feature[j] = bagel_feature[perm[j]] for one latent token: mogao orders a token's
    numbers (channel, row, column) (`mogao.model.autoencoder.patchify`), BAGEL (row, column, channel)."""
    c, p = channels, patch
    ci, pi, qi = torch.meshgrid(torch.arange(c), torch.arange(p), torch.arange(p), indexing="ij")
    return (pi * p * c + qi * c + ci).flatten()  # enumerated in mogao's (c, p, q) order


def patch_linear_to_conv(w: torch.Tensor, channels: int, patch: int) -> torch.Tensor:
    """BAGEL's linear patch embedding (out, p*p*c), inputs ordered (row, column, channel), as the Conv2d
    weight (out, c, p, p) computing the same embedding of the same image."""
    return w.reshape(w.shape[0], patch, patch, channels).permute(0, 3, 1, 2).contiguous()


def patch_conv_to_linear(w: torch.Tensor) -> torch.Tensor:
    """The inverse of `patch_linear_to_conv` (BAGEL's `convert_conv2d_to_linear`)."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()


def to_mogao_tensor(mapping: KeyMapping, t: torch.Tensor, arch: BagelArchitecture) -> torch.Tensor:
    """A BAGEL tensor as its MogaoModel parameter holds it."""
    tr = mapping.transform
    if tr == PATCH_LINEAR_TO_CONV:
        return patch_linear_to_conv(t, arch.vit.num_channels, arch.vit.patch_size)
    if tr in (TOKEN_FEATURES_IN, TOKEN_FEATURES_OUT):
        perm = token_feature_permutation(arch.latent_channels, arch.settings.latent_patch_size)
        return t[:, perm].contiguous() if tr == TOKEN_FEATURES_IN else t[perm].contiguous()
    if tr == ATTENTION_CONV_TO_LINEAR:
        return t.reshape(t.shape[0], t.shape[1])
    return t


def to_bagel_tensor(mapping: KeyMapping, t: torch.Tensor, arch: BagelArchitecture) -> torch.Tensor:
    """The inverse of `to_mogao_tensor`."""
    tr = mapping.transform
    if tr == PATCH_LINEAR_TO_CONV:
        return patch_conv_to_linear(t)
    if tr in (TOKEN_FEATURES_IN, TOKEN_FEATURES_OUT):
        inv = torch.argsort(token_feature_permutation(arch.latent_channels, arch.settings.latent_patch_size))
        return t[:, inv].contiguous() if tr == TOKEN_FEATURES_IN else t[inv].contiguous()
    if tr == ATTENTION_CONV_TO_LINEAR:
        return t.reshape(*t.shape, 1, 1)
    return t


@dataclass
class MogaoState:
    """A BAGEL checkpoint in MogaoModel terms: `state` (MogaoModel parameter or buffer -> tensor, autoencoder
    included) and `unmapped` (BAGEL ema key -> tensor, the tensors the model of the options asked for has no
    place for)."""

    state: dict[str, torch.Tensor]
    unmapped: dict[str, torch.Tensor]


def to_mogao_state(ema: dict[str, torch.Tensor], ae: dict[str, torch.Tensor], arch: BagelArchitecture,
                   options: Mapping[str, Any] | Any | None = None) -> MogaoState:
    """BAGEL's tensors (ema and ae files, checked) under the names of a MogaoModel built with `options`; see
    `key_mappings`."""
    state, unmapped = {}, {}
    for mp in key_mappings(arch, options):
        t = (ema if mp.file == EMA_FILE else ae)[mp.bagel]
        if mp.mogao is None:
            unmapped[mp.bagel] = t
        else:
            state[mp.mogao] = to_mogao_tensor(mp, t, arch)
    return MogaoState(state, unmapped)


def from_mogao_state(converted: MogaoState, arch: BagelArchitecture, options: Mapping[str, Any] | Any | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(ema tensors, ae tensors) under BAGEL's names: the exact inverse of `to_mogao_state` with the same
    `options`. KeyError naming the first tensor the state lacks."""
    ema, ae = {}, {}
    for mp in key_mappings(arch, options):
        src = converted.unmapped if mp.mogao is None else converted.state
        name = mp.bagel if mp.mogao is None else mp.mogao
        if name not in src:
            raise KeyError(f"the state has no '{name}' (BAGEL's '{mp.bagel}')")
        (ema if mp.file == EMA_FILE else ae)[mp.bagel] = to_bagel_tensor(mp, src[name], arch)
    return ema, ae

