"""Training FLOPs of one packed batch, for throughput and model-FLOPs-utilisation (MFU) figures.

What is counted (one forward + backward of `MogaoModel` on a `PackedBatch`):

- Dense matmuls of the backbone, 6 FLOPs per parameter per token (2 forward, 4 backward): the understanding
  expert's `nn.Linear` parameters for every text and ViT token, the generation expert's for every clean and
  noisy VAE token, and the LM head only for the loss-bearing text tokens (the only rows it is applied to).
  Parameters are read off the modules (`in_features * out_features` + bias), so LoRA adapters, 4-bit layers
  and any model family count correctly. Embedding lookups and norms are not matmuls and are left out.
- Attention scores and the weighted sum of values: 4 * head_dim * heads FLOPs per allowed (query, key) pair
  of the ECTF mask, per layer, times 3 for forward + backward. The pairs are counted exactly in closed form
  from the layout (`keys_per_query`), in O(N), never building the (N, N) mask. Backends that compute masked
  entries anyway (dense SDPA) or recompute in the backward pass (FlashAttention) do more work than this:
  these are model FLOPs, the convention MFU is defined with.
- The vision side: the ViT's forward FLOPs (times 3 when any ViT parameter trains), the connector (2 per
  parameter per ViT token, times 3 when the ViT or the connector trains), and the frozen autoencoder's
  encoder (forward only; its decoder never runs in training). ViT and autoencoder FLOPs are counted by
  `torch.utils.flop_counter.FlopCounterMode` running a hook-free copy of the actual module on the meta device
  (no memory, no compute, no collectives), once per image size; the result is cached per module and size.
  Modules sharded by FSDP cannot be copied: they are rebuilt from their config on the meta device instead.
- The latent projections (in: every VAE token, out: every noisy token) and the timestep embedding/AdaLN
  MLPs (one row per distinct timestep, not per token), at 6 per parameter per row.
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mogao.sequence.layout import TokenLayout
from mogao.sequence.modality import Modality

__all__ = [
    "FlopCount",
    "image_forward_flops",
    "keys_per_query",
    "linear_params",
    "peak_flops",
    "training_flops",
]

_COMPONENTS = (
    "backbone_und",
    "backbone_gen",
    "lm_head",
    "attention",
    "connector",
    "latent_proj",
    "timestep",
    "vit",
    "autoencoder",
)


@dataclass
class FlopCount:
    """FLOPs of one training step (forward + backward) of a packed batch, by component.

    backbone_und / backbone_gen: expert matmuls on understanding (text + ViT) / generation (VAE) tokens
    lm_head: the LM head on the loss-bearing text tokens
    attention: ECTF attention (scores + values), all layers
    connector / latent_proj / timestep: the small adapters around the backbone
    vit / autoencoder: the vision encoders (autoencoder: forward only, it is frozen)
    total: the sum of the above

    Not FLOPs, kept for reference: `tokens` (packed tokens), `attention_pairs` (allowed (query, key) pairs of
    the ECTF mask, i.e. per layer and head).
    """

    backbone_und: int = 0
    backbone_gen: int = 0
    lm_head: int = 0
    attention: int = 0
    connector: int = 0
    latent_proj: int = 0
    timestep: int = 0
    vit: int = 0
    autoencoder: int = 0
    tokens: int = 0
    attention_pairs: int = 0
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = sum(getattr(self, name) for name in _COMPONENTS)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# ---- ECTF pair counting ---------------------------------------------------------------------------


def _exclusive_cumsum_per_sample(x: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """For tokens in logical order (samples contiguous, in order): how many earlier tokens of the same sample
    have x set."""
    x = x.long()
    before = torch.cumsum(x, 0) - x
    counts = torch.bincount(sample)
    starts = torch.cumsum(counts, 0) - counts
    return before - before[starts][sample]


def keys_per_query(layout: TokenLayout, text_sees_vae: bool = False) -> torch.Tensor:
    """Number of keys each query may attend to under the ECTF mask, (N,) int64 in physical order.

    Equal to `ectf_mask(layout, text_sees_vae).sum(1)`, in O(N) from the mask rules (`mogao.attention.mask`):
    with C = the clean (non-noisy) tokens of the sample before the query - or, for text and ViT queries when
    text may not see VAE tokens, only the text and ViT tokens before it -
      text query:  C + 1 (causal, itself included);
      image copy:  C at the copy's first token + the copy's size (bidirectional inside the copy; a noisy copy
                   sees the clean tokens before its image and itself, never its own clean copies).
    """
    n = layout.num_tokens
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=layout.sample.device)
    li = layout.physical_of_logical  # logical position -> physical position
    mod, sample, block = layout.modality[li], layout.sample[li], layout.block[li]
    und = mod <= int(Modality.VIT)
    clean_before = _exclusive_cumsum_per_sample(mod != int(Modality.VAE_NOISY), sample)
    if text_sees_vae:
        before = clean_before
    else:
        before = torch.where(und, _exclusive_cumsum_per_sample(und, sample), clean_before)
    is_image = block >= 0
    counts = before + 1
    if bool(is_image.any()):
        blk = block[is_image]
        n_blocks = int(blk.max()) + 1
        # the count of earlier keys only grows along a copy, so its minimum is the value at the copy's start
        start = torch.full((n_blocks,), n, dtype=torch.long, device=blk.device)
        start = start.scatter_reduce(0, blk, before[is_image], reduce="amin")
        size = torch.bincount(blk, minlength=n_blocks)
        counts = counts.clone()
        counts[is_image] = start[blk] + size[blk]
    out = torch.empty_like(counts)
    out[li] = counts
    return out


# ---- parameters read off the modules ---------------------------------------------------------------


def linear_params(module: nn.Module | None) -> int:
    """Parameters of every `nn.Linear` inside `module` (weights from in/out features, so 4-bit and sharded
    layers count their logical size), bias included."""
    if module is None:
        return 0
    total = 0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
    return total


def _any_trainable(*modules: nn.Module) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


# ---- vision encoders on the meta device -------------------------------------------------------------


def _rebuild_on_meta(module: nn.Module) -> nn.Module:
    """A fresh `module` of the same architecture on the meta device, rebuilt from its config: for modules that
    cannot be deep-copied (layers sharded by FSDP2 refuse it)."""
    from mogao.model.autoencoder import DiffusersVAE
    from mogao.model.vision import VisionEncoder

    with torch.device("meta"):
        if isinstance(module, VisionEncoder):
            return VisionEncoder.from_config(module.config, feature_layer=module.feature_layer)
        if isinstance(module, DiffusersVAE):
            return DiffusersVAE.from_config(dict(module.config))
    raise TypeError(f"no config to rebuild a {type(module).__name__} from")


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` whose parameters and buffers live on the meta device and which has no hooks (so a
    data-parallel or sharding wrapper's hooks never fire from a FLOP count). Sharded modules are rebuilt
    from their config instead."""
    if any(hasattr(m, "_get_fsdp_state") or type(m).__name__.startswith("FullyShardedDataParallel")
           for m in module.modules()):
        return _rebuild_on_meta(module)
    memo: dict[int, object] = {}
    for t in (*module.parameters(), *module.buffers()):
        meta = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        )
    clone = copy.deepcopy(module, memo)
    for m in clone.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            getattr(m, hooks).clear()
    return clone


class _ImageFlops:
    """Forward FLOPs of one vision module per input image size, counted once on a meta copy."""

    def __init__(self, module: nn.Module, run: Callable[[nn.Module, torch.Tensor], object]) -> None:
        self.run = run
        self.by_size: dict[tuple[int, int], int] = {}
        try:
            self.shadow: nn.Module | None = _meta_copy(module)
        except Exception as err:  # a wrapper that cannot be copied: report once, count 0
            self._fail(module, err)

    def _fail(self, module: nn.Module, err: Exception) -> None:
        self.shadow = None
        warnings.warn(
            f"FLOPs of {type(module).__name__} cannot be counted on a meta copy ({type(err).__name__}: {err}); "
            "they are left out of the training FLOPs",
            RuntimeWarning,
            stacklevel=3,
        )

    def __call__(self, module: nn.Module, size: tuple[int, int]) -> int:
        if size not in self.by_size:
            if self.shadow is None:
                return 0
            from torch.utils.flop_counter import FlopCounterMode

            try:
                with torch.no_grad(), FlopCounterMode(display=False) as counter:
                    self.run(self.shadow, torch.zeros(3, *size, device="meta"))
            except Exception as err:
                self._fail(module, err)
                return 0
            self.by_size[size] = int(counter.get_total_flops())
        return self.by_size[size]


_IMAGE_FLOPS: weakref.WeakKeyDictionary[nn.Module, _ImageFlops] = weakref.WeakKeyDictionary()


def _run_vit(module: nn.Module, image: torch.Tensor) -> object:
    return module([image])


def _run_encoder(module: nn.Module, image: torch.Tensor) -> object:
    return module.encode([image])


def image_forward_flops(module: nn.Module, size: tuple[int, int], encoder: bool = False) -> int:
    """Forward FLOPs of one (3, H, W) image through a ViT (`module([image])`) or, with `encoder=True`, an
    autoencoder's `encode([image])`, counted with `FlopCounterMode` on a meta copy and cached per size."""
    counter = _IMAGE_FLOPS.get(module)
    if counter is None:
        counter = _ImageFlops(module, _run_encoder if encoder else _run_vit)
        _IMAGE_FLOPS[module] = counter
    return counter(module, (int(size[0]), int(size[1])))


def _images_flops(module: nn.Module, images: Iterable[torch.Tensor], encoder: bool) -> int:
    return sum(image_forward_flops(module, tuple(img.shape[-2:]), encoder) for img in images)


# ---- the whole step ---------------------------------------------------------------------------------


def training_flops(model: nn.Module, batch) -> FlopCount:
    """FLOPs of one forward + backward of `model` (a `MogaoModel`) on `batch` (a `PackedBatch`).

    See the module doc for what each component counts. Costs O(N) vectorised integer ops on the batch's
    device and one device-to-host copy; ViT/autoencoder FLOPs are cached per image size.
    """
    lay: TokenLayout = batch.layout
    backbone = model.backbone
    n_und, n_clean, n_noisy = lay.n_und, lay.n_gen_clean, lay.n_noisy
    n_vit = int(batch.vit_index.numel())
    loss_text = (batch.labels[:n_und] != -100).sum()
    pairs = keys_per_query(lay, bool(model.cfg.text_sees_vae)).sum()
    n_loss_text, n_pairs = (int(v) for v in torch.stack((loss_text, pairs)).tolist())

    und_params = sum(linear_params(layer.und) for layer in backbone.layers)
    gen_params = sum(linear_params(layer.gen) for layer in backbone.layers)
    n_heads = int(backbone.config.num_attention_heads)
    attention = sum(4 * layer.head_dim * n_heads * n_pairs * 3 for layer in backbone.layers)

    vision_trains = _any_trainable(model.vit, model.connector)
    vit_fwd = _images_flops(model.vit, batch.vit_pixels, encoder=False) if batch.num_images else 0
    encoded = batch.encoded_images.tolist() if batch.num_images else []
    ae_fwd = _images_flops(model.autoencoder, [p for p, e in zip(batch.vae_pixels, encoded) if e], encoder=True)

    n_gen = n_clean + n_noisy
    rows = (1 + int(batch.image_is_target.sum())) if n_gen else 0  # distinct timesteps: clean + each target
    time_params = linear_params(model.time_embed) + linear_params(getattr(model, "additive_time", None))
    time_params += sum(linear_params(getattr(layer, "gen_adaln", None)) for layer in backbone.layers)

    return FlopCount(
        backbone_und=6 * und_params * n_und,
        backbone_gen=6 * gen_params * n_gen,
        lm_head=6 * linear_params(backbone.lm_head) * n_loss_text,
        attention=attention,
        connector=2 * linear_params(model.connector) * n_vit * (3 if vision_trains else 1),
        latent_proj=6
        * (
            linear_params(model.latent_proj.proj_in) * n_gen
            + linear_params(model.latent_proj.proj_out) * n_noisy
        ),
        timestep=6 * time_params * rows,
        vit=vit_fwd * (3 if _any_trainable(model.vit) else 1),
        autoencoder=ae_fwd,
        tokens=lay.num_tokens,
        attention_pairs=n_pairs,
    )


def peak_flops(device: torch.device | str, dtype: torch.dtype | str) -> float | None:
    """Theoretical peak FLOP/s of one device for `dtype` (Lightning's table), or None on CPU or an unknown
    accelerator."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and torch.cuda.is_available():
        dense = _dense_hopper_peak(torch.cuda.get_device_name(device), dtype)
        if dense is not None:
            return dense
    from lightning.fabric.utilities.throughput import get_available_flops

    try:
        value = get_available_flops(device, dtype)
    except Exception:
        return None
    return float(value) if value else None


# Dense (not 2:4-sparse) tensor-core peaks of the SXM Hopper parts, from NVIDIA's H100/H200 datasheets. Lightning's
# table does not recognise a device named plain "NVIDIA H200" and lists the H200's sparse bf16 figure.
_HOPPER_SXM_DENSE = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tfloat32": 494.7e12, torch.float32: 66.9e12}


def _dense_hopper_peak(name: str, dtype: torch.dtype | str) -> float | None:
    """The dense peak of an H100 SXM (HBM3) or H200 (SXM / plain name) for `dtype`, else None."""
    chip = name.lower()
    sxm = ("h200" in chip and "nvl" not in chip) or ("h100" in chip and ("hbm3" in chip or "sxm" in chip))
    return _HOPPER_SXM_DENSE.get(dtype) if sxm else None
