"""Adapters on a `MogaoModel` with `peft`: inject, say what trains, identify the base, save, load and merge.

An adapter directory holds `adapter_model.safetensors` (the LoRA weights, keys without peft's adapter name, e.g.
`backbone.layers.0.gen.self_attn.q_proj.lora_A.weight`, plus the weights of parts trained in full, under their
own names) and `adapter_config.json` (the `LoraSpec` and the identity of the base model: its path and a
fingerprint of its architecture and a sample of its weights). Loading onto another base is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mogao.errors import ConfigError, printable
from mogao.lora.spec import LoraSpec

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "mogao-lora"
ADAPTER_NAME = "default"
_LORA_KEY = re.compile(r"\.(lora_A|lora_B|lora_magnitude_vector)\.")
_ARCH_KEYS = {
    "llm": ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "tie_word_embeddings"),
    "vit": ("hidden_size", "patch_size", "num_hidden_layers", "num_attention_heads", "image_size"),
}


@dataclass
class LoraState:
    """What `apply_lora` did to a model: the spec, the base's identity and whether the base is 4-bit."""

    spec: LoraSpec
    base: dict[str, Any]
    quantized: bool = False


# ---- base identity ------------------------------------------------------------------------------------
def _sample_hash(t: torch.Tensor, h: Any, n: int = 4096) -> None:
    flat = t.detach().flatten()
    flat = flat[:: max(1, flat.numel() // n)][:n]
    # bf16 bits: the same base loaded in fp32 or bf16 has the same fingerprint
    h.update(flat.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())


def base_identity(model: nn.Module, path: str | Path | None = None) -> dict[str, Any]:
    """Identity of a base model (before adapters are injected): `config_sha256` over its architecture (the
    LLM's and ViT's sizes, the latent patch, the names and shapes of every weight), `weights_sha256` over a
    strided sample of a few weights (embeddings, first and last layer of both experts, latent projection),
    `fingerprint` = the first 16 hex digits of both combined, and `path` where it came from."""
    if _lora_layers(model):
        raise ConfigError("the model already carries LoRA adapters; load or merge adapters onto a plain base model")
    state = model.state_dict()
    arch = {
        "llm": {k: model.backbone.config.to_dict().get(k) for k in _ARCH_KEYS["llm"]},
        "vit": {k: model.vit.config.to_dict().get(k) for k in _ARCH_KEYS["vit"]},
        "latent_patch": model.cfg.latent_patch,
        "timestep_conditioning": model.cfg.timestep_conditioning,
        "autoencoder": type(model.autoencoder).__name__,
        "weights": [[k, list(v.shape)] for k, v in sorted(state.items())],
    }
    config_sha = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()
    last = len(model.backbone.layers) - 1
    names = ["backbone.embed_tokens.weight", "latent_proj.proj_in.weight"]
    for i in sorted({0, last}):
        names += [f"backbone.layers.{i}.{e}.{m}.weight" for e in ("und", "gen")
                  for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    h = hashlib.sha256()
    for n in names:
        if n in state:
            h.update(n.encode())
            _sample_hash(state[n], h)
    weights_sha = h.hexdigest()
    fingerprint = hashlib.sha256((config_sha + weights_sha).encode()).hexdigest()[:16]
    path = path if path is not None else getattr(model, "source_path", None)
    return {"path": None if path is None else str(path), "fingerprint": fingerprint, "config_sha256": config_sha,
            "weights_sha256": weights_sha}


def _describe(base: dict[str, Any]) -> str:
    """The base model an identity names, for messages (what an adapter's config says is escaped: it may come
    from someone else)."""
    where = f"'{printable(base['path'])}'" if base.get("path") else "an unnamed model"
    return f"{where} (fingerprint {printable(base.get('fingerprint'))})"


# ---- injecting ----------------------------------------------------------------------------------------
def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _full_modules(model: nn.Module, spec: LoraSpec) -> dict[str, nn.Module]:
    return {p: getattr(model, p) for p in spec.full}


def apply_lora(model: nn.Module, spec: LoraSpec, base_path: str | Path | None = None,
               quantize: bool = True) -> dict[str, int]:
    """Inject `spec`'s adapters into `model` in place and make exactly the adapters and `spec.full` trainable.

    Records the base's identity first (see `base_identity`). With `spec.quantize == "nf4"` and CUDA, the adapted
    Linear layers' base weights become bitsandbytes 4-bit (they are quantized when the model moves to the GPU);
    without CUDA the run is plain LoRA and a warning says so. Returns trainable parameter counts
    {"lora": ..., <full part>: ...}.
    """
    from peft import LoraConfig, inject_adapter_in_model

    base = base_identity(model, base_path)
    regex = spec.target_regex(len(model.backbone.layers))
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)]
    if not targets:
        raise ConfigError(f"model.lora: no Linear layer matches {regex!r}; check lora.und / lora.gen / lora.layers")
    quantized = False
    if spec.quantize == "nf4" and quantize:
        from mogao.lora.quant import quantize_nf4

        quantized = quantize_nf4(model, targets)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_dora=spec.dora,
                        target_modules=regex, bias="none")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {"lora": 0}
    for name, p in model.named_parameters():
        if _LORA_KEY.search(name):
            p.requires_grad_(True)
            counts["lora"] += p.numel()
    for part, module in _full_modules(model, spec).items():
        for p in module.parameters():
            p.requires_grad_(True)
        counts[part] = sum(p.numel() for p in module.parameters())
    model.lora_state = LoraState(spec, base, quantized)
    log.info("LoRA: %d adapted layers (%s), rank %d, %s trainable parameters%s", len(targets), regex, spec.rank,
             counts, ", 4-bit NF4 base" if quantized else "")
    return counts


def lora_state(model: nn.Module) -> LoraState:
    state = getattr(model, "lora_state", None)
    if state is None:
        raise ConfigError("the model has no LoRA adapters (apply_lora or load_adapter first)")
    return state


def trainable_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter weights and the fully trained parts' weights, by qualified name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lora_param_groups(model: nn.Module, decay_all: bool = False) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters: matrices with weight decay, vectors (biases, norms,
    DoRA magnitudes) without; empty groups are left out."""
    decay, no_decay = [], []
    for name, p in trainable_named_parameters(model).items():
        (decay if decay_all or (p.dim() >= 2 and "embed" not in name) else no_decay).append(p)
    return [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


# ---- saving and loading -------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter weights (peft's adapter name removed from the keys) and the weights of `spec.full` parts.

    full: the model's whole state dict to take them from (e.g. gathered from a sharded model); default: the
        module's own tensors.
    """
    state = lora_state(model)
    if full is None:
        full = {n: p.detach() for n, p in model.named_parameters()}
        for part, module in _full_modules(model, state.spec).items():
            full.update({f"{part}.{name}": t.detach() for name, t in module.state_dict().items()})
    parts = tuple(f"{part}." for part in state.spec.full)
    out = {}
    for name, t in full.items():
        if _LORA_KEY.search(name):
            out[name.replace(f".{ADAPTER_NAME}.", ".").replace(f".{ADAPTER_NAME}", "")] = t.detach()
        elif name.startswith(parts):
            out[name] = t.detach()
    return {k: v.contiguous().cpu() for k, v in out.items()}


def save_adapter(model: nn.Module, directory: str | Path, full: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `adapter_model.safetensors` and `adapter_config.json` (spec + base identity) to `directory` as one
    unit (`mogao.model.io.write_directory`: new, empty, or a folder an adapter or model was saved
    to before); `full`: as in `adapter_state_dict`."""
    from safetensors.torch import save_file

    from mogao.model.io import write_directory

    state = lora_state(model)
    weights = adapter_state_dict(model, full)
    meta = {"format": FORMAT, "version": 1, "spec": state.spec.to_dict(), "base": state.base,
            "target_modules": state.spec.target_regex(len(model.backbone.layers)),
            "parameters": int(sum(v.numel() for v in weights.values()))}

    def write(d: Path) -> None:
        save_file(weights, str(d / ADAPTER_WEIGHTS))
        (d / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))

    # weights and config as one unit (a temporary folder renamed into place), files with the user's umask
    return write_directory(directory, write)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    d = Path(path).expanduser()
    cfg = d / ADAPTER_CONFIG
    if not cfg.is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"'{d}' is not a LoRA adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                          "(written at the end of a LoRA fit, in <run dir>/adapter)")
    from mogao.model.checkpoint_files import read_json_config

    meta = read_json_config(cfg, "a mogao LoRA adapter config")
    try:
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise KeyError("format")
        meta["spec"] = LoraSpec.from_dict(meta["spec"])
        meta["base"]["fingerprint"]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ConfigError(f"'{cfg}' is not a valid mogao LoRA adapter config ({type(e).__name__}: "
                          f"{printable(e)})") from e
    return meta


def _adapter_shapes(model: nn.Module, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor an adapter of `spec` on `model` saves (as `adapter_state_dict` names
    them), worked out from the base's layers without building the adapters."""
    regex = spec.target_regex(len(model.backbone.layers))
    out: dict[str, tuple[int, ...]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and re.fullmatch(regex, name):
            out[f"{name}.lora_A.weight"] = (spec.rank, m.in_features)
            out[f"{name}.lora_B.weight"] = (m.out_features, spec.rank)
            if spec.dora:
                out[f"{name}.lora_magnitude_vector.weight"] = (m.out_features,)
    for part, module in _full_modules(model, spec).items():
        out.update({f"{part}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    return out


def _check_adapter_header(model: nn.Module, spec: LoraSpec, weights_file: Path) -> None:
    """Before any adapter is built: the weights file's header must hold exactly the tensors `spec` makes on
    `model`, of their shapes (so a config cannot ask for a rank, and the memory it takes, that its weights do
    not back); ConfigError naming the file and the differences otherwise."""
    from mogao.model.io import read_safetensors_header

    try:
        saved = read_safetensors_header(weights_file)
    except ConfigError as e:
        raise ConfigError(f"cannot read adapter weights '{weights_file}' ({printable(e)}); not a safetensors "
                          "file, or damaged") from e
    want = _adapter_shapes(model, spec)
    missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    wrong = [f"{k} {saved[k]} (needs {v})" for k, v in want.items() if k in saved and saved[k] != v]
    if missing or unexpected or wrong:
        why = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
               f"{len(wrong)} weight(s) of the wrong shape, e.g. {'; '.join(wrong[:3])}" if wrong else ""]
        raise ConfigError(f"adapter '{weights_file}' does not fit its own spec (rank {spec.rank}) on this base: "
                          f"{printable('; '.join(w for w in why if w))} (a damaged or hand-edited adapter?)")


def _load_adapter(model: nn.Module, path: str | Path, base_name: str | Path | None = None) -> nn.Module:
    from safetensors.torch import load_file

    meta = read_adapter_config(path)
    own = base_identity(model, base_name)
    if own["fingerprint"] != meta["base"]["fingerprint"]:
        raise ConfigError(f"adapter '{path}' was trained on base {_describe(meta['base'])}, not on the model given, "
                          f"{_describe(own)}: load it onto the base model it was made for")
    spec: LoraSpec = meta["spec"]
    plain = LoraSpec.from_dict({**spec.to_dict(), "quantize": "none", "dropout": 0.0})
    weights_file = Path(path).expanduser() / ADAPTER_WEIGHTS
    _check_adapter_header(model, plain, weights_file)  # (before the adapters are built)
    apply_lora(model, plain, base_name, quantize=False)
    model.lora_state = LoraState(spec, meta["base"])
    try:
        saved = load_file(str(weights_file))
    except Exception as e:  # noqa: BLE001 - safetensors reports a bad file with several error types
        raise ConfigError(f"cannot read adapter weights '{weights_file}' ({type(e).__name__}: {e}); not a "
                          "safetensors file, or damaged") from e
    own_params = dict(model.named_parameters())
    own_params.update({f"{part}.{k}": v for part, m in _full_modules(model, spec).items()
                       for k, v in m.state_dict().items()})
    names = {_LORA_KEY.sub(lambda m: f".{m.group(1)}.{ADAPTER_NAME}.", k): k for k in saved}
    mapped = {own: saved[k] for own, k in names.items()}
    missing = sorted(k for k in own_params if k not in mapped and (_LORA_KEY.search(k) or
                                                                   k.split(".")[0] in spec.full))
    unexpected = sorted(k for k in mapped if k not in own_params)
    if missing or unexpected:
        raise ConfigError(f"adapter '{path}' does not fit its own spec: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]} (a damaged or hand-edited adapter?)")
    wrong = [f"{names[k]} {tuple(v.shape)} (needs {tuple(own_params[k].shape)})" for k, v in mapped.items()
             if v.shape != own_params[k].shape]
    if wrong:  # copy_ would broadcast e.g. a one-element tensor over a whole matrix without a word
        raise ConfigError(f"adapter '{weights_file}': {len(wrong)} weight(s) of the wrong shape, e.g. "
                          f"{'; '.join(wrong[:3])} (a damaged or hand-edited adapter?)")
    with torch.no_grad():
        for k, v in mapped.items():
            own_params[k].copy_(v.to(own_params[k].dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (peft's `merge`) and put the plain Linear layers back, so the
    model is an ordinary `MogaoModel` again (saveable with `save_pretrained`)."""
    for name, layer in _lora_layers(model):
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    if hasattr(model, "lora_state"):
        del model.lora_state
    return model
