"""The named choices of how a sequence is laid out: its format (which tokens an image and a text chunk become)
and its position scheme (which rotary position each token gets). The model config names both; the lowering
(`mogao.data.plan`) and the cached generation loop (`mogao.inference`) follow them.

Sequence formats:
- "mogao": a text segment is its tokens; an image is `<|vision_start|>`, its copies (noisy VAE if generated,
  ViT, clean VAE), `<|vision_end|>` - the markers are ordinary causal text tokens.
- "bagel" (BAGEL, ByteDance-Seed/Bagel `data/dataset_base.py` 316-458): a text segment is
  `<|im_start|>` + its tokens + `<|im_end|>`; every image copy (noisy VAE if generated, clean VAE, ViT - in
  that order) is wrapped in its OWN `<|vision_start|>` ... `<|vision_end|>`, the two markers inside the copy's
  bidirectional block (a wrapped copy, `Span.markers`), read by the understanding expert.

Position schemes:
- "il_rope": IL-RoPE (`positions.il_rope_positions`): all copies of an image share T, (H, W) = the cell.
- "mrope": M-RoPE (`positions.mrope_positions`): as IL-RoPE with (H, W) = (T + row, T + column), the next T one
  past the image's largest position; every angle is relative (a shifted sample computes the same). Cells are
  carried apart (`grid_cells`).
- "mrope_aligned": M-RoPE with every image after a sample's first moved up to a whole number of 32-position
  strides after the image before it (`positions.aligned_mrope_positions`): consecutive images of a story or an
  edit are one fixed offset apart.
- "bagel": BAGEL's 1-D RoPE written as (p, p, p) (`positions.bagel_positions`): every token of one image copy,
  markers included, takes one position p; text advances by its length, a clean copy by 1, a noisy copy by 0.
  The (row, column) of an image token is then carried apart from its position (`grid_cells`).
"""

from __future__ import annotations

from mogao.errors import ConfigError
from mogao.sequence.modality import Modality

SEQUENCE_FORMATS = ("mogao", "bagel")
POSITION_SCHEMES = ("il_rope", "mrope", "mrope_aligned", "bagel")

# the copies of an image in each format's order; the noisy copy always comes first (the mask relies on it)
_COPY_ORDER = {"mogao": (Modality.VAE_NOISY, Modality.VIT, Modality.VAE_CLEAN),
               "bagel": (Modality.VAE_NOISY, Modality.VAE_CLEAN, Modality.VIT)}


def check_choice(value: object, choices: tuple[str, ...], field: str) -> str:
    """`value` when it is one of `choices`, else a ConfigError naming `field`."""
    if value not in choices:
        raise ConfigError(f"{field} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return str(value)


def image_copies(sequence_format: str, generate: bool, clean: bool) -> list[Modality]:
    """The copies of one image in the format's order: the noisy VAE copy when `generate`, the ViT copy, and the
    clean VAE copy when `clean`."""
    want = {Modality.VAE_NOISY: generate, Modality.VIT: True, Modality.VAE_CLEAN: clean}
    return [kind for kind in _COPY_ORDER[check_choice(sequence_format, SEQUENCE_FORMATS, "sequence_format")]
            if want[kind]]
