"""Distributed strategy presets for Mogao models, usable by class path from recipes and `--trainer.strategy`.

    MoTFSDP2Strategy   FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning's `ModelParallelStrategy`:
                       the default. Runs on CUDA (NCCL) and on CPU (gloo; what the tests use).
    MoTFSDPStrategy    FSDP1 (`FullyShardedDataParallel`) through Lightning's `FSDPStrategy`: CUDA only.

Both shard one unit per MoT decoder layer (both experts of a layer together, so one all-gather serves every
token of the layer) and one per SigLIP encoder layer, and can checkpoint activations per such layer.

Why FSDP2 is the default: it shards each parameter on its own (DTensor), so frozen and trainable parameters
(a frozen generation expert, the frozen VAE, LoRA adapters next to frozen bases) may share a unit, frozen ones
get no gradient and no optimizer state, and `requires_grad` may change between steps (curriculum unfreezing):
FSDP2 re-reads it at every all-gather. FSDP1 needs `use_orig_params=True` for all of this (set here); in this
torch release it refuses CPU devices, so it cannot be exercised without a GPU.

Meta-device initialisation (`broadcast_from_rank0=True`): `MogaoModule` builds its model in `__init__`; at
`configure_model` every rank but the first drops its copy to the meta device before sharding, and the first
rank's weights are then scattered shard by shard (`set_model_state_dict(..., broadcast_from_rank0=True)`).
So after setup no rank holds more than its shards. See docs/distributed.md for the memory this does and does
not save.

Per-shard initialisation (the module's `meta_init: true`): every rank builds the model on the meta device and
reads no weights in `__init__`; `parallelize` shards it, allocates each rank's shards only and fills them with
just their rows of the pretrained safetensors files (`mogao.training.shard_load`). No process ever holds the
whole model. `broadcast_from_rank0` is then not used.

Faults of a rank (docs/distributed.md, "When a rank dies or hangs"):

    MogaoDDPStrategy   Lightning's DDP with the options below (`--trainer.strategy=ddp` gets their defaults).

- `collective_timeout` (seconds, default `DEFAULT_COLLECTIVE_TIMEOUT`, 10 minutes): how long a rank may wait in
  one collective (or spend in one training step's forward, backward and optimizer step, where DDP and FSDP
  run theirs) before the watchdog (`mogao.training.faults.CollectiveWatchdog`) reports it and ends the process
  so that the launcher restarts the group. The process group's own timeout (torch's, enforced by gloo and by
  NCCL's watchdog) is set `backstop_margin` later, as a backstop. Lightning's strategies given by name get the
  same default where they keep torch's 30 minutes (`configure_collective_timeout`).
- Sharded checkpoints are written as a unit (`MoTFSDP2Strategy.save_checkpoint`): every rank writes into a
  temporary folder, which the first rank renames into place once all are done; a rank killed during the
  write leaves the previous checkpoint.
- Elastic world size: when torchrun starts another number of nodes than `trainer.num_nodes` (a restart after
  `--nnodes=MIN:MAX` lost or gained nodes), the strategy takes the launcher's (`follow_launcher_world`).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from mogao.errors import ConfigError
from mogao.model.io import ARCHITECTURE_KEY, model_architecture  # the record load_model reads
from mogao.training.faults import DEFAULT_COLLECTIVE_TIMEOUT, backstop_margin


def _check_timeout(collective_timeout: float | None, kwargs: dict[str, Any]) -> timedelta | None:
    """The process group timeout for a strategy built with `collective_timeout` (None: torch's default)."""
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

    given = kwargs.pop("timeout", default_pg_timeout)  # (a config parser fills in Lightning's default)
    if given is not None and given != default_pg_timeout:
        raise ConfigError("strategy: give collective_timeout (seconds) rather than timeout: the process group's "
                          "timeout is set from it")
    if collective_timeout is None:
        return None
    if float(collective_timeout) <= 0:
        raise ConfigError(f"strategy.collective_timeout must be > 0 seconds (or null: no watchdog), got "
                          f"{collective_timeout}")
    t = float(collective_timeout)
    return timedelta(seconds=t + backstop_margin(t))


def configure_collective_timeout(strategy: Any) -> float | None:
    """The collective timeout (seconds) the watchdog of a run on `strategy` uses, or None (no watchdog).

    A mogao strategy has it as `collective_timeout`. A Lightning strategy with a process group timeout
    (DDP, FSDP, ModelParallel given by name, e.g. `--trainer.strategy=ddp`) that still has torch's default
    (30 minutes) gets `DEFAULT_COLLECTIVE_TIMEOUT`, its process group timeout set `backstop_margin` later;
    one whose timeout was set explicitly keeps it, and the watchdog uses it. Call before the process group
    is created (`mogao fit` does, when it builds the trainer)."""
    if hasattr(strategy, "collective_timeout"):
        value = strategy.collective_timeout
        return None if value is None else float(value)
    current = getattr(strategy, "_timeout", None)
    if not isinstance(current, timedelta):
        return None
    from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout

    if current == default_pg_timeout:
        strategy._timeout = timedelta(seconds=DEFAULT_COLLECTIVE_TIMEOUT + backstop_margin(DEFAULT_COLLECTIVE_TIMEOUT))
        return DEFAULT_COLLECTIVE_TIMEOUT
    return current.total_seconds()


def isolate_restarted_store() -> bool:
    """In a process group that torchrun restarted and that shares the launcher's store
    (TORCHELASTIC_USE_AGENT_STORE=True: the static rendezvous of `--master-addr/--master-port`, and the c10d one
    unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), put this attempt's keys under a prefix of its own
    (`mogao/restart_<n>`), so that no rank reads an address the previous attempt left there (torch 2.13
    reuses the store without a per-attempt prefix: a restarted gloo group then fails with "Connection refused"
    / "Connect timeout" when its ranks do not start at the same moment). Returns whether it did; call before
    the process group is created (`mogao fit` does). Every rank of the group must have been restarted as
    often (torchrun restarts the whole group of each node; with several nodes prefer the c10d rendezvous with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives each attempt a new store)."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or count in ("", "0"):
        return False
    try:
        import importlib

        from torch.distributed import PrefixStore

        handlers = importlib.import_module("torch.distributed.rendezvous")._rendezvous_handlers
        original = handlers["env"]
    except (ImportError, AttributeError, KeyError):
        return False
    if getattr(original, "_mogao_prefix", None) is not None:
        return True

    def prefixed(url: str, **kwargs: Any):
        for store, rank, world in original(url, **kwargs):
            yield PrefixStore(f"mogao/restart_{count}", store), rank, world

    prefixed._mogao_prefix = count  # type: ignore[attr-defined]
    handlers["env"] = prefixed
    return True


def follow_launcher_world(strategy: Any) -> int | None:
    """Under torchrun, when the launcher started another number of nodes than the strategy was configured for
    (`torchrun --nnodes=MIN:MAX` restarting a group that lost or gained nodes), take the launcher's number of
    nodes (its WORLD_SIZE / LOCAL_WORLD_SIZE, when LOCAL_WORLD_SIZE is the configured processes per node);
    returns the new number, None when nothing changed. Lightning would otherwise refuse the run (devices x
    num_nodes must equal the world size). Call before training starts (`mogao fit` does)."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    env = getattr(strategy, "cluster_environment", None)
    if not isinstance(env, TorchElasticEnvironment) or not hasattr(strategy, "num_nodes"):
        return None
    try:
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    per_node = strategy.num_processes
    if local != per_node or world % local or strategy.num_nodes * per_node == world:
        return None
    nodes = world // local
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[mogao] torchrun started {nodes} node(s) of {local} process(es) (world size {world}); training on "
              f"{nodes} node(s) instead of trainer.num_nodes={strategy.num_nodes}", file=sys.stderr, flush=True)
    strategy.num_nodes = nodes
    if getattr(strategy, "_launcher", None) is not None:  # (it keeps the number it was made with)
        strategy._configure_launcher()
    return nodes


def _layer_classes() -> set[type]:
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    from mogao.model.backbone import MoTDecoderLayer

    return {MoTDecoderLayer, SiglipEncoderLayer}


def _dtype(name: str | None, what: str) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"strategy.{what}: '{name}' is not a floating-point torch dtype (e.g. 'bfloat16', "
                          "'float32')")
    return value


def checkpoint_layer(layer: nn.Module) -> None:
    """Recompute `layer`'s activations in the backward pass (non-reentrant `torch.utils.checkpoint`).

    The instance's forward is replaced instead of wrapping the module, so parameter names - and with them
    checkpoints and exported weights - stay those of the unwrapped model."""
    from torch.utils.checkpoint import checkpoint

    if getattr(layer, "_mogao_checkpointed", False):
        return
    forward = layer.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    layer.forward = checkpointed
    layer._mogao_checkpointed = True


class MoTFSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all ranks (pure data parallel, no tensor parallelism), one unit per MoT decoder layer and per
    ViT layer, then the rest of the model as the root unit.

    Args:
        activation_checkpointing: recompute each decoder / ViT layer's activations in the backward pass.
        param_dtype: dtype parameters are all-gathered and computed in (e.g. "bfloat16"); the sharded master
            weights and the optimizer state stay in the dtype the model was built in (fp32). None: no cast.
        reduce_dtype: dtype gradients are reduce-scattered in (default "float32": exact reductions with bf16
            compute). None: the compute dtype.
        reshard_after_forward: free the gathered parameters after each unit's forward (ZeRO-3; False keeps
            them until the backward: ZeRO-2-like, more memory, fewer all-gathers).
        broadcast_from_rank0: only the first rank's weights are used; the others drop theirs to the meta
            device before sharding and receive their shards from it (see the module doc). Not used when the
            module was built with `meta_init: true` (every rank then reads its own shards).
        save_distributed_checkpoint: checkpoints are directories with one shard file per rank (resumable with
            any number of ranks; `mogao checkpoint consolidate` turns one into a saved model), written as a
            unit (a temporary folder renamed into place). False: one full checkpoint file gathered on the
            first rank.
        process_group_backend: "nccl" / "gloo" (default: by device).
        collective_timeout: seconds a rank may wait in a collective before the watchdog ends the run for the
            launcher to restart it (see the module doc; null: no watchdog and torch's default timeout).

    The LightningModule must call `parallelize(self)` from its `configure_model` hook (`MogaoModule` does).
    """

    def __init__(self, activation_checkpointing: bool = True, param_dtype: str | None = None,
                 reduce_dtype: str | None = "float32", reshard_after_forward: bool = True,
                 broadcast_from_rank0: bool = False, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = None,
                 collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT, **kwargs: Any) -> None:
        timeout = _check_timeout(collective_timeout, kwargs)
        if timeout is not None:
            kwargs["timeout"] = timeout
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.collective_timeout = collective_timeout
        self.activation_checkpointing = activation_checkpointing
        self.param_dtype = _dtype(param_dtype, "param_dtype")
        self.reduce_dtype = _dtype(reduce_dtype, "reduce_dtype")
        self.reshard_after_forward = reshard_after_forward
        self.broadcast_from_rank0 = broadcast_from_rank0

    def setup_environment(self) -> None:
        # all ranks form one data-parallel dimension (ModelParallelStrategy's "auto" means one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    # ---- sharding -----------------------------------------------------------------------------------
    def parallelize(self, module: Any) -> None:
        """Shard `module.model` (a `MogaoModel`) in place; called from the module's `configure_model`."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model: nn.Module = module.model
        if any(hasattr(m, "_get_fsdp_state") for m in model.modules()):
            return  # already sharded (configure_model runs again for a later fit/validate)
        mesh = self.device_mesh["data_parallel"]
        full_state, buffers = None, {}
        plan = getattr(module, "weight_plan", None)
        on_meta = any(p.is_meta for p in model.parameters())
        if on_meta and plan is None:
            raise ConfigError("the model's parameters are on the meta device but the module says nowhere to "
                              "load them from (build it with model.meta_init: true)")
        broadcast = self.broadcast_from_rank0 and not on_meta
        if broadcast:
            full_state = model.state_dict() if self.global_rank == 0 else None
            if self.global_rank != 0:
                buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
                _parameters_to_meta(model)
        mp = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        layers = _layer_classes()
        for sub in list(model.modules()):
            if isinstance(sub, tuple(layers)):
                if self.activation_checkpointing:
                    checkpoint_layer(sub)
                fully_shard(sub, mesh=mesh, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=self.reshard_after_forward)
        if on_meta:
            from mogao.training.shard_load import load_weights

            module.weight_load_report = load_weights(model, plan, self.root_device)
        elif broadcast:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            if self.global_rank != 0:
                model.to_empty(device=self.root_device)
                with torch.no_grad():  # buffers are built from the config alike on every rank
                    for name, b in model.named_buffers():
                        b.copy_(buffers[name])
            else:
                model.to(self.root_device)
            set_model_state_dict(model, full_state or {}, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))

    # ---- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Lightning's save (a sharded folder, or one whole file through the checkpoint IO plugin), with the
        model's architecture recorded. A sharded folder is written as a unit: every rank writes its shards
        into a temporary sibling folder named by the first rank, and once every rank is done the first rank
        renames it onto `filepath` (`commit_directory`); a rank killed during the write leaves the previous
        checkpoint of that name (and a temporary folder that the next resume removes)."""
        model = getattr(self.lightning_module, "model", None)
        if model is not None and hasattr(model, "cfg"):
            checkpoint[ARCHITECTURE_KEY] = model_architecture(model)
        if not self._save_distributed_checkpoint or storage_options is not None:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        from mogao.training.checkpointing import commit_directory, temp_path_for
        from mogao.training.faults import fault_point

        final = Path(self.broadcast(str(filepath)))
        tmp = Path(self.broadcast(str(temp_path_for(final)) if self.global_rank == 0 else None))
        super().save_checkpoint(checkpoint, tmp, storage_options)  # every rank's shards, meta.pt from the first
        trainer = getattr(self.lightning_module, "_trainer", None)
        fault_point("save", self.global_rank, getattr(trainer, "global_step", None), trainer)
        self.barrier("mogao: every shard of the checkpoint is written")
        if self.global_rank == 0:
            commit_directory(tmp, final)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        # Whatever path led here (`--ckpt_path`, `trainer.fit(ckpt_path=...)` from Python, SLURM's hpc
        # checkpoints), the checkpoint is checked on every rank just before it is read, and read weights-only:
        # a sharded checkpoint's shard index through a restricted unpickler, `meta.pt` and whole files in
        # torch's weights-only format (the config classes they hold are registered safe globals).
        from mogao.model.checkpoint_files import check_checkpoint, load_checkpoint_file

        path = Path(self.broadcast(checkpoint_path))
        check_checkpoint(path)  # CheckpointError naming the file
        # the optimizer must have the saved param groups before its state is loaded into it: parts unfrozen
        # by a curriculum before the save get their groups now (the module re-applies the rest on load)
        module = self.lightning_module
        meta = path / "meta.pt" if path.is_dir() else None
        if meta is not None and meta.is_file() and hasattr(module, "set_train_parts"):
            saved = load_checkpoint_file(meta).get("mogao")
            if saved:
                module.set_train_parts(list(saved["optimizer_parts"]))
        if meta is not None and meta.is_file():
            return self._load_sharded(path)
        return super().load_checkpoint(checkpoint_path, weights_only=True)

    def _load_sharded(self, path: Path) -> dict[str, Any]:
        """Read a sharded checkpoint folder into the model and optimizers; returns the rest (`meta.pt`).

        A parameter has optimizer state only once it was updated (one whose gradient over the global batch
        was zero so far has none: `MogaoModule.on_before_optimizer_step`), so a checkpoint can hold the state
        of some trainable parameters only. They are read as saved: the others get no state, as in the run
        that wrote it (torch's reader would otherwise ask for every parameter's state, or - told to go on -
        leave the zero state it makes up before reading, which changes the next AdamW steps)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from mogao.model.checkpoint_files import (
            SHARDED_INDEX,
            SHARDED_META,
            load_checkpoint_file,
            read_shard_index,
        )

        saved = set(read_shard_index(path / SHARDED_INDEX).state_dict_metadata)
        model = self.model
        strict = self.lightning_module.strict_loading
        weights = {"state_dict": get_model_state_dict(model)}
        dcp.load(weights, checkpoint_id=path)
        model.load_state_dict(weights["state_dict"], strict=strict)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            target = get_optimizer_state_dict(model, optimizer)  # (every parameter's state, made up)
            kept = {}
            for fqn, entries in target["state"].items():
                entries = {k: v for k, v in entries.items() if f"{key}.state.{fqn}.{k}" in saved}
                if entries:
                    kept[fqn] = entries
            target = {**target, "state": kept}
            dcp.load({key: target}, checkpoint_id=path)
            set_optimizer_state_dict(model, optimizer, optim_state_dict=target,
                                     options=StateDictOptions(strict=False))
        return dict(load_checkpoint_file(path / SHARDED_META))


def _parameters_to_meta(model: nn.Module) -> None:
    """Replace every parameter by an empty one on the meta device (same shape, dtype and requires_grad),
    freeing its memory; buffers stay (they are small, and some are not in the state dict). Tied parameters
    (embeddings and LM head) stay tied."""
    done: dict[int, nn.Parameter] = {}
    for sub in model.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                sub._parameters[name] = done[id(p)]


class MogaoDDPStrategy(DDPStrategy):
    """Lightning's `DDPStrategy` with a collective timeout in seconds (see the module doc):

        --trainer.strategy=mogao.training.strategies.MogaoDDPStrategy --trainer.strategy.collective_timeout=120

    Other arguments go to `lightning.pytorch.strategies.DDPStrategy`.
    """

    def __init__(self, collective_timeout: float | None = DEFAULT_COLLECTIVE_TIMEOUT, **kwargs: Any) -> None:
        timeout = _check_timeout(collective_timeout, kwargs)
        if timeout is not None:
            kwargs["timeout"] = timeout
        super().__init__(**kwargs)
        self.collective_timeout = collective_timeout


class MoTFSDPStrategy(FSDPStrategy):
    """FSDP1 with one wrapping unit per MoT decoder layer (both experts of a layer together) and per ViT layer,
    and activation checkpointing of the same units when `activation_checkpointing` is true. CUDA only.

    `use_orig_params=True` is fixed: without it FSDP1 flattens a unit's parameters into one tensor that must
    be all trainable or all frozen, which frozen experts, the frozen VAE and curriculum unfreezing break.
    Other arguments go to `lightning.pytorch.strategies.FSDPStrategy` (sharding_strategy, state_dict_type,
    cpu_offload, mixed_precision, ...). Prefer `MoTFSDP2Strategy`.
    """

    def __init__(self, activation_checkpointing: bool = True, sharding_strategy: str = "FULL_SHARD",
                 state_dict_type: str = "sharded", limit_all_gathers: bool = True, **kwargs: Any) -> None:
        if kwargs.pop("use_orig_params", True) is not True:
            raise ConfigError("MoTFSDPStrategy: use_orig_params must stay true (frozen parts and unfreezing "
                              "need it)")
        layers = _layer_classes()
        super().__init__(auto_wrap_policy=layers,
                         activation_checkpointing_policy=layers if activation_checkpointing else None,
                         sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                         limit_all_gathers=limit_all_gathers, use_orig_params=True, **kwargs)

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":
            raise ConfigError("MoTFSDPStrategy (FSDP1) needs CUDA devices in this torch release; on CPU use "
                              "mogao.training.strategies.MoTFSDP2Strategy (gloo)")
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        model = getattr(self.lightning_module, "model", None)
        if model is not None and hasattr(model, "cfg"):
            checkpoint[ARCHITECTURE_KEY] = model_architecture(model)
        super().save_checkpoint(checkpoint, filepath, storage_options)


def full_state_dict(model: nn.Module, keep: bool) -> dict[str, torch.Tensor] | None:
    """The whole weights of a sharded model (DTensor parameters) on the CPU where `keep` (typically rank 0),
    else {}; None when the model is not sharded (its own tensors are whole). Every rank must call this: each
    tensor is gathered in turn, so no rank holds more than one whole tensor it does not keep."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    full: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            full[name] = t.detach().cpu()
    return full


def refresh_data_parallel(strategy: Any) -> None:
    """Called after the set of trainable parameters changed (curriculum unfreezing), wrap the module in a new
    `DistributedDataParallel`: DDP reduces the gradients of the parameters that required them when it was
    built, so a part unfrozen later would otherwise train on each rank's own gradients and the replicas would
    drift apart. (FSDP2 needs nothing: it reads `requires_grad` at every step.) Every rank changes its parts at
    the same step, so the new wrapper's start-up broadcast is reached by all."""
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return
    strategy.model = strategy.lightning_module
    strategy.configure_ddp()

