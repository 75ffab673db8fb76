"""Attention over packed batches: the ECTF reference mask and the backends that compute it."""

from mogao.attention.backends import attention_backend_names, get_attention_backend
from mogao.attention.base import EctfAttention
from mogao.attention.mask import ectf_allowed, ectf_mask

__all__ = [
    "EctfAttention",
    "attention_backend_names",
    "ectf_allowed",
    "ectf_mask",
    "get_attention_backend",
]
