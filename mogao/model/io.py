"""Model I/O: saved model folders (written as one unit, with the user's umask, never over a foreign folder),
training checkpoints read without running code, and `load_model`, the one way a `MogaoModel` is built:

    load_model(ModelConfig(...))          from the pretrained components it names (LLM, ViT, autoencoder)
    load_model("runs/x/model")            a saved model folder (`save_pretrained`: config + safetensors)
    load_model("runs/x/checkpoints/last.ckpt")   a training checkpoint (a file, or a sharded folder) written
                                          with a mogao sharding strategy, which records the architecture
    load_model(record)                    an architecture record (`architecture_record`, `model_architecture`)
                                          alone, randomly initialised
    load_model(..., meta=True)            the same model with its parameters on the meta device: configs are
                                          read, weights never
"""

from __future__ import annotations

import contextlib
import copy
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mogao.errors import ConfigError, printable
from mogao.model.checkpoint_files import (
    SHARDED_INDEX,
    SHARDED_META,
    CheckpointError,
    StrPath,
    check_checkpoint,
    load_checkpoint_file,
    read_json_config,
)
from mogao.model.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig, architecture_record, resolve_checkpoint
from mogao.model.config import model_architecture as model_architecture  # (the record load_model reads)

if TYPE_CHECKING:
    from mogao.model.mogao import MogaoModel

ARCHITECTURE_KEY = "mogao_architecture"  # in a training checkpoint: the architecture `load_model` rebuilds

TEMP_SUFFIX = ".tmp"  # a file or folder being written (renamed into place when complete)


def fsync_directory(directory: str | Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# files a saved model or adapter folder holds: a folder with one of them was written by this project
SAVED_FOLDER_MARKERS = (CONFIG_NAME, "adapter_config.json")


def current_umask() -> int:
    """The process's file mode creation mask (read without changing it where /proc allows)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(directory: str | Path) -> None:
    """Give every file under `directory` (and the folders) the mode a plain `open` would have given it:
    some writers (safetensors) create their files 0600 whatever the umask, which hides them from the group."""
    mask = current_umask()
    root = Path(directory)
    for d, subdirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                os.chmod(Path(d, name), 0o666 & ~mask)
        for name in subdirs:
            with contextlib.suppress(OSError):
                os.chmod(Path(d, name), 0o777 & ~mask)
    with contextlib.suppress(OSError):
        os.chmod(root, 0o777 & ~mask)


def write_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a saved model / adapter folder as one unit: `write(tmp)` fills a temporary sibling folder, whose
    files then get the user's umask, and the folder is renamed onto `directory` (a previous save there is
    replaced, then removed). A kill leaves the previous folder or the new one, never a mix of both.

    `directory` must be new, empty, or a folder this project saved a model or adapter to (it holds one of
    `SAVED_FOLDER_MARKERS`); ConfigError naming it otherwise, so that no other folder is replaced.
    """
    final = Path(directory).expanduser()
    if final.exists() and not final.is_dir():
        raise ConfigError(f"'{final}' is a file, not a folder to save a model to")
    replace = final.is_dir() and any(final.iterdir())
    if replace and not any((final / m).is_file() for m in SAVED_FOLDER_MARKERS):
        raise ConfigError(f"'{final}' already holds files and is not a folder this project saved a model or "
                          "adapter to; choose a new or empty folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.with_name(f".{final.name}.{tag}{TEMP_SUFFIX}")
    tmp.mkdir()
    try:
        write(tmp)
        honour_umask(tmp)
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.is_dir():
            old = final.with_name(f".{final.name}.{tag}.old")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(final.parent)
    return final


def save_model_directory(model: Any, tokenizer: Any, directory: str | Path,
                         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """`model.save_pretrained` (with `state_dict`, see `MogaoModel.save_pretrained`) and, when given,
    `tokenizer.save_pretrained` into `directory` as one unit (`write_directory`)."""

    def write(d: Path) -> None:
        if state_dict is None:
            model.save_pretrained(d)
        else:
            model.save_pretrained(d, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(d)

    return write_directory(directory, write)


# ---- building and loading models ---------------------------------------------------------------------------


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(directory: StrPath) -> Any:
    """The `transformers` tokenizer saved in `directory`; ConfigError when there is none. Code the folder
    holds is never run, nor asked about (`trust_remote_code=False`): a folder that needs its own code to load
    is a ConfigError."""
    from transformers import AutoTokenizer

    d = Path(directory)
    if not d.is_dir() or not any((d / f).is_file() for f in _TOKENIZER_FILES):
        raise ConfigError(f"no tokenizer in '{d}' (expected {' or '.join(_TOKENIZER_FILES)}); save the tokenizer "
                          "next to the model (`tokenizer.save_pretrained(dir)`) or pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(d, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a broken tokenizer directory
        raise ConfigError(f"could not load the tokenizer in '{d}' ({type(e).__name__}: {e}); save it again "
                          "with `tokenizer.save_pretrained(dir)` or pass --tokenizer DIR") from e


def _auto_map_at(config: Any, path: str) -> str | None:
    """Where in `config` (a JSON-like value) an `auto_map` entry is - what asks `transformers` to import code
    named by the file - or None."""
    if isinstance(config, Mapping):
        for k, v in config.items():
            if k == "auto_map":
                return f"{path}.auto_map"
            found = _auto_map_at(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(config, list):
        for i, v in enumerate(config):
            found = _auto_map_at(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _record_parts(record: Any, overrides: Mapping[str, Any], where: str) -> tuple[ModelConfig, dict, dict, dict | None]:
    """(config with `overrides`, LLM, ViT and autoencoder configs) of an architecture record; ConfigError
    naming `where` when it is not one, or when a part's config holds an `auto_map` (code to import: a saved
    record never does, `architecture_record` leaves it out). The LLM config holds the final vocabulary
    (`vocab_size` is dropped)."""
    try:
        if not isinstance(record, Mapping):
            raise TypeError(f"a {type(record).__name__}, not a mapping")
        cfg = ModelConfig.from_dict({**record["model"], "vocab_size": None, **overrides})
        parts = (dict(record["llm_config"]), dict(record["vit_config"]), record["autoencoder_config"])
        if parts[2] is not None:
            parts = (parts[0], parts[1], dict(parts[2]))
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise ConfigError(f"'{where}' is not a valid mogao config ({type(e).__name__}: {printable(e)})") from e
    for name, part in zip(("llm_config", "vit_config", "autoencoder_config"), parts):
        found = _auto_map_at(part, name)
        if found:
            raise ConfigError(f"'{where}' holds {printable(found)}, which asks to import code the folder "
                              "names; a model folder may not choose code to run: refusing it")
    return (cfg, *parts)


def _saved_record(directory: Path) -> dict[str, Any]:
    """The architecture record of a saved model folder (its `mogao_config.json`), the folder checked first."""
    if not (directory / CONFIG_NAME).is_file():
        raise ConfigError(f"'{directory}' is not a saved mogao model: {CONFIG_NAME} missing")
    if not (directory / WEIGHTS_NAME).is_file():
        raise ConfigError(f"'{directory}' has {CONFIG_NAME} but no {WEIGHTS_NAME}: an incomplete save?")
    return read_json_config(directory / CONFIG_NAME, "a mogao config")


def _parts_record(cfg: ModelConfig, dtype: torch.dtype | None) -> dict[str, Any]:
    """The architecture record of the model `cfg`'s pretrained components make, from their config files only
    (the LLM config with the grown vocabulary)."""
    from transformers import AutoConfig, SiglipVisionConfig

    llm_dir = resolve_checkpoint(cfg.llm, "LLM")
    llm_config = AutoConfig.from_pretrained(llm_dir, trust_remote_code=False).to_dict()
    llm_config["dtype"] = str(dtype or torch.float32).removeprefix("torch.")  # as the components are loaded
    if cfg.vocab_size is not None and cfg.vocab_size > int(llm_config["vocab_size"]):
        llm_config["vocab_size"] = int(cfg.vocab_size)
    vit_config = SiglipVisionConfig.from_pretrained(resolve_checkpoint(cfg.vit, "ViT")).to_dict()
    ae_config = None
    if cfg.autoencoder != "pixel":
        from diffusers import AutoencoderKL

        ae_config = dict(AutoencoderKL.load_config(resolve_checkpoint(cfg.autoencoder, "autoencoder"),
                                                   subfolder=cfg.autoencoder_subfolder))
    return architecture_record(cfg, llm_config, vit_config, ae_config)


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Parameters are created on the meta device; buffers (rotary frequencies, position ids) stay real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def retie(model: MogaoModel) -> None:
    """Tie the LM head to the embeddings again where the LLM ties them: parameters created under
    `empty_parameters` are new objects, which undoes the tie `transformers` made while building, and
    `to_empty` on plain (unsharded) modules makes new parameters per module."""
    bb = model.backbone
    if getattr(bb.config, "tie_word_embeddings", False) and bb.lm_head.weight is not bb.embed_tokens.weight:
        bb.lm_head.weight = bb.embed_tokens.weight


def allocate(model: MogaoModel, device: torch.device | str = "cpu") -> None:
    """Give the meta parameters of `model` (uninitialised) memory on `device`; buffers keep their values."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    retie(model)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])


def _from_record(cfg: ModelConfig, llm_config: dict, vit_config: dict, ae_config: dict | None,
                 meta: bool) -> MogaoModel:
    """A randomly initialised model of this architecture (parameters on the meta device where `meta`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, SiglipVisionConfig

    from mogao.model.autoencoder import DiffusersVAE, PixelAutoencoder
    from mogao.model.mogao import MogaoModel
    from mogao.model.vision import VisionEncoder

    with empty_parameters() if meta else contextlib.nullcontext():
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llm_config), trust_remote_code=False)
        vit = VisionEncoder.from_config(SiglipVisionConfig(**vit_config), feature_layer=cfg.vit_feature_layer)
        ae = PixelAutoencoder() if ae_config is None else DiffusersVAE.from_config(ae_config)
        model = MogaoModel(cfg, llm, vit, ae)
    if meta:
        retie(model)
    return model


def _from_parts(cfg: ModelConfig, dtype: torch.dtype | None) -> MogaoModel:
    """Initialise from pretrained components: the LLM (both experts), SigLIP and the autoencoder."""
    from transformers import AutoModelForCausalLM

    from mogao.model.autoencoder import DiffusersVAE, PixelAutoencoder
    from mogao.model.mogao import MogaoModel
    from mogao.model.vision import VisionEncoder

    llm = AutoModelForCausalLM.from_pretrained(resolve_checkpoint(cfg.llm, "LLM"), dtype=dtype or torch.float32,
                                               trust_remote_code=False)
    vit = VisionEncoder.from_pretrained(str(resolve_checkpoint(cfg.vit, "ViT")), feature_layer=cfg.vit_feature_layer)
    if cfg.autoencoder == "pixel":
        ae = PixelAutoencoder()
    else:
        ae = DiffusersVAE.from_pretrained(str(resolve_checkpoint(cfg.autoencoder, "autoencoder")),
                                          subfolder=cfg.autoencoder_subfolder)
    return MogaoModel(cfg, llm, vit, ae)


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in the safetensors file `path`, from its header alone (safetensors checks
    that the header's offsets and sizes fit the file's length); ConfigError naming an unreadable file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"cannot read weights '{path}': {printable(e)} (truncated or not a safetensors file?)"
                          ) from e


def _differences(model: torch.nn.Module, saved: Mapping[str, tuple[int, ...]]) -> list[str]:
    """How the saved tensors' names and shapes differ from `model`'s state dict (tied weights - one parameter
    under several names - may be saved under any one of them); [] when they fit. `model` may be on the meta
    device."""
    own = model.state_dict(keep_vars=True)
    names_of: dict[int, set[str]] = {}
    for k, v in own.items():
        names_of.setdefault(id(v), set()).add(k)
    missing = sorted(k for k, v in own.items() if not (names_of[id(v)] & set(saved)))
    unexpected = sorted(set(saved) - set(own))
    shapes = [f"{k}: saved {tuple(saved[k])}, model {tuple(own[k].shape)}" for k in sorted(set(own) & set(saved))
              if tuple(saved[k]) != tuple(own[k].shape)]

    def few(xs: list[str]) -> str:
        return printable(", ".join(xs[:3]) + (f" (+{len(xs) - 3} more)" if len(xs) > 3 else ""))

    why = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
           f"shape mismatch {few(shapes)}" if shapes else ""]
    return [w for w in why if w]


def _architecture_error(path: Path, why: list[str]) -> ConfigError:
    return ConfigError(f"weights '{path}' are for another architecture than its config describes: "
                       + "; ".join(why))


def load_checked(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, refusing (with the differences named) weights of another
    architecture, and reporting an unreadable file as such."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    why = _differences(model, read_safetensors_header(path))
    if why:
        raise _architecture_error(path, why)
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"cannot read weights '{path}': {printable(e)} (truncated or not a safetensors file?)"
                          ) from e
    model.load_state_dict(saved, strict=False)  # keys checked above; tied duplicates are filled by their twin


def _meta_model(parts: tuple[ModelConfig, dict, dict, dict | None]) -> MogaoModel:
    """The architecture `parts` describe with every tensor, buffers included, on the meta device: its names and
    shapes cost no memory, however large the config says it is."""
    with torch.device("meta"):
        return _from_record(*parts, meta=False)


def _state_bytes(model: torch.nn.Module) -> int:
    """Bytes of `model`'s state dict (tied tensors once)."""
    tensors = {id(v): v for v in model.state_dict(keep_vars=True).values()}
    return sum(v.numel() * v.element_size() for v in tensors.values())


MODEL_PREFIX = "model."  # the MogaoModel's keys inside the LightningModule's state dict


def _first_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def read_checkpoint_metadata(ckpt: StrPath) -> dict[str, Any]:
    """The Lightning checkpoint dict of a checkpoint file, or a sharded checkpoint's metadata (`meta.pt`),
    after `check_checkpoint` (CRC-32s, shard index, weights-only records); CheckpointError otherwise."""
    ckpt = Path(ckpt)
    check_checkpoint(ckpt)
    path = ckpt / SHARDED_META if ckpt.is_dir() else ckpt
    meta = load_checkpoint_file(path, mmap=not ckpt.is_dir())
    if not isinstance(meta, dict):
        raise CheckpointError(path, f"holds a {type(meta).__name__}, not a Lightning checkpoint")
    return meta


def _check_checkpoint_fits(parts: tuple[ModelConfig, dict, dict, dict | None], ckpt: Path,
                           meta: dict[str, Any]) -> None:
    """Before any memory is allocated for the model: the architecture the checkpoint records must have the
    names and shapes of the weights it holds (a whole file: its state dict, memory-mapped; a sharded folder: its
    shard index), and need no more memory than its files could hold; CheckpointError otherwise."""
    model = _meta_model(parts)
    own = {MODEL_PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    if ckpt.is_dir():
        from mogao.model.checkpoint_files import read_shard_index

        index = read_shard_index(ckpt / SHARDED_INDEX)
        saved = {k.removeprefix("state_dict."): tuple(getattr(v, "size", ()))
                 for k, v in (getattr(index, "state_dict_metadata", None) or {}).items()
                 if isinstance(k, str) and k.startswith("state_dict." + MODEL_PREFIX)}
        on_disk = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())
    else:
        state = meta.get("state_dict", {})
        saved = {k: tuple(v.shape) for k, v in state.items() if isinstance(k, str) and k.startswith(MODEL_PREFIX)
                 and torch.is_tensor(v)}
        on_disk = ckpt.stat().st_size
    missing = sorted(k for k in own if k not in saved)
    if missing:
        raise CheckpointError(ckpt, f"lacks model weights its architecture has, e.g. {printable(missing[:3])}")
    wrong = [f"{k} {saved[k]} (the architecture needs {v})" for k, v in own.items() if saved[k] != v]
    if wrong:
        shown = printable("; ".join(wrong[:3]))
        raise CheckpointError(ckpt, f"{len(wrong)} weight(s) of the wrong shape, e.g. {shown}")
    # (weights may be saved in a narrower dtype than they are built in: up to 4 bytes for each one on disk)
    if _state_bytes(model) > 4 * on_disk + 2**26:
        raise CheckpointError(ckpt, f"its architecture needs {_state_bytes(model)} bytes, far more than its "
                                    f"{on_disk} bytes of files hold")


def _load_checkpoint_weights(model: MogaoModel, ckpt: Path, meta: dict[str, Any]) -> None:
    """Fill `model` (allocated, same architecture) with a checked checkpoint's model weights; every weight must
    have the shape the architecture gives it."""
    own = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    if ckpt.is_dir():
        import torch.distributed.checkpoint as dcp

        try:  # (torch compares each shard's shape with the architecture's)
            dcp.load({"state_dict": own}, checkpoint_id=str(ckpt), no_dist=True)
        except Exception as e:  # noqa: BLE001 - torch's reader wraps every failure in its own types
            raise CheckpointError(ckpt, f"its shards do not load into the stored architecture ({_first_line(e)})"
                                  ) from e
        return
    saved = meta.get("state_dict", {})
    missing = sorted(k for k in own if k not in saved)
    if missing:
        raise CheckpointError(ckpt, f"lacks model weights, e.g. {missing[:3]}")
    wrong = [f"{k} {tuple(saved[k].shape)} (the architecture needs {tuple(v.shape)})" for k, v in own.items()
             if not torch.is_tensor(saved[k]) or saved[k].shape != v.shape]
    if wrong:  # copy_ would broadcast a smaller tensor silently
        raise CheckpointError(ckpt, f"{len(wrong)} weight(s) of the wrong shape, e.g. {'; '.join(wrong[:3])}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(saved[k])


def load_model(source: ModelConfig | Mapping[str, Any] | StrPath, *, device: torch.device | str = "cpu",
               meta: bool = False, dtype: torch.dtype | None = None, tokenizer: Any = None,
               overrides: Mapping[str, Any] | None = None) -> MogaoModel:
    """The `MogaoModel` `source` describes (in training mode, as modules are built).

    source:
        a `ModelConfig`: built from the pretrained components it names (the LLM's weights for both experts, SigLIP,
            the autoencoder); the new layers are drawn from torch's CPU generator.
        a saved model folder (`save_pretrained`): the architecture from `mogao_config.json`, the weights from
            `model.safetensors` (safetensors only: nothing in the folder can run code), every weight checked
            against the architecture (names and shapes); the component checkpoints are not needed.
        a training checkpoint (a `.ckpt` file or a sharded checkpoint folder) written with a mogao sharding
            strategy: checked and read weights-only (`check_checkpoint`), the model rebuilt from its
            `mogao_architecture` entry and every weight checked against it.
        an architecture record (`mogao.model.config.architecture_record`): that architecture, randomly initialised.
    meta: build with every parameter on the meta device (buffers stay real: they are small and computed from
        the configs); configs are read, weights never (see `mogao.training.shard_load.load_weights`).
    device: where the weights go (ignored with `meta`).
    dtype: cast the floating-point weights (the LLM of a `ModelConfig` is read in it); None: float32 for components,
        as saved otherwise.
    tokenizer: a tokenizer or its directory: a `ModelConfig`'s vocabulary grows to its length, and any model
        whose vocabulary is smaller is refused.
    overrides: `ModelConfig` fields to change (e.g. runtime settings of a saved model: `attention`,
        `text_sees_vae`, `timestep_sampling`).
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    overrides = dict(overrides or {})
    origin = None
    if isinstance(source, ModelConfig):
        cfg = replace(source, **overrides)
        if tok is not None:
            cfg = replace(cfg, vocab_size=len(tok))
        if meta:  # the grown vocabulary is in the LLM config already: no resize on meta tensors
            model = _from_record(*_record_parts(_parts_record(cfg, dtype), {}, cfg.llm), meta=True)
            model.cfg = copy.deepcopy(cfg)  # its own copy, as MogaoModel keeps one
        else:
            model = _from_parts(cfg, dtype)
    elif isinstance(source, Mapping):
        model = _from_record(*_record_parts(source, overrides, "architecture record"), meta=meta)
    else:
        origin = Path(source).expanduser()
        if not origin.exists():
            raise ConfigError(f"checkpoint directory not found: '{origin}' (give a directory saved with "
                              "save_pretrained, e.g. runs/demo/2-t2i/model, or a training checkpoint)")
        if origin.is_file() or (origin / SHARDED_META).exists() or (origin / SHARDED_INDEX).exists():
            checkpoint = read_checkpoint_metadata(origin)
            record = checkpoint.get(ARCHITECTURE_KEY)
            if record is None:
                raise ConfigError(f"'{origin}' has no '{ARCHITECTURE_KEY}' entry: it was not written by a mogao "
                                  "sharding strategy (MoTFSDP2Strategy / MoTFSDPStrategy); a model trained "
                                  "without one is saved as a model directory at the end of fit (<run>/model)")
            parts = _record_parts(record, overrides, str(origin))
            _check_checkpoint_fits(parts, origin, checkpoint)  # (before any memory is allocated)
            model = _from_record(*parts, meta=True)
            if not meta:
                allocate(model, device)
                _load_checkpoint_weights(model, origin, checkpoint)
        else:
            parts = _record_parts(_saved_record(origin), overrides, str(origin / CONFIG_NAME))
            weights = origin / WEIGHTS_NAME
            why = _differences(_meta_model(parts), read_safetensors_header(weights))
            if why:  # (before any memory is allocated: the header's shapes fit the file's length)
                raise _architecture_error(weights, why)
            model = _from_record(*parts, meta=True)
            if not meta:  # every weight is read from the file: nothing to initialise
                allocate(model)
                load_checked(model, weights)
        model.source_path = str(origin)  # where it came from, for messages (e.g. a LoRA adapter's base)
    if dtype is not None:
        model.to(dtype)
    if not meta and torch.device(device) != torch.device("cpu"):
        model.to(device)
    if tok is not None and model.backbone.embed_tokens.num_embeddings < len(tok):
        raise ConfigError(f"the model's vocabulary ({model.backbone.embed_tokens.num_embeddings}) is smaller "
                          f"than the tokenizer's ({len(tok)}): wrong tokenizer for this model?")
    return model
