"""The ECTF attention mask, stated once as rules on per-token ids: the reference every backend is tested against.

Efficient Complete Teacher Forcing (Mogao): every generation target of an interleaved sample is trained in one
forward pass. Its noisy copy sees the clean past; everything after it sees only its clean copies.

The rules hold for both sequence formats (`mogao.sequence.formats`): the markers of a wrapped copy (BAGEL's
format) carry their copy's modality and block id (`TokenLayout`), so they are part of the copy - bidirectional
inside it and, for a noisy copy, unseen by anything after it. With `text_sees_vae` these rules are then BAGEL's
own mask (data/data_utils.py `prepare_attention_mask_per_sample`: a text chunk causal, a clean copy full, a noisy
copy full and hidden from every other token).
"""

from __future__ import annotations

import torch

from mogao.sequence.layout import TokenLayout
from mogao.sequence.modality import Modality


def ectf_allowed(
    q_sample: torch.Tensor, q_order: torch.Tensor, q_mod: torch.Tensor, q_block: torch.Tensor,
    k_sample: torch.Tensor, k_order: torch.Tensor, k_mod: torch.Tensor, k_block: torch.Tensor,
    text_sees_vae: bool,
) -> torch.Tensor:
    """Whether query q may attend to key k. Broadcasts over its arguments (per-token ids)."""
    same_sample = q_sample == k_sample
    same_block = (q_block == k_block) & (q_block >= 0)
    # compare with plain ints: torch.compile does not trace comparisons of tensors with IntEnum members
    noisy, vit, vae_clean = int(Modality.VAE_NOISY), int(Modality.VIT), int(Modality.VAE_CLEAN)
    q_noisy = q_mod == noisy
    k_noisy = k_mod == noisy
    earlier_or_same = k_order <= q_order
    # rule 4: nothing attends to a noisy copy except that copy (and rule 3: a noisy copy sees itself)
    to_noisy = k_noisy & same_block
    # rule 3: a noisy copy sees the clean tokens before its image (it is ordered before its clean copies)
    noisy_to_clean = q_noisy & ~k_noisy & (k_order < q_order)
    # rule 2: clean tokens attend causally to clean tokens, bidirectionally inside their own copy
    clean_to_clean = ~q_noisy & ~k_noisy & (earlier_or_same | same_block)
    if not text_sees_vae:
        # rule 5: text and ViT queries never see VAE tokens
        q_und = q_mod <= vit
        clean_to_clean = clean_to_clean & ~(q_und & (k_mod == vae_clean))
    return same_sample & (to_noisy | noisy_to_clean | clean_to_clean)


def ectf_mask(layout: TokenLayout, text_sees_vae: bool = False) -> torch.Tensor:
    """Dense (N, N) boolean mask in physical order; True = query row may attend to key column."""
    return ectf_allowed(
        layout.sample[:, None], layout.order[:, None], layout.modality[:, None], layout.block[:, None],
        layout.sample[None, :], layout.order[None, :], layout.modality[None, :], layout.block[None, :],
        text_sees_vae,
    )
