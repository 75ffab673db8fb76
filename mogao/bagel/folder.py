"""A BAGEL model folder as ByteDance Seed publishes it (BAGEL-7B-MoT), read and written without trusting it:

    llm_config.json     Qwen2 config with BAGEL's fields          (`configs.parse_llm_config`)
    vit_config.json     SigLIP config, one layer deeper than the checkpoint   (`configs.parse_vit_config`)
    ema.safetensors     the whole model                            (`keymap.expected_ema_shapes`)
    ae.safetensors      the FLUX autoencoder, original layout      (`flux_ae`)
    tokenizer.json      Qwen2.5's tokenizer (with tokenizer_config.json, vocab.json, merges.txt, ...)

JSON and safetensors only (nothing is unpickled); fields that would pick a class or run code are refused; file
names are fixed and a file that leads out of the folder is refused; every tensor key and shape is checked
against what the configs imply, from the headers, before any tensor is allocated (`check_bagel_folder`).
What is read can be written back (`write_bagel_folder`): tensors bit for bit, tokenizer files verbatim.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mogao.bagel import rules
from mogao.bagel.configs import BagelArchitecture, BagelSettings, parse_llm_config, parse_vit_config
from mogao.bagel.files import (
    MAX_CONFIG_BYTES,
    MAX_TOKENIZER_BYTES,
    BagelFormatError,
    TensorInfo,
    check_tensors,
    file_inside,
    load_tensors,
    parse_json,
    read_bytes,
    read_header,
    read_json,
)
from mogao.bagel.flux_ae import expected_flux_shapes
from mogao.bagel.keymap import AE_FILE, EMA_FILE, expected_ema_shapes

LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
TOKENIZER_FILE = "tokenizer.json"
# copied through verbatim when present (the JSON ones checked first); any other file of the folder is ignored
CARRIED_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                 "merges.txt", "generation_config.json", "config.json", "preprocessor_config.json")
# fields that make transformers import code, refused in every JSON file of the folder
CODE_FIELDS = ("auto_map", "trust_remote_code", "custom_pipelines")


@dataclass
class BagelFolderInfo:
    """What `check_bagel_folder` learnt without reading a tensor.

    arch: the architecture the configs and settings give. llm_config, vit_config: the JSON as read.
    ema, ae: tensor key -> `TensorInfo` of the two weight files (checked); ema_metadata, ae_metadata: their
    safetensors metadata. tokens: BAGEL's special token ids. ignored_fields: per config file, the fields read
    and not used. carried_files: the optional files present; ignored_files: the other names in the folder.
    """

    path: Path
    arch: BagelArchitecture
    llm_config: dict
    vit_config: dict
    ema: dict[str, TensorInfo]
    ae: dict[str, TensorInfo]
    ema_metadata: dict[str, str] | None
    ae_metadata: dict[str, str] | None
    tokens: rules.BagelTokens
    ignored_fields: dict[str, list[str]]
    carried_files: tuple[str, ...]
    ignored_files: tuple[str, ...]


def _architecture(llm_config: dict, vit_config: dict, settings: BagelSettings, where: Path) -> tuple[
        BagelArchitecture, dict[str, list[str]]]:
    llm, ignored_llm = parse_llm_config(llm_config, str(where / LLM_CONFIG))
    vit, ignored_vit = parse_vit_config(vit_config, str(where / VIT_CONFIG))
    return BagelArchitecture(llm, vit, settings), {LLM_CONFIG: ignored_llm, VIT_CONFIG: ignored_vit}


def _settings_hint(arch: BagelArchitecture) -> str:
    s = arch.settings
    return (f"the configs and settings (latent_patch_size={s.latent_patch_size}, max_latent_size="
            f"{s.max_latent_size}, vit_max_num_patch_per_side={s.vit_max_num_patch_per_side}, autoencoder "
            f"latent channels {s.autoencoder.latent_channels}) describe other shapes; if the folder is a BAGEL "
            "variant, pass matching BagelSettings")


def _check_code_fields(cfg: dict, where: Path) -> None:
    for key in CODE_FIELDS:
        if key in cfg:
            raise BagelFormatError(where, f"has the field '{key}', which would make transformers import code; "
                                          "refusing the folder")


def _tokenizer(data: bytes, config: dict | None, where: Path):
    """A `transformers` fast tokenizer built from tokenizer.json by a fixed class (nothing in the folder
    chooses it); only the four standard special-token fields of tokenizer_config.json are used."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
        raise BagelFormatError(where, f"is not a tokenizers file ({type(e).__name__}: {str(e)[:200]})") from e
    special = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        v = (config or {}).get(key)
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            special[key] = v
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def _side(shape: tuple[int, ...] | None, what: str, where: Path) -> int | None:
    if shape is None:
        return None
    side = int(round(shape[0] ** 0.5))
    if side * side != shape[0]:
        raise BagelFormatError(where, f"{what} has {shape[0]} rows, not a square number (side x side)")
    return side


def infer_settings(path: str | os.PathLike) -> BagelSettings:
    """The `BagelSettings` a folder's weight headers record (nothing else is read): the position tables' sides
    (`latent_pos_embed`, `vit_pos_embed`: rows = side x side), the latent patch (`vae2llm` reads latent
    channels x patch x patch features) and the FLUX autoencoder's channels, blocks and latent channels (from
    `ae.safetensors`). What no weight records keeps BAGEL-7B-MoT's value: the connector's activation and the
    autoencoder's 32 norm groups (channels not divisible by 32 use the largest divisor of 32 that divides them).
    A folder whose headers lack a tensor falls back to the default for that setting; `check_bagel_folder` then
    names what is missing."""
    import dataclasses

    from mogao.bagel.flux_ae import FluxAEConfig

    folder = Path(path)
    default = BagelSettings()
    ema, _ = read_header(file_inside(folder, EMA_FILE))
    ae, _ = read_header(file_inside(folder, AE_FILE))
    shape = {k: v.shape for k, v in {**ema, **{"ae." + k: v for k, v in ae.items()}}.items()}.get
    latent_side = _side(shape("latent_pos_embed.pos_embed"), "latent_pos_embed.pos_embed", folder)
    vit_side = _side(shape("vit_pos_embed.pos_embed"), "vit_pos_embed.pos_embed", folder)
    ae_cfg = default.autoencoder
    conv_out = shape("ae.encoder.conv_out.weight")
    levels = sorted({int(k.split(".")[2]) for k in ae if k.startswith("encoder.down.") and k.split(".")[2].isdigit()})
    blocks = {int(k.split(".")[4]) for k in ae if k.startswith("encoder.down.0.block.") and k.split(".")[4].isdigit()}
    if conv_out is not None and levels and levels == list(range(len(levels))) and blocks:
        channels = []
        for i in levels:
            w = shape(f"ae.encoder.down.{i}.block.0.conv2.weight")
            if w is None:
                break
            channels.append(int(w[0]))
        if len(channels) == len(levels):
            groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))
            ae_cfg = FluxAEConfig(block_out_channels=tuple(channels), layers_per_block=max(blocks) + 1,
                                  latent_channels=int(conv_out[0]) // 2, norm_num_groups=groups)
    patch = default.latent_patch_size
    proj = shape("vae2llm.weight")
    if proj is not None and len(proj) == 2:
        p = int(round((proj[1] / ae_cfg.latent_channels) ** 0.5))
        if p >= 1 and p * p * ae_cfg.latent_channels == proj[1]:
            patch = p
    return dataclasses.replace(default, latent_patch_size=patch,
                               max_latent_size=latent_side or default.max_latent_size,
                               vit_max_num_patch_per_side=vit_side or default.vit_max_num_patch_per_side,
                               autoencoder=ae_cfg)


def check_bagel_folder(path: str | os.PathLike, settings: BagelSettings | None = None) -> BagelFolderInfo:
    """Read and check a BAGEL folder's configs, tokenizer and weight headers, allocating no tensor.

    BagelFormatError (a ConfigError) naming the file and the field or keys at fault: a missing file, a file
    outside the folder, a field that picks code, a size out of bounds, and every missing, unexpected or wrongly
    shaped tensor. `settings` are what BAGEL's loader hard-codes (default: what the weight headers record,
    `infer_settings`, BAGEL-7B-MoT's where they record nothing).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise BagelFormatError(folder, "is not a folder")
    settings = settings or infer_settings(folder)
    llm_config = read_json(file_inside(folder, LLM_CONFIG))
    vit_config = read_json(file_inside(folder, VIT_CONFIG))
    arch, ignored = _architecture(llm_config, vit_config, settings, folder)

    carried = tuple(n for n in CARRIED_FILES if (folder / n).exists() or (folder / n).is_symlink())
    tok_config = None
    for name in carried:
        p = file_inside(folder, name)
        if name.endswith(".json"):
            cfg = parse_json(read_bytes(p, MAX_TOKENIZER_BYTES), p)
            _check_code_fields(cfg, p)
            tok_config = cfg if name == "tokenizer_config.json" else tok_config
    tok_path = file_inside(folder, TOKENIZER_FILE)
    tokenizer = _tokenizer(read_bytes(tok_path, MAX_TOKENIZER_BYTES), tok_config, tok_path)
    tokens = rules.special_token_ids(tokenizer)
    too_big = {k: v for k, v in vars(tokens).items() if v >= arch.llm.vocab_size}
    if too_big:
        raise BagelFormatError(tok_path, f"special token id(s) {too_big} are beyond the model's vocabulary "
                                         f"({arch.llm.vocab_size} rows): a tokenizer of another model?")

    ema_path, ae_path = file_inside(folder, EMA_FILE), file_inside(folder, AE_FILE)
    ema, ema_meta = read_header(ema_path)
    check_tensors(ema_path, ema, expected_ema_shapes(arch), hint=_settings_hint(arch))
    ae, ae_meta = read_header(ae_path)
    ae_cfg = settings.autoencoder
    check_tensors(ae_path, ae, expected_flux_shapes(ae_cfg),
                  hint=f"not a FLUX autoencoder of channels {ae_cfg.block_out_channels} with "
                       f"{ae_cfg.latent_channels} latent channels in Black Forest Labs' layout")
    known = {LLM_CONFIG, VIT_CONFIG, EMA_FILE, AE_FILE, TOKENIZER_FILE, *carried}
    others = tuple(sorted(p.name for p in folder.iterdir() if p.name not in known))
    return BagelFolderInfo(folder, arch, llm_config, vit_config, ema, ae, ema_meta, ae_meta, tokens, ignored,
                           carried, others)


@dataclass
class BagelCheckpoint:
    """The contents of a BAGEL folder: configs (as JSON dicts), tensors under BAGEL's names (`ema`) and in
    the original FLUX layout (`ae`), and the tokenizer and other carried files as bytes.
    `keymap.to_mogao_state(ckpt.ema, ckpt.ae, ckpt.arch)` gives them MogaoModel's names. `config_bytes`: the
    two config files as read, written back verbatim where they still hold `llm_config` / `vit_config`."""

    arch: BagelArchitecture
    llm_config: dict
    vit_config: dict
    ema: dict[str, torch.Tensor]
    ae: dict[str, torch.Tensor]
    files: dict[str, bytes] = field(default_factory=dict)
    ema_metadata: dict[str, str] | None = None
    ae_metadata: dict[str, str] | None = None
    config_bytes: dict[str, bytes] = field(default_factory=dict)


def folder_files(info: BagelFolderInfo) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(tokenizer and carried files, the two config files) of a checked folder, as bytes: all of it but the
    weights."""
    folder = info.path
    files = {n: read_bytes(file_inside(folder, n), MAX_TOKENIZER_BYTES) for n in (TOKENIZER_FILE, *info.carried_files)}
    configs = {n: read_bytes(file_inside(folder, n), MAX_CONFIG_BYTES) for n in (LLM_CONFIG, VIT_CONFIG)}
    return files, configs


def load_bagel_folder(path: str | os.PathLike, settings: BagelSettings | None = None) -> BagelCheckpoint:
    """`check_bagel_folder`, then the tensors (in the files' dtypes) and the tokenizer files."""
    info = check_bagel_folder(path, settings)
    folder = info.path
    files, configs = folder_files(info)
    return BagelCheckpoint(info.arch, info.llm_config, info.vit_config,
                           load_tensors(file_inside(folder, EMA_FILE), info.ema),
                           load_tensors(file_inside(folder, AE_FILE), info.ae), files,
                           info.ema_metadata, info.ae_metadata, configs)


def is_bagel_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is laid out as a published BAGEL folder (`llm_config.json` and `ema.safetensors`, no
    mogao `mogao_config.json`): what `load.load_any_model` dispatches on. Nothing is read."""
    d = Path(path).expanduser()
    return d.is_dir() and (d / LLM_CONFIG).is_file() and (d / EMA_FILE).is_file() and not (d / "mogao_config.json").exists()


def load_bagel_tokenizer(path: str | os.PathLike):
    """The tokenizer of a BAGEL folder (a `transformers` fast tokenizer of a fixed class, see `_tokenizer`)."""
    folder = Path(path)
    cfg_path = folder / "tokenizer_config.json"
    cfg = None
    if cfg_path.exists():
        p = file_inside(folder, cfg_path.name)
        cfg = parse_json(read_bytes(p, MAX_TOKENIZER_BYTES), p)
        _check_code_fields(cfg, p)
    tok_path = file_inside(folder, TOKENIZER_FILE)
    return _tokenizer(read_bytes(tok_path, MAX_TOKENIZER_BYTES), cfg, tok_path)


def tokenizer_from_files(files: dict[str, bytes], where: str | os.PathLike = "tokenizer") -> Any:
    """The tokenizer `load_bagel_tokenizer` builds, from a folder's files as bytes (`BagelCheckpoint.files`)."""
    cfg = None
    if "tokenizer_config.json" in files:
        cfg = parse_json(files["tokenizer_config.json"], Path(where) / "tokenizer_config.json")
        _check_code_fields(cfg, Path(where) / "tokenizer_config.json")
    return _tokenizer(files[TOKENIZER_FILE], cfg, Path(where) / TOKENIZER_FILE)


def _infos(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    return {k: TensorInfo(tuple(t.shape), names.get(t.dtype, str(t.dtype))) for k, t in tensors.items()}


def _same_json(raw: bytes, cfg: dict) -> bool:
    """Whether `raw` holds exactly `cfg` (types included: JSON's 1 is not true, nor 1.0)."""
    try:
        return json.dumps(parse_json(raw, "config"), sort_keys=True) == json.dumps(cfg, sort_keys=True)
    except (BagelFormatError, TypeError, ValueError):
        return False


def write_bagel_folder(directory: str | os.PathLike, ckpt: BagelCheckpoint) -> Path:
    """Write `ckpt` as a BAGEL folder that `load_bagel_folder` reads back to the same tensors (bit for bit) and
    BAGEL's own loader reads as it reads the published one. The configs must describe `ckpt.arch` and every
    tensor must have its expected key and shape (checked before writing). `directory` must not exist or be
    empty; the folder is written beside it and renamed into place, so a kill leaves nothing half-written."""
    final = Path(directory)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise BagelFormatError(final, "exists and is not an empty folder; choose a new folder")
    arch, _ = _architecture(ckpt.llm_config, ckpt.vit_config, ckpt.arch.settings, final)
    if arch != ckpt.arch:
        raise BagelFormatError(final, "the checkpoint's configs describe another architecture than its `arch`")
    check_tensors(final / EMA_FILE, _infos(ckpt.ema), expected_ema_shapes(arch))
    check_tensors(final / AE_FILE, _infos(ckpt.ae), expected_flux_shapes(arch.settings.autoencoder))
    bad = sorted(set(ckpt.files) - {TOKENIZER_FILE, *CARRIED_FILES})
    if bad or TOKENIZER_FILE not in ckpt.files:
        raise BagelFormatError(final, f"files must hold {TOKENIZER_FILE} and only the carried files "
                                      f"({', '.join(CARRIED_FILES)}); got {sorted(ckpt.files)}")
    from safetensors.torch import save_file

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        for name, cfg in ((LLM_CONFIG, ckpt.llm_config), (VIT_CONFIG, ckpt.vit_config)):
            raw = ckpt.config_bytes.get(name)
            if raw is not None and _same_json(raw, cfg):
                (tmp / name).write_bytes(raw)
            else:
                (tmp / name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        save_file({k: t.detach().cpu().contiguous() for k, t in ckpt.ema.items()}, str(tmp / EMA_FILE),
                  metadata=ckpt.ema_metadata)
        save_file({k: t.detach().cpu().contiguous() for k, t in ckpt.ae.items()}, str(tmp / AE_FILE),
                  metadata=ckpt.ae_metadata)
        for name, data in ckpt.files.items():
            (tmp / name).write_bytes(data)
        if final.is_dir():
            final.rmdir()  # empty (checked above)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
