"""A BAGEL folder as a working `MogaoModel`, and a MogaoModel written back as a BAGEL folder.

    load_bagel_model(folder)              the folder checked (`folder.check_bagel_folder`), the model built on the
                                          meta device from its configs with BAGEL's options
                                          (`features.mogao_model_settings` + `bagel_model_options`), then every
                                          tensor of ema.safetensors and ae.safetensors assigned to its place
                                          (`keymap.to_mogao_state`): none missing, none left over
    save_bagel_model(model, tok, out)     the inverse (`keymap.from_mogao_state`, `folder.write_bagel_folder`): a
                                          folder BAGEL's loader reads; a model read with `load_bagel_model` and
                                          written unchanged gives the same files, byte for byte

The autoencoder is the FLUX autoencoder of `ae.safetensors` as a diffusers AutoencoderKL (`flux_ae`) in mogao's
`DiffusersVAE`, whose latent normalisation (z - shift_factor) * scaling_factor with FLUX's factors is BAGEL's.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mogao.bagel.configs import (
    MOT_LAYER,
    BagelArchitecture,
    BagelSettings,
    parse_llm_config,
    parse_vit_config,
)
from mogao.bagel.features import bagel_model_options, missing_features, mogao_model_settings
from mogao.bagel.files import BagelFormatError, parse_json
from mogao.bagel.flux_ae import FluxAEConfig, flux_autoencoder
from mogao.bagel.folder import (
    CARRIED_FILES,
    CODE_FIELDS,
    LLM_CONFIG,
    TOKENIZER_FILE,
    VIT_CONFIG,
    BagelCheckpoint,
    check_bagel_folder,
    load_bagel_folder,
    load_bagel_tokenizer,
    tokenizer_from_files,
    write_bagel_folder,
)
from mogao.bagel.keymap import MogaoState, from_mogao_state, to_mogao_state
from mogao.errors import ConfigError
from mogao.model.autoencoder import DiffusersVAE
from mogao.model.config import ModelConfig
from mogao.model.io import empty_parameters
from mogao.model.mogao import MogaoModel
from mogao.model.vision import VisionEncoder


@dataclass
class BagelSource:
    """What a model read from a BAGEL folder keeps of the folder beyond its tensors, to write it back as it was:
    the settings, the two configs (as dicts and as the bytes read), the tokenizer and carried files, and the
    weight files' safetensors metadata. `load_bagel_model` sets it as the model's `bagel_source`."""

    settings: BagelSettings
    llm_config: dict
    vit_config: dict
    config_bytes: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    ema_metadata: dict[str, str] | None = None
    ae_metadata: dict[str, str] | None = None


def bagel_model_config(arch: BagelArchitecture, folder: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a BAGEL checkpoint: `mogao_model_settings` and `bagel_model_options` of its
    architecture. The component paths name the folder; `load_model(config)` cannot read a BAGEL folder as
    components - load it with `load_bagel_model`, or `save_pretrained` the model and `load_model` that."""
    path = str(folder)
    return ModelConfig(llm=path, vit=path, autoencoder=path, **mogao_model_settings(arch), **bagel_model_options(arch))


def _check_supported(arch: BagelArchitecture, where: Path) -> None:
    s = arch.settings
    if s.vit_max_num_patch_per_side != arch.vit.positions_per_side:
        raise BagelFormatError(where, f"vit_max_num_patch_per_side {s.vit_max_num_patch_per_side} differs from the "
                                      f"ViT's position grid ({arch.vit.positions_per_side} = image_size / "
                                      "patch_size); mogao's NaViT indexing uses the ViT's own grid")
    if s.connector_act != "gelu_pytorch_tanh":
        raise BagelFormatError(where, f"connector_act '{s.connector_act}': mogao's connector uses tanh-GELU only")


def build_bagel_model(arch: BagelArchitecture, cfg: ModelConfig) -> MogaoModel:
    """The MogaoModel of `arch` with its parameters on the meta device (buffers computed): a Qwen2 LLM of
    `arch.mogao_llm_config()`, the SigLIP of `mogao_vit_config()`, the FLUX autoencoder in a `DiffusersVAE`."""
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig

    with empty_parameters():
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**arch.mogao_llm_config()),
                                               trust_remote_code=False)
        vit = VisionEncoder.from_config(SiglipVisionConfig(**arch.mogao_vit_config()),
                                        feature_layer=cfg.vit_feature_layer)
        vae = DiffusersVAE(flux_autoencoder(arch.settings.autoencoder, meta=True))
        return MogaoModel(cfg, llm, vit, vae)


def _assign(model: MogaoModel, state: dict[str, torch.Tensor], where: Path) -> None:
    """Every tensor of the model's state dict from `state` (assigned: no copy), every key used; otherwise a
    BagelFormatError naming the keys."""
    own = model.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} (the model's is {tuple(own[k].shape)})" for k in sorted(set(own) & set(state))
             if tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or wrong:
        raise BagelFormatError(where, "does not fill the model exactly: " + "; ".join(
            w for w in (f"no value for {', '.join(missing[:5])}" if missing else "",
                        f"no place for {', '.join(extra[:5])}" if extra else "",
                        f"wrong shapes {'; '.join(wrong[:5])}" if wrong else "") if w))
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise BagelFormatError(where, f"left {', '.join(left[:5])} of the model without a value")


def load_bagel_model(folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                     settings: BagelSettings | None = None,
                     overrides: dict[str, Any] | None = None) -> tuple[MogaoModel, Any]:
    """(MogaoModel, tokenizer) of a BAGEL folder (e.g. BAGEL-7B-MoT), in training mode as built.

    The folder is checked before any tensor is read (BagelFormatError naming the file and keys otherwise); the
    model is built on the meta device with `bagel_model_config`'s options and takes the files' tensors as they
    are (no second copy; transformed where the layouts differ, `keymap`). dtype: cast the whole model (None: the
    files' dtypes - BAGEL's are bfloat16 for the model, float32 for the autoencoder). settings: what BAGEL's
    loader hard-codes (default: BAGEL-7B-MoT's). The model keeps the folder's configs and tokenizer files as
    `bagel_source`, for `save_bagel_model`. overrides: runtime `ModelConfig` fields to set (as `load_model`
    takes them: `attention`, `text_sees_vae`, `timestep_sampling`).
    """
    where = Path(folder)
    _check_supported(check_bagel_folder(where, settings).arch, where)  # (headers only: before any tensor is read)
    ckpt = load_bagel_folder(where, settings)
    arch = ckpt.arch
    cfg = _config(arch, where, overrides)
    model = build_bagel_model(arch, cfg)
    converted = to_mogao_state(ckpt.ema, ckpt.ae, arch, cfg)
    if converted.unmapped:  # (every BAGEL feature with tensors is an option set above)
        raise BagelFormatError(where, f"tensors without a place in the model: {', '.join(sorted(converted.unmapped))}")
    _assign(model, converted.state, where)
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    model.source_path = str(where)
    model.bagel_source = BagelSource(arch.settings, ckpt.llm_config, ckpt.vit_config, dict(ckpt.config_bytes),
                                     dict(ckpt.files), ckpt.ema_metadata, ckpt.ae_metadata)
    return model, load_bagel_tokenizer(where)


def _config(arch: BagelArchitecture, where: Path, overrides: dict[str, Any] | None) -> ModelConfig:
    cfg = bagel_model_config(arch, where)
    if overrides:
        from dataclasses import replace

        cfg = replace(cfg, **overrides)
    return cfg


def meta_bagel_model(folder: str | os.PathLike, settings: BagelSettings | None = None,
                     overrides: dict[str, Any] | None = None) -> tuple[MogaoModel, Any]:
    """(MogaoModel of a BAGEL folder with its parameters on the meta device, the folder's `BagelFolderInfo`):
    the model `load_bagel_model` gives, with every check it makes, its `source_path` and `bagel_source`, but no
    tensor read - the configs, tokenizer files and weight headers only. `mogao.training.shard_load` fills it
    (`plan_bagel_weights`, `load_weights`: each process only the rows of its own shards), in float32."""
    from mogao.bagel.folder import folder_files

    where = Path(folder)
    info = check_bagel_folder(where, settings)
    _check_supported(info.arch, where)
    model = build_bagel_model(info.arch, _config(info.arch, where, overrides))
    files, configs = folder_files(info)
    model.source_path = str(where)
    model.bagel_source = BagelSource(info.arch.settings, info.llm_config, info.vit_config, configs, files,
                                     info.ema_metadata, info.ae_metadata)
    return model, info


def random_bagel_model(arch: BagelArchitecture, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.bfloat16, overrides: dict[str, Any] | None = None,
                       folder: str | os.PathLike = "-", seed: int = 0) -> MogaoModel:
    """The MogaoModel of `arch` with random weights made on `device`, without a folder: built on the meta
    device (`build_bagel_model`), given memory on `device` in the dtypes `load_bagel_model` gives a folder's
    tensors (`dtype` - BAGEL's files hold bfloat16 - and float32 for the autoencoder; the position tables keep
    their computed values in `dtype`), then filled there:
    normalisation weights 1, biases 0, every other parameter normal with standard deviation 1 / sqrt(fan-in)
    (activations keep their scale at any width), from a generator seeded with `seed`. For measuring memory and
    speed at full size where the weights are not at hand. `folder` only names
    the model (`bagel_model_config`, `source_path`); overrides: as `load_bagel_model` takes them."""
    from torch import nn

    from mogao.model.io import allocate

    model = build_bagel_model(arch, _config(arch, Path(folder), overrides))
    for name, p in model.named_parameters():  # (on the meta device: the dtype costs nothing yet)
        p.data = p.data.to(torch.float32 if name.startswith("autoencoder.") else dtype)
    allocate(model, device)
    saved = set(model.state_dict())  # the buffers a folder's files fill (position tables) take their dtype too
    for name, b in list(model.named_buffers()):
        if name in saved and b.is_floating_point() and not name.startswith("autoencoder."):
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b.to(dtype)
    gen = torch.Generator(device=torch.device(device)).manual_seed(seed)
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, norms) or type(module).__name__.endswith("RMSNorm")
            for name, p in module.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    p.fill_(1.0)
                elif name == "bias":
                    p.zero_()
                else:
                    fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                    p.normal_(0.0, fan_in**-0.5, generator=gen)
    model.source_path = str(folder)
    return model


def load_any_model(source: str | os.PathLike, overrides: dict[str, Any] | None = None) -> MogaoModel:
    """A saved mogao model folder (`mogao.model.io.load_model`) or a published BAGEL folder (`load_bagel_model`,
    told apart by `folder.is_bagel_folder`): what `--ckpt`, `init_from` and `lora merge` read."""
    from mogao.bagel.folder import is_bagel_folder
    from mogao.model.io import load_model

    if is_bagel_folder(source):
        return load_bagel_model(Path(source).expanduser(), overrides=overrides)[0]
    return load_model(source, overrides=overrides)


# ---- writing ---------------------------------------------------------------------------------------------


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"the LLM uses RoPE type '{params.get('rope_type')}'; a BAGEL folder has plain RoPE")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _llm_config(model: MogaoModel) -> dict:
    """A BAGEL `llm_config.json` for the model's LLM (the fields BAGEL's loader reads, with its forced values)."""
    c = model.backbone.config
    if getattr(c, "model_type", None) != "qwen2":
        raise ConfigError(f"a BAGEL folder holds a Qwen2 LLM; this model's is '{getattr(c, 'model_type', None)}'")
    heads = int(c.num_attention_heads)
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "vocab_size": int(model.backbone.embed_tokens.num_embeddings), "hidden_size": int(c.hidden_size),
            "intermediate_size": int(c.intermediate_size), "num_hidden_layers": len(model.backbone.layers),
            "num_attention_heads": heads, "num_key_value_heads": int(getattr(c, "num_key_value_heads", None) or heads),
            "hidden_act": "silu", "max_position_embeddings": int(c.max_position_embeddings),
            "rms_norm_eps": float(c.rms_norm_eps), "rope_theta": _rope_theta(c), "tie_word_embeddings": False,
            "use_sliding_window": False, "is_causal": True, "qk_norm": True, "layer_module": MOT_LAYER,
            "freeze_und": False}


def _vit_config(model: MogaoModel) -> dict:
    """A BAGEL `vit_config.json` for the model's ViT: one layer deeper than the model holds (BAGEL's loader
    drops the last layer of what its config states)."""
    c = model.vit.config
    return {"model_type": "siglip_vision_model", "hidden_size": int(c.hidden_size),
            "intermediate_size": int(c.intermediate_size), "num_hidden_layers": len(model.vit.model.encoder.layers) + 1,
            "num_attention_heads": int(c.num_attention_heads), "patch_size": int(c.patch_size),
            "image_size": int(c.image_size), "num_channels": int(c.num_channels),
            "layer_norm_eps": float(c.layer_norm_eps), "hidden_act": "gelu_pytorch_tanh", "attention_dropout": 0.0}


def _settings(model: MogaoModel) -> BagelSettings:
    cfg = model.cfg
    vae = model.autoencoder
    if not isinstance(vae, DiffusersVAE):
        raise ConfigError("a BAGEL folder holds a FLUX autoencoder; this model has no diffusers VAE")
    c = vae.config
    ae = FluxAEConfig(block_out_channels=tuple(c.block_out_channels), layers_per_block=int(c.layers_per_block),
                      latent_channels=int(c.latent_channels), norm_num_groups=int(c.norm_num_groups),
                      in_channels=int(c.in_channels), out_channels=int(c.out_channels))
    flux = ae.diffusers_config()
    if any(dict(c).get(k) != flux[k] for k in ("shift_factor", "scaling_factor", "latents_mean", "latents_std")):
        raise ConfigError("the model's VAE does not normalise latents with FLUX's scale and shift: BAGEL would "
                          "read other latents")
    return BagelSettings(latent_patch_size=cfg.latent_patch, max_latent_size=cfg.latent_position_table,
                         vit_max_num_patch_per_side=cfg.vit_position_table, autoencoder=ae)


def _check_bagel_features(model: MogaoModel) -> None:
    """ConfigError naming the BAGEL features (options) `model` was built without."""
    lacking = [f"{f.name} ({', '.join(f.option)})" for f in missing_features(model.cfg) if f.option]
    if lacking:
        raise ConfigError(f"the model lacks BAGEL's {'; '.join(lacking)}: a BAGEL folder cannot hold it "
                          "(`features.bagel_model_options` gives the options a BAGEL model is built with)")


def _check_bagel_settings(model: MogaoModel, arch: BagelArchitecture) -> None:
    """ConfigError naming the `ModelConfig` fields of `model` that differ from what BAGEL computes with."""
    wrong = {k: v for k, v in mogao_model_settings(arch).items() if getattr(model.cfg, k) != v}
    if wrong:
        raise ConfigError(f"the model differs from BAGEL in {', '.join(f'{k} (BAGEL: {v!r})' for k, v in wrong.items())}"
                          ": BAGEL would compute something else with these weights")


def _architecture(llm_config: dict, vit_config: dict, settings: BagelSettings, where: Path) -> BagelArchitecture:
    llm, _ = parse_llm_config(llm_config, str(where / LLM_CONFIG))
    vit, _ = parse_vit_config(vit_config, str(where / VIT_CONFIG))
    return BagelArchitecture(llm, vit, settings)


def _tokenizer_files(tokenizer: Any, source: BagelSource | None) -> dict[str, bytes]:
    """The tokenizer files to write: the source folder's, verbatim, when `tokenizer` is the one they hold (or
    None); else those `tokenizer.save_pretrained` writes that a BAGEL folder carries."""
    if source is not None and TOKENIZER_FILE in source.files:
        if tokenizer is None:
            return dict(source.files)
        theirs = tokenizer_from_files(source.files)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if (backend is not None and backend.to_str() == theirs.backend_tokenizer.to_str()
                and tokenizer.special_tokens_map == theirs.special_tokens_map):
            return dict(source.files)
    if tokenizer is None:
        raise ConfigError("a BAGEL folder needs its tokenizer: pass the model's tokenizer")
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ConfigError(f"a BAGEL folder holds a tokenizers file (tokenizer.json); {type(tokenizer).__name__} is "
                          "not a fast tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {n: (Path(tmp) / n).read_bytes() for n in (TOKENIZER_FILE, *CARRIED_FILES) if (Path(tmp) / n).is_file()}
    for name, data in files.items():  # (a BAGEL folder with one of these is refused when read)
        if name.endswith(".json") and any(k in parse_json(data, name) for k in CODE_FIELDS):
            raise ConfigError(f"the tokenizer writes {name} with a field that names code ({', '.join(CODE_FIELDS)})")
    return files


def save_bagel_model(model: MogaoModel, tokenizer: Any, out: str | os.PathLike, *,
                     dtype: torch.dtype | None = None) -> Path:
    """Write `model` (a MogaoModel with BAGEL's options) and `tokenizer` as a BAGEL folder at `out` (new or
    empty; written beside it and renamed into place). Tensors go back to BAGEL's names and layouts
    (`keymap.from_mogao_state`); configs and tokenizer files are those of the folder the model was read from
    (`bagel_source`) when they still describe it, generated from the model otherwise. dtype: cast the model's
    tensors (not the autoencoder's) to it (None: as the model holds them).

    ConfigError when the model lacks a BAGEL option (`features.bagel_model_options`) or setting, or has no FLUX
    autoencoder; BagelFormatError when a tensor does not fit the folder's shapes.
    """
    _check_bagel_features(model)
    where = Path(out)
    settings = _settings(model)
    llm_config, vit_config = _llm_config(model), _vit_config(model)
    arch = _architecture(llm_config, vit_config, settings, where)
    _check_bagel_settings(model, arch)
    source: BagelSource | None = getattr(model, "bagel_source", None)
    config_bytes: dict[str, bytes] = {}
    ema_meta = ae_meta = None
    if source is not None:
        try:
            same = _architecture(source.llm_config, source.vit_config, settings, where) == arch
        except BagelFormatError:
            same = False
        if same:
            llm_config, vit_config, config_bytes = source.llm_config, source.vit_config, source.config_bytes
            ema_meta, ae_meta = source.ema_metadata, source.ae_metadata
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ema, ae = from_mogao_state(MogaoState(state, {}), arch, model.cfg)
    if dtype is not None:
        ema = {k: v.to(dtype) for k, v in ema.items()}
    ckpt = BagelCheckpoint(arch, llm_config, vit_config, ema, ae, _tokenizer_files(tokenizer, source), ema_meta,
                           ae_meta, config_bytes)
    return write_bagel_folder(where, ckpt)
