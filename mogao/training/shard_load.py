"""Meta-device initialisation: build a `MogaoModel` without weights, then fill only what each rank holds.

    load_model(source, meta=True) the model with every parameter on the meta device (buffers stay real: they
                                  are small and computed from the configs); reads configs only
                                  (`mogao.model.io`).
    plan_weights(model, ...)      the `WeightPlan` saying where its weights come from.
    load_weights(model, plan)     allocate the parameters where they are (a rank's FSDP2 shards, or whole
                                  tensors in one process) and fill them, reading from the safetensors files
                                  only the rows of dim 0 each local shard covers (`safe_open(...).get_slice`).

Where each parameter comes from (pretrained components):
    backbone.layers.i.{und,gen}.*          <- the LLM's model.layers.i.* (the generation expert starts as a copy)
    backbone.embed_tokens / lm_head        <- model.embed_tokens / lm_head (tied checkpoints: the embeddings)
    backbone.norm, backbone.gen_norm       <- model.norm
    vit.model.*                            <- the SigLIP checkpoint's (vision_model.)* keys
    autoencoder.vae.*                      <- the frozen VAE, loaded whole on every rank (tens of M parameters)
    time_embed, gen_adaln, additive_time,  <- new: built on the CPU exactly as `MogaoModel.__init__` builds them,
    connector, latent_proj                    from the random state captured before building, so every rank
                                              (and `load_model(cfg)` with the same seed) gets the same values
A saved mogao model (`init_from`) holds every parameter under its own name. A published BAGEL folder
(`init_from`, `plan_bagel_weights`) holds every parameter, and the position tables, under BAGEL's names
(`mogao.bagel.keymap`): a tensor whose rows stay rows (the layers, embeddings, LM head; `vae2llm`, whose columns
are permuted) is read by its local rows; the few that change shape or row order (the ViT patch embedding,
`llm2vae`) and the autoencoder and position tables, all small, are read whole.

Vocabulary growth (`vocab_size` above the checkpoint's): the extra rows are made by `transformers`' own
`resize_token_embeddings` (mean resizing), which needs the checkpoint's whole embedding matrix (and untied LM
head): those two tensors are then read whole on every rank, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mogao.errors import ConfigError
from mogao.model.checkpoint_files import indexed_weight_files
from mogao.model.config import ModelConfig
from mogao.model.io import CONFIG_NAME, WEIGHTS_NAME, allocate, empty_parameters, resolve_checkpoint
from mogao.model.mogao import MogaoModel


@dataclass
class WeightPlan:
    """Where the weights of a model built with `load_model(..., meta=True)` come from.

    cfg: the model's config (part paths; `vocab_size` the final vocabulary).
    init_from: a saved mogao model directory, or None for the pretrained components.
    rng_state: the CPU random state `load_model(cfg)` would have started from (new modules are drawn from it).
    llm_config: the LLM architecture as built (`vocab_size` the grown one).
    checkpoint_vocab: rows of the LLM checkpoint's embedding matrix.
    bagel: the checked folder when `init_from` is a published BAGEL folder.
    """

    cfg: ModelConfig
    init_from: Path | None
    rng_state: torch.Tensor
    llm_config: dict = field(default_factory=dict)
    checkpoint_vocab: int = 0
    bagel: Any = None  # with a BAGEL folder as init_from: its `mogao.bagel.folder.BagelFolderInfo` (checked)


@dataclass
class LoadReport:
    """What `load_weights` read: for each safetensors key, the row ranges [start, stop) of dim 0 read (None:
    the whole tensor), and the bytes allocated for this process's parameters."""

    reads: dict[str, list[tuple[int, int] | None]] = field(default_factory=dict)
    local_param_bytes: int = 0
    whole: list[str] = field(default_factory=list)  # parameters filled from whole tensors (VAE, new modules)


# ---- planning ---------------------------------------------------------------------------------------
def plan_weights(model: MogaoModel, init_from: str | Path | None = None,
                 rng_state: torch.Tensor | None = None) -> WeightPlan:
    """Where `load_weights` fills `model` from - `load_model(cfg, meta=True)` (the pretrained components of
    `model.cfg`) or `load_model(init_from, meta=True)` (a saved model) - with `rng_state` the CPU random state
    taken just before building (default: now). Reads configs only."""
    rng = torch.get_rng_state() if rng_state is None else rng_state
    llm_config = model.backbone.config.to_dict()
    if init_from is not None:
        return WeightPlan(model.cfg, Path(init_from).expanduser(), rng, llm_config, int(llm_config["vocab_size"]))
    from transformers import AutoConfig

    llm = resolve_checkpoint(model.cfg.llm, "LLM")
    vocab = int(AutoConfig.from_pretrained(llm, trust_remote_code=False).vocab_size)
    return WeightPlan(model.cfg, None, rng, llm_config, vocab)


def plan_bagel_weights(model: MogaoModel, info: Any) -> WeightPlan:
    """Where `load_weights` fills a model built by `mogao.bagel.load.meta_bagel_model` from: the BAGEL folder
    `info` describes (its `BagelFolderInfo`). Reads nothing more."""
    llm_config = model.backbone.config.to_dict()
    return WeightPlan(model.cfg, info.path, torch.get_rng_state(), llm_config, int(llm_config["vocab_size"]),
                      bagel=info)


# ---- reading ----------------------------------------------------------------------------------------
class _Safetensors:
    """The tensors of a checkpoint directory (one file or an index of shards), read by row ranges."""

    def __init__(self, directory: Path, what: str, report: LoadReport,
                 names: tuple[str, ...] = ("model.safetensors",)) -> None:
        from safetensors import safe_open

        self.report = report
        index = directory / (names[0] + ".index.json")
        files = [directory / n for n in names if (directory / n).is_file()]
        if index.is_file():  # (every file it names inside `directory`)
            files = indexed_weight_files(index)
        if not files:
            raise ConfigError(f"{what} checkpoint '{directory}' has no {names[0]} (or its index): per-shard "
                              "loading reads safetensors only; convert the checkpoint or set model.meta_init: false")
        self.handles, self.where = [], {}
        for f in files:
            if not f.is_file():  # (missing, or a FIFO or device, which would block or never end)
                raise ConfigError(f"{what} checkpoint '{directory}': its weight file '{f}' is missing or not a "
                                  "regular file")
            h = safe_open(str(f), framework="pt")
            self.handles.append(h)
            for k in h.keys():
                self.where[k] = h

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def rows(self, key: str, start: int, stop: int, whole: bool) -> torch.Tensor:
        h = self.where[key]
        if whole:
            self.report.reads.setdefault(key, []).append(None)
            return h.get_tensor(key)
        self.report.reads.setdefault(key, []).append((start, stop))
        return h.get_slice(key)[start:stop]


def _local(p: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """(tensor to fill, first row, end row, whole) of this process's part of parameter `p` (dim-0 shards)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(p, DTensor):
        return p.data, 0, (p.shape[0] if p.dim() else 0), True
    if any(not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)) for pl in p.placements):
        raise ConfigError(f"per-shard loading supports dim-0 sharding only, got placements {p.placements}")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local = p.to_local()
    if p.dim() == 0 or tuple(shape) == tuple(p.shape):
        return local, 0, (p.shape[0] if p.dim() else 0), True
    return local, int(offset[0]), int(offset[0]) + int(shape[0]), False


class _Cpu:
    """Build in float32 on the CPU whatever device / dtype context the caller is in (Lightning's init
    context): `load_model(cfg)` builds there, and the CPU generator is the one whose state was captured."""

    def __enter__(self) -> None:
        self.dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        self.device = torch.device("cpu")
        self.device.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.device.__exit__(*exc)
        torch.set_default_dtype(self.dtype)


def _new_modules(model: MogaoModel, plan: WeightPlan, llm: _Safetensors | None) -> dict[str, torch.Tensor]:
    """Whole tensors of the parameters the pretrained components do not have, drawn as `MogaoModel.__init__`
    draws them (same order, same random state), plus the grown vocabulary rows ("<grown>.embed"/".lm_head")."""
    from mogao.model.autoencoder import LatentProjector
    from mogao.model.timestep import AdaLNModulation, AdditiveTimestep, TimestepEmbedder
    from mogao.model.vision import MLPConnector

    out: dict[str, torch.Tensor] = {}

    def take(prefix: str, module: nn.Module) -> None:
        out.update({prefix + n: t.detach() for n, t in module.state_dict().items()})

    saved = torch.get_rng_state()
    try:
        with _Cpu():
            torch.set_rng_state(plan.rng_state)
            if llm is not None and plan.llm_config["vocab_size"] > plan.checkpoint_vocab:
                out.update(_grown_rows(plan, llm))
            hidden = model.backbone.hidden_size
            take("time_embed.", TimestepEmbedder(hidden))
            for layer in model.backbone.layers:
                if layer.gen_adaln is not None:  # zero-initialised, but it draws from the generator first
                    AdaLNModulation(hidden, hidden)
            if model.additive_time is not None:
                take("additive_time.", AdditiveTimestep(hidden))
            take("connector.", MLPConnector(model.vit.hidden_size, hidden))
            take("latent_proj.", LatentProjector(model.token_dim, hidden))
    finally:
        torch.set_rng_state(saved)
    return out


def _grown_rows(plan: WeightPlan, llm: _Safetensors) -> dict[str, torch.Tensor]:
    """The extra embedding (and untied LM-head) rows `resize_token_embeddings` adds, computed by transformers
    on a stand-in LLM holding only the checkpoint's embeddings (the random state must be the one
    `MogaoModel.__init__` starts from)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    old = plan.checkpoint_vocab
    with empty_parameters():
        stand_in = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**plan.llm_config, "vocab_size": old}),
                                                    trust_remote_code=False)
    emb = stand_in.get_input_embeddings()
    emb.weight = nn.Parameter(llm.rows("model.embed_tokens.weight", 0, old, whole=True).float())
    tied = "lm_head.weight" not in llm
    if not tied:
        stand_in.lm_head.weight = nn.Parameter(llm.rows("lm_head.weight", 0, old, whole=True).float())
    else:
        stand_in.lm_head.weight = emb.weight
    stand_in.resize_token_embeddings(int(plan.llm_config["vocab_size"]))
    out = {"<grown>.embed": stand_in.get_input_embeddings().weight.detach()[old:]}
    if not tied:
        out["<grown>.lm_head"] = stand_in.get_output_embeddings().weight.detach()[old:]
    return out


def _part_key(name: str, llm: _Safetensors, vit: _Safetensors) -> tuple[str, str] | None:
    """(part, checkpoint key) a pretrained-part parameter is read from; None for new parameters."""
    if name.startswith("backbone.layers."):
        i, expert, rest = name.removeprefix("backbone.layers.").split(".", 2)
        return ("llm", f"model.layers.{i}.{rest}") if expert in ("und", "gen") else None
    if name in ("backbone.norm.weight", "backbone.gen_norm.weight"):
        return "llm", "model.norm.weight"
    if name == "backbone.embed_tokens.weight":
        return "llm", "model.embed_tokens.weight"
    if name == "backbone.lm_head.weight":
        return "llm", "lm_head.weight" if "lm_head.weight" in llm else "model.embed_tokens.weight"
    if name.startswith("vit.model."):  # a SiglipModel checkpoint (text + vision) prefixes "vision_model."
        key = name.removeprefix("vit.model.")
        return "vit", key if key in vit else "vision_model." + key
    if name.startswith("autoencoder.vae."):
        return "vae", name.removeprefix("autoencoder.vae.")
    return None


def load_weights(model: MogaoModel, plan: WeightPlan, device: torch.device | str = "cpu") -> LoadReport:
    """Allocate `model`'s meta parameters on `device` (FSDP2 shards: only the local shard) and fill them from
    the plan's checkpoints, reading only the local rows of each tensor. Buffers keep their values."""
    report = LoadReport()
    allocate(model, device)
    names = {}  # one name per parameter (tied ones: every name, for saved files that kept another)
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    if plan.bagel is not None:
        _fill_bagel(model, plan, names, report)
    elif plan.init_from is not None:
        _fill_saved(model, plan, names, report)
    else:
        _fill_parts(model, plan, names, report)
    report.local_param_bytes = sum(_local(p)[0].numel() * p.element_size() for p in model.parameters())
    return report


def _copy(p: torch.Tensor, read, name: str) -> None:
    local, start, stop, whole = _local(p)
    src = read(start, stop, whole)
    want = tuple(p.shape) if whole else (stop - start, *p.shape[1:])
    if tuple(src.shape) != want:
        raise ConfigError(f"checkpoint tensor for '{name}' has shape {tuple(src.shape)}, the model expects "
                          f"{want}: the checkpoint does not match its config")
    local.copy_(src)


def _fill_saved(model: MogaoModel, plan: WeightPlan, names: dict[int, list[str]], report: LoadReport) -> None:
    assert plan.init_from is not None
    saved = _Safetensors(plan.init_from, "saved model", report, (WEIGHTS_NAME,))
    with torch.no_grad():
        for p in model.parameters():
            key = next((n for n in names[id(p)] if n in saved), None)
            if key is None:
                raise ConfigError(f"'{plan.init_from / WEIGHTS_NAME}' has no tensor for '{names[id(p)][0]}': "
                                  f"weights of another architecture than {CONFIG_NAME} describes?")
            _copy(p, lambda a, b, w, k=key: saved.rows(k, a, b, w), key)


def _fill_bagel(model: MogaoModel, plan: WeightPlan, names: dict[int, list[str]], report: LoadReport) -> None:
    from mogao.bagel.folder import AE_FILE, EMA_FILE, file_inside
    from mogao.bagel.keymap import TOKEN_FEATURES_IN, key_mappings, to_mogao_tensor

    info = plan.bagel
    arch, folder = info.arch, info.path
    for name in (EMA_FILE, AE_FILE):  # (inside the folder: refused otherwise)
        file_inside(folder, name)
    files = {name: _Safetensors(folder, f"BAGEL {name}", report, (name,)) for name in (EMA_FILE, AE_FILE)}
    place = {m.mogao: m for m in key_mappings(arch, model.cfg) if m.mogao is not None}

    def reader(m):
        src = files[m.file]
        if m.transform in (None, TOKEN_FEATURES_IN):  # rows stay rows: read the local ones
            return lambda a, b, w: to_mogao_tensor(m, src.rows(m.bagel, a, b, w), arch)

        def whole(a: int, b: int, w: bool) -> torch.Tensor:
            report.whole.append(m.mogao)
            t = to_mogao_tensor(m, src.rows(m.bagel, 0, 0, True), arch)
            return t if w else t[a:b]
        return whole

    with torch.no_grad():
        for p in model.parameters():
            name = next((n for n in names[id(p)] if n in place), None)
            if name is None:
                raise ConfigError(f"the BAGEL folder '{folder}' has no tensor for '{names[id(p)][0]}'")
            _copy(p, reader(place[name]), place[name].bagel)
        for name, b in model.named_buffers():  # the position tables: BAGEL's files hold them (small, whole)
            if name in place:
                b.copy_(reader(place[name])(0, 0, True))


def _fill_parts(model: MogaoModel, plan: WeightPlan, names: dict[int, list[str]], report: LoadReport) -> None:
    cfg = plan.cfg
    llm = _Safetensors(resolve_checkpoint(cfg.llm, "LLM"), "LLM", report)
    vit = _Safetensors(resolve_checkpoint(cfg.vit, "ViT"), "ViT", report)
    vae: dict[str, torch.Tensor] = {}
    if cfg.autoencoder != "pixel":  # frozen and small: loaded whole (diffusers converts legacy key names)
        from mogao.model.autoencoder import DiffusersVAE

        path = resolve_checkpoint(cfg.autoencoder, "autoencoder")
        vae = DiffusersVAE.from_pretrained(str(path), subfolder=cfg.autoencoder_subfolder).vae.state_dict()
    new = _new_modules(model, plan, llm)
    old_vocab = plan.checkpoint_vocab

    def vocab_rows(key: str, grown: str):
        def read(start: int, stop: int, whole: bool) -> torch.Tensor:
            stop = stop if not whole else int(plan.llm_config["vocab_size"])
            parts = []
            if start < old_vocab:
                parts.append(llm.rows(key, start, min(stop, old_vocab), whole and stop <= old_vocab))
            if stop > old_vocab:
                parts.append(new[grown][max(start, old_vocab) - old_vocab: stop - old_vocab])
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        return read

    with torch.no_grad():
        for p in model.parameters():
            name = names[id(p)][0]
            where = _part_key(name, llm, vit)
            if where is None:
                if name not in new:
                    if ".gen_adaln." not in name:
                        raise ConfigError(f"no source for parameter '{name}' in per-shard loading")
                    _local(p)[0].zero_()  # AdaLN starts at zero (AdaLNModulation)
                    continue
                report.whole.append(name)
                _copy(p, lambda a, b, w, t=new[name]: t if w else t[a:b], name)
                continue
            part, key = where
            if part == "vae":
                report.whole.append(name)
                _copy(p, lambda a, b, w, t=vae[key]: t if w else t[a:b], name)
            elif part == "llm" and key in ("model.embed_tokens.weight", "lm_head.weight"):
                _copy(p, vocab_rows(key, "<grown>.lm_head" if key == "lm_head.weight" else "<grown>.embed"), name)
            else:
                src = llm if part == "llm" else vit
                if key not in src:
                    raise ConfigError(f"the {part.upper()} checkpoint has no tensor '{key}' (for '{name}')")
                _copy(p, lambda a, b, w, s=src, k=key: s.rows(k, a, b, w), name)

