"""`flex`: the ECTF mask as a FlexAttention `mask_mod` over per-token ids.

The mask_mod looks the rule up in a small table computed by `mask.ectf_allowed`, so the rule stays stated in
one place (see `_rule_table` for why it does not call it directly). The packed length is padded
to a bucket (`padded_length`) so a compiled kernel is reused across batches; padded tokens get a sample id of
their own and so attend only to themselves.

On CUDA, flex_attention runs compiled. On CPU it runs eagerly (PyTorch's unfused reference: it materialises
the scores, fine for tests and tiny models). PyTorch has no CPU backward for FlexAttention, so on CPU a call
that needs gradients raises `ConfigError`; train on CPU with `sdpa_dense` or `flash_varlen`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from mogao.attention.base import check_qkv
from mogao.attention.mask import ectf_allowed
from mogao.errors import ConfigError
from mogao.sequence.layout import TokenLayout
from mogao.sequence.modality import Modality

BLOCK_SIZE = 128  # FlexAttention's default tile; buckets are multiples of it


def padded_length(n: int) -> int:
    """The bucket a pack of n tokens is padded to: a power of two up to 8192 tokens, then multiples of 8192.

    Few distinct lengths means few recompiles (each bucket compiles once; dynamo's recompile limit, 8 by
    default, caps how many buckets one process should see); padded tokens only attend to themselves, and their
    blocks are skipped by the block mask, so the padding costs little.
    """
    if n <= BLOCK_SIZE:
        return BLOCK_SIZE
    if n <= 8192:
        return 1 << (n - 1).bit_length()
    return -(-n // 8192) * 8192


@dataclass
class FlexPlan:
    """What `FlexEctfAttention.prepare` builds once per batch."""

    block_mask: BlockMask
    num_tokens: int
    padded: int
    device: torch.device


def _padded_ids(layout: TokenLayout, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, dev = layout.num_tokens, layout.sample.device
    extra = length - n
    first_free = int(layout.sample.max()) + 1 if n else 0
    pad_sample = first_free + torch.arange(extra, device=dev)  # one fresh sample per padded token
    zeros = torch.zeros(extra, dtype=torch.long, device=dev)
    sample = torch.cat([layout.sample, pad_sample])
    order = torch.cat([layout.order, zeros])
    modality = torch.cat([layout.modality, zeros + int(Modality.TEXT)])
    block = torch.cat([layout.block, zeros - 1])
    return sample, order, modality, block


@functools.lru_cache(maxsize=2)
def _rule_table(text_sees_vae: bool) -> Tensor:
    """`ectf_allowed` tabulated over everything it reads: (q_mod, k_mod, same sample, same block, order cmp).

    flex_attention traces its mask_mod with dynamo even in eager mode, and dynamo (torch 2.13) cannot trace
    tensor comparisons against IntEnum members as `ectf_allowed` writes them (`==` silently turns into a
    Python bool, `<=` fails). Evaluating the rule eagerly on one representative pair per feature combination
    keeps `ectf_allowed` the single statement of the rule; it is exact because the rule depends on the ids only
    through these features (a query's block id is >= 0 exactly when it is an image token). (4*4*2*2*3,) bool.
    """
    qm, km, ss, sb, cmp = torch.meshgrid(
        torch.arange(4), torch.arange(4), torch.arange(2), torch.arange(2), torch.arange(3), indexing="ij"
    )
    q_block = torch.where(qm == int(Modality.TEXT), -1, 5)
    allowed = ectf_allowed(
        torch.zeros_like(qm), torch.full_like(qm, 10), qm, q_block,
        1 - ss, 9 + cmp, km, torch.where(sb == 1, q_block, q_block + 1),
        text_sees_vae,
    )
    return allowed.flatten()


def ectf_mask_mod(layout: TokenLayout, text_sees_vae: bool, length: int) -> Callable[..., Tensor]:
    """A FlexAttention mask_mod(b, h, q_idx, kv_idx) for the layout padded to `length` tokens."""
    sample, order, modality, block = _padded_ids(layout, length)
    table = _rule_table(text_sees_vae).to(layout.sample.device)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same_sample = (sample[q_idx] == sample[kv_idx]).long()
        same_block = (block[q_idx] == block[kv_idx]).long()
        cmp = (order[kv_idx] > order[q_idx]).long() - (order[kv_idx] < order[q_idx]).long() + 1
        feature = (((modality[q_idx] * 4 + modality[kv_idx]) * 2 + same_sample) * 2 + same_block) * 3 + cmp
        return table[feature]

    return mask_mod


@functools.lru_cache(maxsize=1)
def _compiled_flex() -> Callable[..., Tensor]:
    # one compiled callable for the process; bucketed lengths keep its shape guards stable
    return torch.compile(flex_attention, dynamic=False)


class FlexEctfAttention:
    """FlexAttention with the ECTF mask_mod (see the module docstring)."""

    name = "flex"

    def prepare(self, layout: TokenLayout, text_sees_vae: bool) -> FlexPlan:
        length = padded_length(layout.num_tokens)
        device = layout.sample.device
        block_mask = create_block_mask(
            ectf_mask_mod(layout, text_sees_vae, length), None, None, length, length, device=device,
            BLOCK_SIZE=BLOCK_SIZE, _compile=device.type == "cuda",
        )
        return FlexPlan(block_mask=block_mask, num_tokens=layout.num_tokens, padded=length, device=device)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, prepared: object, scale: float | None = None) -> Tensor:
        plan = prepared
        if not isinstance(plan, FlexPlan):
            raise TypeError(f"flex got a {type(plan).__name__} plan; call this backend's prepare() first")
        check_qkv(q, k, v, plan.num_tokens, self.name, plan.device)
        on_cuda = q.device.type == "cuda"
        if not on_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            raise ConfigError(
                "attention backend 'flex' has no backward on CPU (PyTorch's FlexAttention is CUDA-only for "
                "training); use 'sdpa_dense' or 'flash_varlen' to train on CPU, or run under torch.no_grad()"
            )
        extra = plan.padded - plan.num_tokens

        def to_bhnd(x: Tensor) -> Tensor:
            x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, extra)) if extra else x
            return x.permute(1, 0, 2)[None]  # (N, H, D) -> (1, H, L, D)

        kwargs = {"block_mask": plan.block_mask, "scale": scale, "enable_gqa": q.shape[1] != k.shape[1]}
        if on_cuda:
            out = _compiled_flex()(to_bhnd(q), to_bhnd(k), to_bhnd(v), **kwargs)
        else:
            with warnings.catch_warnings():
                # the "called without torch.compile" notice: eager is the intended CPU path
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                out = flex_attention(to_bhnd(q), to_bhnd(k), to_bhnd(v), **kwargs)
        return out[0, :, : plan.num_tokens].transpose(0, 1)  # (1, Hq, L, D) -> (N, Hq, D)
