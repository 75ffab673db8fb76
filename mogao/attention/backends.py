"""The registry attention backends are chosen through by config name. What they share (the `EctfAttention`
interface, the input checks) is `mogao.attention.base`; each backend module imports only that."""

from __future__ import annotations

from collections.abc import Callable

from mogao.attention.base import EctfAttention
from mogao.errors import ConfigError


def _sdpa_dense() -> EctfAttention:
    from mogao.attention.sdpa_dense import SdpaDenseAttention

    return SdpaDenseAttention()


def _flash_varlen() -> EctfAttention:
    from mogao.attention.flash_varlen import FlashVarlenAttention

    return FlashVarlenAttention()


def _flex() -> EctfAttention:
    from mogao.attention.flex import FlexEctfAttention

    return FlexEctfAttention()


# Factories import lazily: the flex and flash modules pull in heavier torch machinery only when chosen.
_BACKENDS: dict[str, Callable[[], EctfAttention]] = {
    "sdpa_dense": _sdpa_dense,
    "flash_varlen": _flash_varlen,
    "flex": _flex,
}


def attention_backend_names() -> list[str]:
    """The names `get_attention_backend` accepts."""
    return list(_BACKENDS)


def get_attention_backend(name: str) -> EctfAttention:
    """A fresh backend by its config name: "sdpa_dense" | "flash_varlen" | "flex"."""
    try:
        factory = _BACKENDS[name]
    except KeyError:
        valid = ", ".join(repr(n) for n in _BACKENDS)
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {valid}") from None
    return factory()
