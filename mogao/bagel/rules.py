"""BAGEL's conventions as small pure functions, each docstring stating the definition it implements.

Read from ByteDance-Seed/Bagel (the file and line each rule comes from is named in its docstring); these are
the facts a mogao model must reproduce to run a BAGEL checkpoint, written down once so they can be tested:

- `position_ids`: the 1-D rotary position of every token of an interleaved sequence;
- `sincos_position_table`, `flattened_position_ids`: the frozen 2-D tables added to ViT and VAE tokens;
- `timestep_embedding`: the sinusoid fed to the timestep MLP;
- `shift_timestep`, `noised_latent`, `velocity_target`, `training_timestep`, `sampling_timesteps`,
  `euler_step`: the flow-matching convention;
- `cfg_applies`, `combine_cfg`: classifier-free guidance with its interval and renormalisation;
- `BagelTokens`, `special_token_ids`, `wrap_text`, `wrap_image`: the special tokens and how text chunks and
  image copies are wrapped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mogao.errors import ConfigError

# ---- 1-D positions --------------------------------------------------------------------------------------

SpanKind = Literal["text", "vit", "vae", "noisy", "skipped"]
SPAN_KINDS: tuple[str, ...] = ("text", "vit", "vae", "noisy", "skipped")


def position_ids(spans: Sequence[tuple[str, int]], start: int = 0) -> tuple[list[int], int]:
    """The rotary position of every token of a sequence of spans, and the position the next span starts at.

    BAGEL rotates queries and keys by ONE position per token (plain 1-D RoPE); an image takes a single
    position whatever its size (data/dataset_base.py `pack_sequence`, lines 349-458; bagel.py
    `prepare_vit_images` / `prepare_vae_images` / `prepare_vae_latent`, lines 340-343, 462-465, 592):

    - "text": a text chunk of n tokens (its <|im_start|> and <|im_end|> included) at p, p+1, ..., p+n-1;
      the next span starts at p + n.
    - "vit", "vae": a condition copy of an image (ViT tokens, or clean VAE tokens), n tokens including its
      <|vision_start|> and <|vision_end|> markers, all at p; the next span starts at p + 1.
    - "noisy": the noised VAE copy of a generation target, all n tokens at p; the next span ALSO starts at p
      (the noisy copy does not advance: the clean copy that follows it in training shares its position).
    - "skipped": a condition copy dropped for classifier-free guidance in training (n must be 0): it has no
      token but still advances the position by 1 (dataset_base.py lines 355-357, 399-402). A dropped text
      chunk leaves no trace and is simply not listed.

    So an edit (condition image, then an instruction) is VAE copy at p, ViT copy at p+1, text from p+2; a
    generated image that later serves as a condition is noisy at p, clean VAE at p, ViT at p+1.
    """
    out: list[int] = []
    p = int(start)
    for i, (kind, n) in enumerate(spans):
        if kind not in SPAN_KINDS:
            raise ValueError(f"span {i}: unknown kind '{kind}'; one of {', '.join(SPAN_KINDS)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or (kind == "skipped") != (n == 0):
            raise ValueError(f"span {i} ({kind}): length must be a positive int (0 exactly for 'skipped'), got {n!r}")
        if kind == "text":
            out.extend(range(p, p + n))
            p += n
        else:
            out.extend([p] * n)
            p += 0 if kind == "noisy" else 1
    return out, p


# ---- frozen 2-D position tables ---------------------------------------------------------------------------


def flattened_position_ids(grid_h: int, grid_w: int, max_side: int) -> torch.Tensor:
    """(grid_h * grid_w,) row index into a position table of `max_side` x `max_side` cells: row * max_side +
    column, cells in row-major order (data/data_utils.py `get_flattened_position_ids_extrapolate`, lines 53-58,
    the mode BAGEL-7B-MoT runs with: `interpolate_pos` is False in app.py). A grid smaller than the table uses
    its top-left corner; nothing is interpolated. The same indexing picks rows of the ViT's own position
    embedding (siglip_navit.py line 192) and of `vit_pos_embed` / `latent_pos_embed` (bagel.py 177, 195)."""
    if not 0 < grid_h <= max_side or not 0 < grid_w <= max_side:
        raise ValueError(f"a {grid_h}x{grid_w} grid does not fit a position table of {max_side}x{max_side} cells")
    rows = torch.arange(grid_h)[:, None]
    cols = torch.arange(grid_w)[None, :]
    return (rows * max_side + cols).flatten()


def sincos_position_table(side: int, dim: int) -> torch.Tensor:
    """The frozen (side * side, dim) float32 table of BAGEL's `PositionEmbedding` (modeling_utils.py 24-66,
    127-144): row `r * side + c` holds, with q = dim / 4 and w_k = 10000 ** (-k / q) for k < q,

        [sin(c * w_0..q-1), cos(c * w_0..q-1), sin(r * w_0..q-1), cos(r * w_0..q-1)]

    i.e. the COLUMN c fills the first half and the row r the second, each half sin before cos. (The code
    calls its first half `emb_h`, but `np.meshgrid(grid_w, grid_h)` puts the column coordinate first.)
    Computed in float64 and rounded to float32, as BAGEL does with numpy. dim must be a multiple of 4.
    """
    if side <= 0 or dim <= 0 or dim % 4:
        raise ValueError(f"sincos_position_table needs side > 0 and dim a positive multiple of 4, got {side}, {dim}")
    q = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)  # (q,)
    idx = torch.arange(side, dtype=torch.float64)
    rows = idx.repeat_interleave(side)  # r of table row r * side + c
    cols = idx.repeat(side)  # c
    parts = []
    for coord in (cols, rows):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


# ---- timestep embedding -----------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) flow times t in [0, 1] -> (N, dim) float32 features fed to BAGEL's `TimestepEmbedder` MLP
    (modeling_utils.py 87-105): with h = dim // 2 and f_k = exp(-ln(max_period) * k / h) for k < h,

        [cos(t * f_0..h-1), sin(t * f_0..h-1)]   (a zero column appended when dim is odd)

    t is used as it is - no x1000 scaling - and cos comes before sin. BAGEL embeds t with dim = 256.
    (This equals diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)` applied to t.)
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t.reshape(-1).float()[:, None] * freqs[None, :]
    emb = torch.cat((torch.cos(args), torch.sin(args)), dim=-1)
    if dim % 2:
        emb = torch.cat((emb, emb.new_zeros(emb.shape[0], 1)), dim=-1)
    return emb


# ---- flow matching ----------------------------------------------------------------------------------------


def shift_timestep(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """t' = s * t / (1 + (s - 1) * t): BAGEL's timestep shift (bagel.py 192 in training, 694 in sampling).
    It keeps 0 and 1 fixed and, for s > 1, moves every t towards 1 (more noise)."""
    return shift * t / (1 + (shift - 1) * t)


def noised_latent(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) * x0 + t * noise (bagel.py 193): t = 0 is the clean latent, t = 1 pure noise."""
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = noise - x0 = dx_t/dt, pointing from data to noise (bagel.py 220): what `llm2vae` predicts."""
    return noise - x0


def training_timestep(z: torch.Tensor, shift: float) -> torch.Tensor:
    """The t a training sample is noised at: sigmoid(z), then `shift_timestep` (bagel.py 191-192). The data
    side draws z ~ N(0, 1) per generation target (dataset_base.py 429) - a logit-normal t - and gives clean
    VAE copies z = -inf, i.e. t = 0 (dataset_base.py 431): they get the timestep embedding of t = 0 too."""
    return shift_timestep(torch.sigmoid(z), shift)


def sampling_timesteps(num_timesteps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(times, step sizes) of BAGEL's Euler sampler (bagel.py 693-696): the grid linspace(1, 0,
    num_timesteps), shifted; the model is evaluated at every grid point but the last, and step i moves by
    dt_i = t_i - t_{i+1} > 0. `num_timesteps` counts grid points, so the sampler takes num_timesteps - 1 steps
    (inferencer default 50: 49 model evaluations per CFG branch)."""
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be at least 2 (grid points from 1 to 0), got {num_timesteps}")
    grid = shift_timestep(torch.linspace(1, 0, num_timesteps), shift)
    return grid[:-1], grid[:-1] - grid[1:]


def euler_step(x_t: torch.Tensor, v: torch.Tensor, dt: torch.Tensor | float) -> torch.Tensor:
    """x_{t - dt} = x_t - v * dt (bagel.py 746): one step from noise towards data."""
    return x_t - v * dt


# ---- classifier-free guidance -----------------------------------------------------------------------------

RENORM_TYPES = ("global", "channel", "text_channel")


def cfg_applies(t: float, interval: tuple[float, float]) -> bool:
    """Whether guidance is on at time t: lo < t <= hi for interval (lo, hi) (bagel.py 701). t is the SHIFTED
    time the model sees; outside the interval both guidance scales are 1 (the plain conditional prediction)."""
    lo, hi = interval
    return lo < t <= hi


def combine_cfg(v: torch.Tensor, v_no_text: torch.Tensor | None, v_no_image: torch.Tensor | None,
                text_scale: float, image_scale: float, renorm_type: str = "global",
                renorm_min: float = 0.0) -> torch.Tensor:
    """BAGEL's guided velocity (bagel.py 873-907) from the conditional prediction v, the one without the last
    text (v_no_text, needed when text_scale > 1) and the one without the condition images (v_no_image, needed
    when image_scale > 1); v: (tokens, channels) of ONE image (the norms below run over everything given).

    With text_scale <= 1 there is no guidance at all: v is returned, whatever image_scale is. Otherwise, with
    n(x) = ||x|| over all elements ("global") or over the last dim per token ("channel", "text_channel"), and
    r(a, b) = clamp(n(a) / (n(b) + 1e-8), renorm_min, 1):

    - "global" / "channel": g = v_no_text + text_scale * (v - v_no_text); if image_scale > 1,
      g = v_no_image + image_scale * (g - v_no_image). Result: g * r(v, g).
    - "text_channel": g = v_no_text + text_scale * (v - v_no_text), renormalised first: g = g * r(v, g); then
      if image_scale > 1, g = v_no_image + image_scale * (g - v_no_image), NOT renormalised again.
    """
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"renorm_type must be one of {', '.join(RENORM_TYPES)}, got '{renorm_type}'")
    if text_scale <= 1.0:
        return v
    if v_no_text is None or (image_scale > 1.0 and v_no_image is None):
        raise ValueError("combine_cfg: v_no_text (and v_no_image when image_scale > 1) is needed for guidance")

    def ratio(a: torch.Tensor, b: torch.Tensor, per_token: bool) -> torch.Tensor:
        na = torch.norm(a, dim=-1, keepdim=True) if per_token else torch.norm(a)
        nb = torch.norm(b, dim=-1, keepdim=True) if per_token else torch.norm(b)
        return (na / (nb + 1e-8)).clamp(min=renorm_min, max=1.0)

    g = v_no_text + text_scale * (v - v_no_text)
    if renorm_type == "text_channel":
        g = g * ratio(v, g, per_token=True)
        return v_no_image + image_scale * (g - v_no_image) if image_scale > 1.0 else g
    if image_scale > 1.0:
        g = v_no_image + image_scale * (g - v_no_image)
    return g * ratio(v, g, per_token=renorm_type == "channel")


# ---- special tokens and wrapping --------------------------------------------------------------------------

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class BagelTokens:
    """The ids of BAGEL's four special tokens (data/data_utils.py `add_special_tokens`, 130-165): `bos` =
    <|im_start|> and `eos` = <|im_end|> wrap every text chunk; `start_of_image` = <|vision_start|> and
    `end_of_image` = <|vision_end|> wrap every image copy (ViT, clean VAE, noisy VAE alike)."""

    bos: int
    eos: int
    start_of_image: int
    end_of_image: int


def special_token_ids(tokenizer: Any) -> BagelTokens:
    """The `BagelTokens` of a tokenizer that has all four tokens (Qwen2.5's has them). BAGEL adds missing ones
    (and grows the embeddings); here a missing one is a ConfigError naming it, since a published checkpoint's
    embeddings have no row for a token added now."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IM_START, IM_END, VISION_START, VISION_END) if t not in vocab]
    if missing:
        raise ConfigError(f"the tokenizer lacks BAGEL's special token(s) {', '.join(missing)}: not a BAGEL / "
                          "Qwen2.5 tokenizer")
    return BagelTokens(vocab[IM_START], vocab[IM_END], vocab[VISION_START], vocab[VISION_END])


def wrap_text(text_ids: Sequence[int], tokens: BagelTokens, loss: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a text chunk: inputs [bos] + text + [eos]; with `loss`, the label of each input
    is the next token (text + [eos] for the first n + 1 inputs) and the final <|im_end|> has none
    (dataset_base.py 326-346: its own label is a per-sample option, `special_token_loss`, off by default).
    Without `loss` every label is IGNORE_INDEX. The chunk takes len(inputs) positions (`position_ids`)."""
    ids = [int(t) for t in text_ids]
    inputs = [tokens.bos, *ids, tokens.eos]
    labels = [*ids, tokens.eos, IGNORE_INDEX] if loss else [IGNORE_INDEX] * len(inputs)
    return inputs, labels


def wrap_image(num_tokens: int, tokens: BagelTokens, placeholder: int = -1) -> list[int]:
    """Input ids of one image copy: [<|vision_start|>] + num_tokens placeholders + [<|vision_end|>] (the
    placeholders are replaced by ViT or VAE embeddings). The markers go through the understanding expert and
    belong to the copy's bidirectional block; all num_tokens + 2 share one position (`position_ids`)."""
    if num_tokens <= 0:
        raise ValueError(f"an image copy has at least one token, got {num_tokens}")
    return [tokens.start_of_image, *([placeholder] * num_tokens), tokens.end_of_image]
