"""Lowering: a validated `Sample` -> a `SequencePlan`, the declarative token sequence the packer lays out.

Logical order of a sample's tokens in the default sequence format ("mogao"):

    text segment          its tokens (no special tokens added by the tokenizer)
    image segment         <|vision_start|>, [noisy VAE copy if generate], ViT copy, [clean VAE copy], <|vision_end|>
    end of sample         <|endoftext|>

and in BAGEL's ("bagel", `DataConfig.sequence_format`; `mogao.sequence.formats`):

    text segment          <|im_start|>, its tokens, <|im_end|>
    image segment         each copy wrapped in its own markers, the markers inside the copy's block:
                          [<|vision_start|> noisy VAE copy <|vision_end|> if generate],
                          [<|vision_start|> clean VAE copy <|vision_end|>], <|vision_start|> ViT copy <|vision_end|>
    end of sample         <|endoftext|> (BAGEL has no end-of-sample token; this one is the target of the last
                          loss-bearing token, so a model learns to stop, and nothing reads it)

Each image copy is gh*gw tokens, row-major. With `DataConfig.drop_unread_vae` (training, when text does
not see VAE tokens) an image has a clean VAE copy only when a generation target follows it in the sample. With
`DataConfig.drop_unread_vit` (format "mogao" only) a generation target that ends the sample has no ViT copy:
`<|vision_start|>, noisy VAE copy, [clean VAE copy], <|vision_end|>`.
Cross-entropy labels: a text token's label is the next logical token when that token is loss-bearing text,
else -100. Loss-bearing text: tokens of `loss: true` text segments (with BAGEL's format their <|im_start|> and
<|im_end|> too), `<|vision_start|>` of a generation target (so the model learns *when* to draw; with BAGEL's
format the one of its noisy copy), never `<|vision_end|>`, and `<|endoftext|>` when the sample ends in
loss-bearing text or a generated image. (The marker of a wrapped copy is a text token that can carry a label;
one inside a noisy copy never does.)

Positions follow the model's scheme (`DataConfig.positions`), by the rules of `mogao.sequence.positions`.
Under BAGEL's 1-D scheme a clean VAE copy left out by `drop_unread_vae`, or a ViT copy left out by
`drop_unread_vit`, still advances the position, so the copy's absence changes no position of the tokens after
it. (Under IL-RoPE and M-RoPE the copies of one image share T, so leaving one out moves nothing either.)

Condition dropout (for classifier-free guidance) and the per-image noise seeds are drawn from hashes of
(seed, sample id, epoch[, image index]), so they are reproducible and do not depend on packing or workers.
What dropout removes leaves no trace, under either position scheme: a sample with its condition images dropped
is the context the sampler's images-dropped branch holds (BAGEL's inferencer builds that branch without
positions for the images; BAGEL's training data, by contrast, advances the position past a dropped copy).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mogao.data.images import MAX_IMAGE_BYTES, ImageTensors, choose_grid, open_image, prepare_image, to_rgb
from mogao.data.samples import ImageSegment, Sample, TextSegment
from mogao.data.tokenizer import SpecialTokens
from mogao.errors import ConfigError, DataError, printable
from mogao.sequence import Modality, Span
from mogao.sequence.formats import POSITION_SCHEMES, SEQUENCE_FORMATS, check_choice, image_copies
from mogao.sequence.positions import sequence_positions

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TooLong = Literal["error", "skip", "truncate"]
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # the text-chunk markers of BAGEL's sequence format


@dataclass
class DataConfig:
    """How samples become packed batches. One docstring per field (they become CLI/YAML help)."""

    token_budget: int = 4096
    """Tokens per packed batch: every token of every sample in the pack (text and all image copies)."""
    max_image_tokens: int = 256
    """Most tokens of ONE copy of an image (gh*gw); a condition image costs 2x this, a generation target 3x."""
    min_grid: int = 1
    """Fewest tokens along either side of an image's grid."""
    max_grid: int | None = None
    """Most tokens along either side of an image's grid (None: only max_image_tokens limits it)."""
    vit_patch: int = 14
    """Pixels a side of one ViT token (the ViT's patch size)."""
    vae_patch: int = 16
    """Pixels a side of one VAE token: the VAE's downsampling factor times the latent patch size (8*2 = 16)."""
    too_long: TooLong = "error"
    """A sample over token_budget: 'error' makes it bad data (in training: skipped and counted against
    max_bad_fraction), 'skip' drops it quietly, 'truncate' drops trailing whole segments."""
    p_drop_text: float = 0.1
    """Probability of dropping all text of a sample that has a generation target (classifier-free guidance)."""
    p_drop_images: float = 0.1
    """Probability of dropping all condition images of a sample that has a generation target."""
    drop_unread_vae: bool = False
    """Leave out each clean VAE copy that no token reads: that of an image with no generation target after it in
    the sample. Only valid when text does not see VAE tokens; training sets it from the model (True unless
    `text_sees_vae`), like the patch sizes. It changes no loss and no gradient (nothing with a loss attends to
    such a copy) and saves its tokens, so more samples fit a pack: an image that is only read costs one copy
    instead of two, the last generated image of a sample two instead of three."""
    drop_unread_vit: bool = False
    """Leave out the ViT copy of a generation target that ends the sample (sequence_format 'mogao' only): after
    it come only <|vision_end|> and <|endoftext|>, so no later text or noisy copy reads it. It changes the
    context of one prediction and nothing else: the label of that <|vision_end|> (<|endoftext|>, the model
    learning to stop after a generated image) is then predicted without the image's ViT copy (it still sees the
    rest of the sample); every other loss term, and every position, is unchanged. It saves gh*gw tokens per such
    sample (a text-to-image sample's target costs one or two copies instead of two or three). A data option:
    `for_model` leaves it as set."""
    seed: int = 0
    """Seed of shuffling, condition dropout and the per-image noise seeds."""
    lookahead: int = 8
    """Samples the greedy packer may look ahead to fill a pack (more: less padding, more reordering)."""
    max_bad_fraction: float = 0.01
    """Training skips samples that fail to load or lower (an unreadable image, a deleted file, a sample over
    the budget with too_long='error'); the run stops once more than this share of the samples read is bad
    (counted per data source, in each rank and DataLoader worker)."""
    bad_sample_grace: int = 10
    """This many bad samples are always tolerated, whatever their share (a few bad samples early in a run are
    not a bad data set)."""
    max_image_bytes: int = MAX_IMAGE_BYTES
    """The largest image file read (a larger one is a bad sample); only regular files are read, never a FIFO or
    a device."""
    positions: str = "il_rope"
    """Rotary position scheme: 'il_rope' (IL-RoPE), 'mrope' (M-RoPE: image H, W counted from the image's T),
    'mrope_aligned' (M-RoPE, a later image whole 32-position strides after the one before) or 'bagel' (BAGEL's
    1-D positions, one per image copy). Set from the model (`ModelConfig.positions`, `for_model`), like the patch
    sizes."""
    position_offset: int = 0
    """The position every sample starts at (0 in training). Another value probes how a model's outputs depend on
    depth: under a shift-invariant scheme ('mrope', 'mrope_aligned', 'bagel') nothing changes
    (`benchmarks/position_probe.py`)."""
    sequence_format: str = "mogao"
    """'mogao' (one marker pair around all copies of an image) or 'bagel' (<|im_start|>/<|im_end|> around each
    text segment, a marker pair around each image copy, copies ordered noisy, clean VAE, ViT). Set from the model
    (`ModelConfig.sequence_format`, `for_model`); 'bagel' needs a tokenizer with <|im_start|> and <|im_end|>."""

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise ConfigError(f"data.token_budget must be >= 1, got {self.token_budget}")
        if self.max_image_tokens < 1 or self.vit_patch < 1 or self.vae_patch < 1:
            raise ConfigError("data.max_image_tokens, data.vit_patch and data.vae_patch must be >= 1, got "
                              f"{self.max_image_tokens}, {self.vit_patch}, {self.vae_patch}")
        if self.too_long not in ("error", "skip", "truncate"):
            raise ConfigError(f"data.too_long must be 'error', 'skip' or 'truncate', got {self.too_long!r}")
        for name in ("p_drop_text", "p_drop_images"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lookahead < 1:
            raise ConfigError(f"data.lookahead must be >= 1, got {self.lookahead}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.bad_sample_grace < 0:
            raise ConfigError(f"data.bad_sample_grace must be >= 0, got {self.bad_sample_grace}")
        if self.max_image_bytes < 1:
            raise ConfigError(f"data.max_image_bytes must be >= 1, got {self.max_image_bytes}")
        choose_grid(1, 1, self.max_image_tokens, self.min_grid, self.max_grid)  # raises ConfigError if none fits
        check_choice(self.positions, POSITION_SCHEMES, "data.positions")
        if isinstance(self.position_offset, bool) or not isinstance(self.position_offset, int) \
                or self.position_offset < 0:
            raise ConfigError(f"data.position_offset must be an integer >= 0, got {self.position_offset!r}")
        check_choice(self.sequence_format, SEQUENCE_FORMATS, "data.sequence_format")
        if self.drop_unread_vit and self.sequence_format == "bagel":
            raise ConfigError("data.drop_unread_vit is only for sequence_format 'mogao' (the model's is 'bagel'); "
                              "turn it off")

    def for_model(self, model: Any) -> DataConfig:
        """This config on the token geometry and sequence options of `model` (a `MogaoModel`, read through its
        attributes): its ViT and VAE patch sizes, whether text reads clean VAE copies (`drop_unread_vae` when it
        does not), its position scheme and its sequence format. Training's data module calls it before setup."""
        cfg = model.cfg
        return replace(self, vit_patch=model.vit_patch, vae_patch=model.vae_patch,
                       drop_unread_vae=not cfg.text_sees_vae, positions=cfg.positions,
                       sequence_format=cfg.sequence_format)


@dataclass(frozen=True)
class PlanSpan:
    """A run of tokens of one kind. Text spans carry their ids and per-token loss flags; image spans their image.

    A wrapped image copy (BAGEL's format) has `markers` = (begin id, end id), counted in `length`, and `loss` =
    the loss flags of its two markers. An image span of length 0 is a copy left out of the sequence that still
    takes its position (BAGEL's scheme, `drop_unread_vae`, `drop_unread_vit`): it has no token and no layout span.
    """

    kind: Modality
    length: int
    image: int = -1
    token_ids: tuple[int, ...] = ()
    loss: tuple[bool, ...] = ()
    markers: tuple[int, ...] = ()


@dataclass
class PlanImage:
    """An image of the plan (after dropout). `source_index` is its index among the sample's original images."""

    tensors: ImageTensors
    is_target: bool
    loss_weight: float
    seed: int
    source_index: int

    @property
    def grid(self) -> tuple[int, int]:
        return self.tensors.grid


@dataclass
class SequencePlan:
    """A lowered sample. Token tensors are in logical order, length L = num_tokens.

    input_ids (L,) text ids (0 at image tokens), labels (L,), position_ids (3, L), modality (L,);
    copy_start[i][kind]: logical position of the first token of image i's copy `kind`.
    """

    sample_id: str
    spans: list[PlanSpan]
    images: list[PlanImage]
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    modality: torch.Tensor
    copy_start: list[dict[Modality, int]]
    index: int = -1
    dropped: tuple[str, ...] = field(default_factory=tuple)
    truncated: bool = False

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def layout_spans(self) -> list[Span]:
        return [Span(s.kind, s.length, s.image, markers=bool(s.markers)) for s in self.spans if s.length]


def stable_seed(*parts: object) -> int:
    """A non-negative int64 from a hash of `parts`: the same in every process, worker and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _load(seg: ImageSegment, sample: Sample, i: int, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """The segment's image as RGB; a missing, unreadable, oversized (`max_bytes`) or unconvertible image raises
    `DataError` located at the sample and field."""
    field_name = f"segments[{i}].image"
    img = seg.image if isinstance(seg.image, Image.Image) else open_image(
        seg.image, file=sample.file, line=sample.line, field=field_name, max_bytes=max_bytes,
        flag="data.max_image_bytes")
    try:
        return to_rgb(img)
    except DataError as e:
        raise sample.error(str(e), field=field_name) from e


def _grid(img: Image.Image, config: DataConfig, sample: Sample, i: int) -> tuple[int, int]:
    try:
        return choose_grid(img.height, img.width, config.max_image_tokens, config.min_grid, config.max_grid)
    except DataError as e:  # (a ConfigError is not the sample's fault and is raised as it is)
        raise sample.error(str(e), field=f"segments[{i}].image") from e


def _segment_cost(seg: TextSegment | ImageSegment, ids: list[int] | None, grid: tuple[int, int] | None,
                  clean: bool, wrapped: bool = False, vit: bool = True) -> int:
    """Tokens of a segment; `clean` / `vit`: whether an image has its clean VAE / ViT copy; `wrapped`: BAGEL's
    format (two markers per text segment and per image copy)."""
    if isinstance(seg, TextSegment):
        n = len(ids or ())
        return n + 2 if wrapped and n else n
    assert grid is not None
    copies = int(seg.generate) + int(vit) + int(clean)
    if wrapped:
        return copies * (grid[0] * grid[1] + 2)
    return 2 + copies * grid[0] * grid[1]


def chat_marker_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The ids of <|im_start|> and <|im_end|> (BAGEL's text-chunk markers); ConfigError when the tokenizer lacks
    one (Qwen2.5's tokenizers have both)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END)]
    unk = tokenizer.unk_token_id
    missing = [t for t, i in zip((IM_START, IM_END), ids) if i is None or (unk is not None and i == unk)]
    if missing:
        raise ConfigError(f"the tokenizer lacks {', '.join(missing)}, which sequence_format 'bagel' wraps every text "
                          "segment in: add them (tokenizer.add_tokens([...], special_tokens=True)) and grow the "
                          "model's embeddings (ModelConfig.vocab_size), or use sequence_format 'mogao'")
    return int(ids[0]), int(ids[1])


def _clean_copies(segs: list[TextSegment | ImageSegment], indices: list[int], drop_unread: bool) -> set[int]:
    """Of the image segments at `indices`, those that get a clean VAE copy: all, or with `drop_unread` those
    with a generation target after them (whose noisy copy sees the clean VAE past)."""
    read: set[int] = set()
    target_after = not drop_unread
    for i in reversed(indices):
        seg = segs[i]
        if isinstance(seg, ImageSegment):
            if target_after:
                read.add(i)
            target_after = target_after or seg.generate
    return read


def _unread_vit(segs: list[TextSegment | ImageSegment], indices: list[int], drop_unread: bool) -> set[int]:
    """Of the segments at `indices`, those whose ViT copy is left out: with `drop_unread`, the last one when it is
    a generation target (nothing after it reads it but its <|vision_end|>, whose label is <|endoftext|>)."""
    if not drop_unread or not indices:
        return set()
    last = segs[indices[-1]]
    return {indices[-1]} if isinstance(last, ImageSegment) and last.generate else set()


def lower_sample(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, config: DataConfig, *, epoch: int = 0,
    special: SpecialTokens | None = None, index: int = -1,
) -> SequencePlan | None:
    """Lower one sample; None when `too_long='skip'` (or 'truncate' cannot keep anything) drops it."""
    special = special or SpecialTokens.from_tokenizer(tokenizer)
    wrapped = config.sequence_format == "bagel"
    chat = chat_marker_ids(tokenizer) if wrapped else ()
    segs = list(sample.segments)
    text_ids: dict[int, list[int]] = {}
    rgb: dict[int, Image.Image] = {}
    grids: dict[int, tuple[int, int]] = {}
    for i, seg in enumerate(segs):
        if isinstance(seg, TextSegment):
            ids = list(tokenizer(seg.text, add_special_tokens=False)["input_ids"])
            if special.vision_start_id in ids or special.vision_end_id in ids:
                raise sample.error("text contains an image marker token; put images in image segments",
                                   field=f"segments[{i}].text")
            if chat and any(t in chat for t in ids):
                raise sample.error(f"text contains {IM_START} or {IM_END}, which sequence_format 'bagel' puts "
                                   "around every text segment itself; remove them", field=f"segments[{i}].text")
            text_ids[i] = ids
        else:
            rgb[i] = _load(seg, sample, i, config.max_image_bytes)
            grids[i] = _grid(rgb[i], config, sample, i)
    read = _clean_copies(segs, list(range(len(segs))), config.drop_unread_vae)
    no_vit = _unread_vit(segs, list(range(len(segs))), config.drop_unread_vit)
    costs = [_segment_cost(seg, text_ids.get(i), grids.get(i), i in read, wrapped, i not in no_vit)
             for i, seg in enumerate(segs)]

    total = sum(costs) + 1  # + <|endoftext|>
    keep = len(segs)
    if total > config.token_budget:
        n_img = sum(c for i, c in enumerate(costs) if i in grids)
        msg = (f"sample {sample.id!r} has {total} tokens ({n_img} in images), more than the token budget of "
               f"{config.token_budget}; raise data.token_budget, lower data.max_image_tokens, split the sample, "
               "or set data.too_long to 'skip' or 'truncate'")
        if config.too_long == "error":
            raise sample.error(msg, field="segments")
        if config.too_long == "truncate":
            used = 1
            keep = 0
            while keep < len(segs) and used + costs[keep] <= config.token_budget:
                used += costs[keep]
                keep += 1
        if config.too_long == "skip" or keep == 0:
            log.warning("skipping: %s", printable(sample.error(msg, field="segments")))
            return None
    kept = list(range(keep))

    # condition dropout: both draws always happen, so changing one probability leaves the other draw as it was
    dropped: list[str] = []
    if any(isinstance(segs[i], ImageSegment) and segs[i].generate for i in kept):
        rng = random.Random(stable_seed("dropout", config.seed, sample.id, epoch))
        drop_text, drop_images = rng.random() < config.p_drop_text, rng.random() < config.p_drop_images
        if drop_text:
            kept = [i for i in kept if not isinstance(segs[i], TextSegment)]
            dropped.append("text")
        if drop_images:
            kept = [i for i in kept if not (isinstance(segs[i], ImageSegment) and not segs[i].generate)]
            dropped.append("images")

    image_order = {i: n for n, i in enumerate(i for i, s in enumerate(segs) if isinstance(s, ImageSegment))}
    read = _clean_copies(segs, kept, config.drop_unread_vae)  # (dropout and truncation only remove readers)
    no_vit = _unread_vit(segs, kept, config.drop_unread_vit)  # (the same: what they remove only saves tokens)
    spans: list[PlanSpan] = []
    images: list[PlanImage] = []
    gaps = config.positions == "bagel"  # a left-out copy keeps its position (see the module docstring)
    for i in kept:
        seg = segs[i]
        if isinstance(seg, TextSegment):
            ids = text_ids[i]
            if ids:
                ids = [chat[0], *ids, chat[1]] if wrapped else ids
                spans.append(PlanSpan(Modality.TEXT, len(ids), token_ids=tuple(ids), loss=(seg.loss,) * len(ids)))
            continue
        tensors = prepare_image(rgb[i], max_tokens=config.max_image_tokens, vit_patch=config.vit_patch,
                                vae_patch=config.vae_patch, min_grid=config.min_grid, max_grid=config.max_grid)
        grid = tensors.grid  # (= grids[i], chosen by the same rule above)
        src = image_order[i]
        k = len(images)
        images.append(PlanImage(tensors, seg.generate, seg.flow_weight,
                                stable_seed("image", config.seed, sample.id, src, epoch), src))
        n = grid[0] * grid[1]
        if wrapped:
            for kind in image_copies("bagel", seg.generate, True):
                if kind == Modality.VAE_CLEAN and i not in read:
                    if gaps:
                        spans.append(PlanSpan(kind, 0, image=k))
                    continue
                begins = kind == Modality.VAE_NOISY  # the generated image's first marker: the model learns to draw
                spans.append(PlanSpan(kind, n + 2, image=k, markers=(special.vision_start_id, special.vision_end_id),
                                      loss=(begins, False)))
            continue
        spans.append(PlanSpan(Modality.TEXT, 1, token_ids=(special.vision_start_id,), loss=(seg.generate,)))
        for kind, there in ((Modality.VAE_NOISY, seg.generate), (Modality.VIT, i not in no_vit),
                            (Modality.VAE_CLEAN, i in read)):
            if there or (gaps and kind != Modality.VAE_NOISY):  # (a left-out copy: length 0, its position only)
                spans.append(PlanSpan(kind, n if there else 0, image=k))
        spans.append(PlanSpan(Modality.TEXT, 1, token_ids=(special.vision_end_id,), loss=(False,)))
    last = segs[kept[-1]]
    eos_loss = last.generate if isinstance(last, ImageSegment) else last.loss
    spans.append(PlanSpan(Modality.TEXT, 1, token_ids=(special.eos_id,), loss=(eos_loss,)))
    return _build(sample.id, _merge_text(spans), images, index, tuple(dropped), keep < len(segs), config.positions,
                  config.position_offset)


def _merge_text(spans: list[PlanSpan]) -> list[PlanSpan]:
    """Adjacent text spans become one (fewer spans, same tokens)."""
    out: list[PlanSpan] = []
    for s in spans:
        if out and s.kind == Modality.TEXT and out[-1].kind == Modality.TEXT:
            p = out.pop()
            s = PlanSpan(Modality.TEXT, p.length + s.length, token_ids=p.token_ids + s.token_ids, loss=p.loss + s.loss)
        out.append(s)
    return out


def _build(sample_id: str, spans: list[PlanSpan], images: list[PlanImage], index: int,
           dropped: tuple[str, ...], truncated: bool, positions: str = "il_rope", t0: int = 0) -> SequencePlan:
    """Per-token arrays (logical order) from the spans: ids, loss flags, positions (scheme `positions`), copy
    offsets. The markers of a wrapped copy are text tokens (ids, loss flags, modality TEXT) around its image."""
    ids: list[int] = []
    loss: list[bool] = []
    mods: list[int] = []
    copy_start: list[dict[Modality, int]] = [{} for _ in images]
    for s in spans:
        if s.kind == Modality.TEXT:
            ids += s.token_ids
            loss += s.loss
            mods += [int(s.kind)] * s.length
        elif s.markers:
            n = s.length - 2
            copy_start[s.image][s.kind] = len(ids) + 1
            ids += [s.markers[0], *([0] * n), s.markers[1]]
            loss += [s.loss[0], *([False] * n), s.loss[1]]
            mods += [int(Modality.TEXT), *([int(s.kind)] * n), int(Modality.TEXT)]
        elif s.length:
            copy_start[s.image][s.kind] = len(ids)
            ids += [0] * s.length
            loss += [False] * s.length
            mods += [int(s.kind)] * s.length
    pos_spans = [Span(s.kind, s.length, s.image, markers=bool(s.markers)) if s.length else None for s in spans]
    position_ids, _ = sequence_positions(positions, pos_spans, [im.grid for im in images], t0)
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    is_text = torch.tensor(mods) == Modality.TEXT
    target = is_text[1:] & torch.tensor(loss[1:], dtype=torch.bool) & is_text[:-1]
    labels[:-1] = torch.where(target, input_ids[1:], labels[:-1])
    return SequencePlan(
        sample_id=sample_id, spans=spans, images=images, input_ids=input_ids, labels=labels,
        position_ids=position_ids,
        modality=torch.tensor(mods, dtype=torch.long), copy_start=copy_start, index=index, dropped=dropped,
        truncated=truncated,
    )
