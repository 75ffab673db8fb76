"""FlashAttention-2 varlen kernels behind one internal signature, and the rule that picks them.

    varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_left, window_right, scale) -> (out, lse)
    varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, window_left, window_right, scale)
        -> (dq, dk, dv)

q: (Tq, Hq, D), k/v: (Tk, Hk, D) with Hq % Hk == 0 (the kernels take GQA natively), out: (Tq, Hq, D),
lse: (Hq, Tq) fp32 (the unpadded varlen layout), cu_*: int32 cumulative lengths on q's device.

Implementations, in the order they are picked on CUDA for fp16/bf16:
- "flash_attn": the `flash_attn` package's low-level varlen ops (when it is installed);
- "torch": PyTorch's bundled FA2 (`torch.ops.aten._flash_attention_forward/_backward`);
- "emulator": `fa2_emulator`, pure PyTorch, any device and dtype (CPU, and fp32/fp64 on CUDA).
`FORCE_KERNELS` (or the `MOGAO_FA2_KERNELS` environment variable, or an explicit argument) overrides the choice.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from mogao.attention import fa2_emulator
from mogao.errors import ConfigError

log = logging.getLogger(__name__)

KERNEL_NAMES = ("flash_attn", "torch", "emulator")

FORCE_KERNELS: str | None = None
"""Module-level override of the kernel choice ("flash_attn" | "torch" | "emulator"); None = automatic."""


@dataclass(frozen=True)
class Fa2Kernels:
    """A forward/backward pair with the signature in the module docstring."""

    name: str
    varlen_fwd: Callable[..., tuple[Tensor, Tensor]]
    varlen_bwd: Callable[..., tuple[Tensor, Tensor, Tensor]]


# ---------------------------------------------------------------------------------------------- flash_attn


@functools.lru_cache(maxsize=1)
def _flash_attn_interface() -> ModuleType | None:
    try:
        from flash_attn import flash_attn_interface
    except Exception:  # not installed, or built against another torch/CUDA
        return None
    return flash_attn_interface


_FA_OPTIONAL = {  # every optional argument of the low-level varlen ops across flash_attn 2.6-2.8, disabled
    "dropout_p": 0.0, "softcap": 0.0, "alibi_slopes": None, "return_softmax": False, "block_table": None,
    "leftpad_k": None, "seqused_k": None, "deterministic": False, "rng_state": None, "zero_tensors": False,
}


def _fa_kwargs(fn: object, scale: float, causal: bool, window_left: int, window_right: int) -> dict[str, object]:
    """Keyword arguments for one of flash_attn's low-level varlen ops, fitted to the installed version."""
    target = getattr(fn, "_init_fn", fn)  # flash_attn >= 2.7 wraps them as torch custom ops
    try:
        params = set(inspect.signature(target).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        params = set(_FA_OPTIONAL) | {"window_size_left"}
    kwargs: dict[str, object] = {"softmax_scale": scale, "causal": causal}
    # 2.7+ takes window_size_left/right; 2.6 took one window_size tuple
    if "window_size_left" in params:
        kwargs.update(window_size_left=window_left, window_size_right=window_right)
    else:
        kwargs["window_size"] = (window_left, window_right)
    kwargs.update({k: v for k, v in _FA_OPTIONAL.items() if k in params})
    return kwargs


def _flash_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    causal: bool, window_left: int, window_right: int, scale: float,
) -> tuple[Tensor, Tensor]:
    fn = _flash_attn_interface()._flash_attn_varlen_forward  # type: ignore[union-attr]
    res = fn(q, k, v, cu_q, cu_k, max_q, max_k, **_fa_kwargs(fn, scale, causal, window_left, window_right))
    # 2.6+: (out, lse, S_dmask, rng_state); 2.5: (out, q, k, v, out_padded, lse, S_dmask, rng_state)
    out, lse = (res[0], res[5]) if len(res) == 8 else (res[0], res[1])
    return out, lse


def _flash_attn_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    causal: bool, window_left: int, window_right: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = _flash_attn_interface()._flash_attn_varlen_backward  # type: ignore[union-attr]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # writes dq, dk, dv in place (dk/dv already summed over each kv head's query group)
    fn(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
       **_fa_kwargs(fn, scale, causal, window_left, window_right))
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------- torch bundled


def _torch_flash_available() -> bool:
    if not hasattr(torch.ops.aten, "_flash_attention_forward") or not torch.cuda.is_available():
        return False
    check = getattr(torch.backends.cuda, "is_flash_attention_available", None)
    return bool(check()) if check is not None else True


def _torch_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    causal: bool, window_left: int, window_right: int, scale: float,
) -> tuple[Tensor, Tensor]:
    out, lse, _rng, _unused, _debug = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
        scale=scale, window_size_left=window_left, window_size_right=window_right,
    )
    return out, lse


def _torch_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    causal: bool, window_left: int, window_right: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    # no dropout, so the rng state is never read; same placeholders as torch.nn.attention.varlen
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)
    unused = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, unused,
        scale=scale, window_size_left=window_left, window_size_right=window_right,
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------- selection

FLASH_ATTN = Fa2Kernels("flash_attn", _flash_attn_fwd, _flash_attn_bwd)
TORCH = Fa2Kernels("torch", _torch_fwd, _torch_bwd)
EMULATOR = Fa2Kernels("emulator", fa2_emulator.varlen_fwd, fa2_emulator.varlen_bwd)


def _available(name: str, device: torch.device) -> bool:
    if name == "emulator":
        return True
    if device.type != "cuda":
        return False
    return _flash_attn_interface() is not None if name == "flash_attn" else _torch_flash_available()


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def select_kernels(device: torch.device | str, dtype: torch.dtype, force: str | None = None) -> Fa2Kernels:
    """The kernels for tensors on `device` of `dtype`.

    Order of precedence: `force`, then `FORCE_KERNELS`, then `$MOGAO_FA2_KERNELS`, then automatic (flash_attn,
    torch, emulator). A forced real kernel that cannot run here raises `ConfigError`.
    """
    device = torch.device(device)
    choice = force or FORCE_KERNELS or os.environ.get("MOGAO_FA2_KERNELS") or None
    by_name = {"flash_attn": FLASH_ATTN, "torch": TORCH, "emulator": EMULATOR}
    if choice is not None:
        if choice not in by_name:
            raise ConfigError(f"unknown FA2 kernels {choice!r}; choose one of {', '.join(KERNEL_NAMES)}")
        if not _available(choice, device):
            raise ConfigError(
                f"FA2 kernels {choice!r} are not available on {device} (flash_attn installed: "
                f"{_flash_attn_interface() is not None}); use 'emulator' or the 'sdpa_dense' backend"
            )
        return by_name[choice]
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        for name in ("flash_attn", "torch"):
            if _available(name, device):
                return by_name[name]
    if device.type == "cuda":
        _warn_once(
            f"flash_varlen: no FlashAttention-2 kernel for {dtype} on {device}; running the pure-PyTorch "
            "emulator (slow). Use bf16/fp16 or the 'sdpa_dense' backend."
        )
    return EMULATOR


def check_kernel_inputs(kernels: Fa2Kernels, q: Tensor) -> None:
    """The real kernels' limits, checked up front so the error says what to change."""
    if kernels.name == "emulator":
        return
    d = q.shape[-1]
    if d % 8 != 0 or d > 256:
        raise ValueError(
            f"flash_varlen: FlashAttention-2 needs head_dim a multiple of 8 and at most 256, got {d}; "
            "use the 'sdpa_dense' or 'flex' attention backend for this model"
        )
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash_varlen: FA2 kernels {kernels.name!r} need fp16/bf16, got {q.dtype}")
