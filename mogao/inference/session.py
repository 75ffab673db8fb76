"""The generation loop every task runs on: KV-cached text decoding that switches to flow sampling of an image
whenever the model emits the begin-of-image token (DESIGN §5).

A `GenerationSession` holds B conversations. Each has three KV cache rows - the guidance branches of
`mogao.inference.guidance` (Mogao's full / image-only / none, or BAGEL's full / text dropped / images dropped)
- kept up to date turn by turn, so earlier turns' text and images stay in the cache. One `respond` call:

1. decodes text from the full branch (greedy, or seeded temperature sampling), all active conversations in one
   batched step per token;
2. on `<|vision_start|>` (or at once with `draw=True`) commits the marker to the branches, then integrates the
   rectified flow from noise with Euler steps (`mogao.diffusion.flow.euler_sample` over `sampling_sigmas`);
   every step evaluates the noisy block of all branches of all drawing conversations in ONE batched forward
   against their caches (the block itself is never cached); the starting noise is seeded, or given
   (`respond(noise=...)`) so that a sample can be reproduced exactly;
3. decodes the finished latents to an image, converts it to 8-bit RGB and commits it exactly as the data
   pipeline lowers a condition image - ViT copy, clean VAE copy, `<|vision_end|>` - then continues with text;
4. stops at `<|endoftext|>`, after `max_images` images, after `max_new_tokens` text tokens, or at the context
   length.

Sequences follow the lowering of `mogao.data.plan` (same tokenisation per segment, same markers, same
positions, under the model's `sequence_format` and `positions`), so a conversation's cache equals what a full
forward of its packed training sample computes. With BAGEL's sequence format a user text is wrapped in
`<|im_start|>` ... `<|im_end|>`, an image is its clean VAE copy then its ViT copy, each in its own marker pair,
and the noisy block carries its own pair (nothing is committed before drawing). The model's answer is then text
chunks and images: a text answer opens with `<|im_start|>` (BAGEL's inferencer starts every answer so) and a
chunk ends at `<|im_end|>`; after a chunk or an image, `<|vision_start|>` draws, `<|im_start|>` opens another
chunk and anything else (`<|endoftext|>`) ends the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from mogao.data.plan import chat_marker_ids, stable_seed
from mogao.data.tokenizer import SpecialTokens
from mogao.diffusion.flow import euler_sample, sampling_sigmas
from mogao.errors import ConfigError
from mogao.inference.cache import KVCache, Piece, cached_forward, next_position, text_piece
from mogao.inference.guidance import BRANCHES, FULL, IMAGE_ONLY, IMAGES_DROPPED, TEXT_DROPPED, Guidance
from mogao.inference.images import eval_mode, image_size_wh, tensor_to_pil
from mogao.inference.inputs import check_prompt, image_tensors, load_image
from mogao.inference.noise import NoiseInput, noise_queue, noise_tokens
from mogao.model.autoencoder import PixelAutoencoder
from mogao.model.mogao import MogaoModel
from mogao.sequence.modality import Modality


@dataclass
class GenerationConfig:
    """Settings of one `respond` call.

    max_new_tokens: most text tokens the model writes in one response (with BAGEL's sequence format, the
        <|im_start|> / <|im_end|> of its text chunks included).
    max_images: most images in one response; the response ends after the last one.
    image_size: (width, height) or a side in pixels, multiples of `model.vae_patch`; None = `default_image_size`.
    condition_tokens: most tokens a copy of an input image gets (as `DataConfig.max_image_tokens`); None = as
        many as a generated image has.
    steps / shift: Euler steps over `sampling_sigmas(steps, shift)`; shift None = the model's training shift for
        the image's token count (`TimestepSampling.shift_for`).
    temperature: 0 = greedy text; > 0 samples from softmax(logits / temperature) with a seeded generator.
    seed: conversation i's k-th image starts from noise seeded by (seed + i, k); text sampling likewise.
    lockstep: every `respond` runs exactly `max_new_tokens` text steps, however early the answers end (the
        steps after the last answer are forwards whose results are dropped). A sharded model gathers its
        weights in every forward, so every rank has to run as many; text only (needs max_images 0).
    position_offset: the rotary position a conversation starts at (0, as every training sample). Another value
        probes how outputs depend on depth (`DataConfig.position_offset` is the same for the lowering).
    """

    max_new_tokens: int = 256
    max_images: int = 4
    image_size: int | tuple[int, int] | None = None
    condition_tokens: int | None = None
    steps: int = 30
    shift: float | None = None
    temperature: float = 0.0
    seed: int = 0
    lockstep: bool = False
    position_offset: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0 or self.max_images < 0:
            raise ConfigError(f"max_new_tokens ({self.max_new_tokens}) and max_images ({self.max_images}) must be >= 0")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.shift is not None and not self.shift > 0:
            raise ConfigError(f"shift must be > 0 (1 = no shift), got {self.shift}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.condition_tokens is not None and self.condition_tokens < 1:
            raise ConfigError(f"condition_tokens must be >= 1, got {self.condition_tokens}")
        if self.lockstep and self.max_images:
            raise ConfigError(f"lockstep decoding is for text: set max_images to 0 (got {self.max_images})")
        if self.position_offset < 0:
            raise ConfigError(f"position_offset must be >= 0, got {self.position_offset}")


@dataclass
class Segment:
    """One item of a conversation: text or an image, said by the user or made by the model."""

    role: str  # "user" | "model"
    text: str | None = None
    image: Image.Image | None = None


@dataclass
class Response:
    """What the model said in one `respond` call, and why it stopped ("eos", "max_images", "max_tokens",
    "context")."""

    segments: list[Segment] = field(default_factory=list)
    stop_reason: str = ""

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments if s.text)

    @property
    def images(self) -> list[Image.Image]:
        return [s.image for s in self.segments if s.image is not None]


TINY_WORLD_PIXELS = 32  # the built-in shapes and digits images' side


def default_image_size(model: MogaoModel) -> tuple[int, int]:
    """The recipes' image size: for the pixel autoencoder of tiny recipes an 8x8 token grid, at most the 32 pixels
    of the built-in world's images (4x4 tokens at latent patch 8, what the tiny recipes train on); else 16x16."""
    if isinstance(model.autoencoder, PixelAutoencoder):
        side = min(8 * model.vae_patch, max(TINY_WORLD_PIXELS, model.vae_patch))
    else:
        side = 16 * model.vae_patch
    return side, side


def _size_wh(model: MogaoModel, image_size: int | Sequence[int] | None) -> tuple[int, int]:
    if image_size is None:
        return default_image_size(model)
    w, h = image_size_wh(image_size)
    p = model.vae_patch
    if w < p or h < p or w % p or h % p:
        raise ConfigError(f"image size {w}x{h} must be positive multiples of the model's VAE patch ({p} pixels), "
                          f"e.g. {max(p, w // p * p)}x{max(p, h // p * p)}")
    return w, h


class GenerationSession:
    """B conversations with a model; see the module docstring. Call `add_user_turn`, then `respond`."""

    def __init__(self, model: MogaoModel, tokenizer: PreTrainedTokenizerBase, num_conversations: int = 1,
                 config: GenerationConfig | None = None, guidance: Guidance | None = None,
                 progress: bool = False) -> None:
        if num_conversations < 1:
            raise ConfigError(f"num_conversations must be >= 1, got {num_conversations}")
        self.model, self.tokenizer = model, tokenizer
        self.config = config or GenerationConfig()
        self.guidance = guidance or Guidance()
        self.progress = progress
        self.special = SpecialTokens.from_tokenizer(tokenizer)
        # BAGEL's sequence format: text chunks in <|im_start|> ... <|im_end|>, each image copy in its own markers
        self.wrapped = model.cfg.sequence_format == "bagel"
        self.chat = chat_marker_ids(tokenizer) if self.wrapped else None
        self.num = num_conversations
        self.cache = KVCache(3 * num_conversations)
        self.cache.next_t = [self.config.position_offset] * self.cache.num_rows  # where every conversation starts
        self.history: list[list[Segment]] = [[] for _ in range(num_conversations)]
        self.pending: list[torch.Tensor | None] = [None] * num_conversations  # next-token logits (vocab,)
        self.has_condition_image = [False] * num_conversations
        self.images_made = [0] * num_conversations
        self.noise: list[list[torch.Tensor]] = [[] for _ in range(num_conversations)]  # given noise, in order
        self.context_limit = int(getattr(model.backbone.config, "max_position_embeddings", 1 << 30))
        self._text_gen = [torch.Generator().manual_seed(stable_seed("text", self.config.seed + i))
                          for i in range(num_conversations)]

    @staticmethod
    def row(conv: int, branch: int) -> int:
        return 3 * conv + branch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def bagel_branches(self) -> bool:
        """Whether rows 1 and 2 are BAGEL's guidance branches (text dropped, images dropped)."""
        return self.guidance.mode == "bagel"

    # ---- input -------------------------------------------------------------------------------------------
    def _image_pieces(self, img: Image.Image, max_tokens: int) -> list[Piece]:
        """A condition image as the lowering makes it: <vs> ViT, clean VAE <ve>, or with BAGEL's format the clean
        VAE copy and the ViT copy, each wrapped in its own markers."""
        t = image_tensors(img, max_tokens, self.model.vit_patch, self.model.vae_patch)
        if self.wrapped:
            markers = (self.special.vision_start_id, self.special.vision_end_id)
            return [Piece(Modality.VAE_CLEAN, pixels=t.vae, grid=t.grid, markers=markers),
                    Piece(Modality.VIT, pixels=t.vit, grid=t.grid, markers=markers)]
        return [text_piece([self.special.vision_start_id]), Piece(Modality.VIT, pixels=t.vit, grid=t.grid),
                Piece(Modality.VAE_CLEAN, pixels=t.vae, grid=t.grid), text_piece([self.special.vision_end_id])]

    def _noisy_piece(self, x: torch.Tensor, sigma: float, grid: tuple[int, int]) -> Piece:
        markers = (self.special.vision_start_id, self.special.vision_end_id) if self.wrapped else None
        return Piece(Modality.VAE_NOISY, tokens=x, sigma=sigma, grid=grid, markers=markers)

    def _text_ids(self, text: str, what: str) -> list[int]:
        check_prompt(text, what)
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.special.vision_start_id in ids or self.special.vision_end_id in ids:
            raise ConfigError(f"{what} contains an image marker token; pass images as image segments")
        if self.chat is not None and any(t in self.chat for t in ids):
            raise ConfigError(f"{what} contains <|im_start|> or <|im_end|>, which BAGEL's sequence format puts "
                              "around every text itself; remove them")
        return [self.chat[0], *ids, self.chat[1]] if self.chat is not None else ids

    def add_user_turn(self, turns: Sequence[Sequence[dict[str, Any]] | None]) -> None:
        """Append one user turn per conversation (None or [] = nothing for that one), all in one forward.

        A turn is a list of segments `{"text": str}` or `{"image": path | PIL image}`. Text goes to the full
        branch only; images (with their markers) to the full and image-only branches. With BAGEL's guidance
        (`Guidance.mode`), text goes to the full and images-dropped branches, images to the full branch, and
        the text-dropped branch becomes the full context as it was before the turn's last text (or after its
        last image, when an image follows that text).
        """
        if len(turns) != self.num:
            raise ConfigError(f"add_user_turn: {len(turns)} turns for {self.num} conversations")
        cond_tokens = self.config.condition_tokens or self._grid_tokens()
        rows, pieces, added, snapshots = [], [], [], []
        for c, turn in enumerate(turns):
            parts: list[tuple[bool, list[Piece]]] = []  # (is text, its pieces) per segment
            segs = []
            for j, seg in enumerate(turn or []):
                what = f"conversation {c} segment {j}"
                if not isinstance(seg, dict) or len(set(seg) & {"text", "image"}) != 1:
                    raise ConfigError(f"{what}: give a dict with either 'text' or 'image', got {seg!r:.80}")
                if "text" in seg:
                    parts.append((True, [text_piece(self._text_ids(seg["text"], f"{what} text"))]))
                    segs.append(Segment("user", text=seg["text"]))
                else:
                    img = load_image(seg["image"], f"{what} image")
                    parts.append((False, self._image_pieces(img, cond_tokens)))
                    segs.append(Segment("user", image=img))
            full = [p for _, ps in parts for p in ps]
            if not full:
                continue
            row = self.row(c, FULL)
            t_need = next_position(full, self.cache.next_t[row], self.model.cfg.positions, self.cache.image_t[row])
            if t_need > self.context_limit:
                raise ConfigError(f"conversation {c}: the prompt needs {t_need} positions, more than the model's "
                                  f"context of {self.context_limit}; shorten the prompt or start a new session")
            branch: dict[int, list[Piece]] = {}
            if self.bagel_branches:
                last_text = max((j for j, (is_text, _) in enumerate(parts) if is_text), default=-1)
                if last_text >= 0 and all(is_text for is_text, _ in parts[last_text:]):
                    # the text-dropped branch: the full context before the last text, continued up to it
                    self.cache.copy_row(self.row(c, FULL), self.row(c, TEXT_DROPPED))
                    branch[TEXT_DROPPED] = [p for _, ps in parts[:last_text] for p in ps]
                else:
                    snapshots.append(c)  # an image comes last: the full context after the turn
                branch[IMAGES_DROPPED] = [p for is_text, ps in parts if is_text for p in ps]
            else:
                branch[IMAGE_ONLY] = [p for is_text, ps in parts if not is_text for p in ps]
            rows.append(self.row(c, FULL))
            pieces.append(full)
            for b, ps in branch.items():
                if ps:
                    rows.append(self.row(c, b))
                    pieces.append(ps)
            self.has_condition_image[c] = self.has_condition_image[c] or not all(t for t, _ in parts)
            added.append((c, segs))
        if not rows:
            return
        with eval_mode(self.model):
            out = cached_forward(self.model, self.cache, rows, pieces, commit=True)
        for c in snapshots:
            self.cache.copy_row(self.row(c, FULL), self.row(c, TEXT_DROPPED))
        for c, segs in added:
            self.history[c] += segs
            self.pending[c] = out.logits[rows.index(self.row(c, FULL))]

    # ---- output ------------------------------------------------------------------------------------------
    def _grid_tokens(self) -> int:
        w, h = _size_wh(self.model, self.config.image_size)
        return (w // self.model.vae_patch) * (h // self.model.vae_patch)

    def _next_token(self, c: int) -> int:
        logits = self.pending[c]
        if self.config.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / self.config.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._text_gen[c]))

    def respond(self, draw: bool | Sequence[bool] = False, conversations: Sequence[int] | None = None,
                noise: Sequence[NoiseInput] | None = None) -> list[Response]:
        """Let the model answer in the given conversations (default: all); `draw` makes it begin with an image
        (text-to-image, editing). noise: per conversation asked, the starting noise of the images it draws in
        this response (`NoiseInput`; the seeded draw for the images it gives none). Returns one `Response` per
        conversation asked."""
        convs = list(range(self.num)) if conversations is None else list(conversations)
        draws = [draw] * len(convs) if isinstance(draw, bool) else list(draw)
        cfg = self.config
        if len(draws) != len(convs):
            raise ConfigError(f"respond: {len(draws)} draw flags for {len(convs)} conversations")
        if noise is not None and len(noise) != len(convs):
            raise ConfigError(f"respond: noise for {len(noise)} conversations, {len(convs)} asked")
        for k, c in enumerate(convs):
            self.noise[c] = noise_queue(None if noise is None else noise[k])
        if any(draws) and cfg.max_images < 1:
            raise ConfigError("draw=True needs max_images >= 1")
        for c, d in zip(convs, draws):
            if self.pending[c] is None and not d:
                raise ConfigError(f"conversation {c} is empty: add a user turn before asking for a response")
        responses = {c: Response() for c in convs}
        text_ids: dict[int, list[int]] = {c: [] for c in convs}
        n_text = dict.fromkeys(convs, 0)
        n_img = dict.fromkeys(convs, 0)
        want_image = {c for c, d in zip(convs, draws) if d}
        active = list(convs)
        text_steps = 0
        # BAGEL's format: whether the model is inside a text chunk; a text answer opens one at once
        in_chunk = dict.fromkeys(convs, False)
        opening = {c for c, d in zip(convs, draws) if self.wrapped and not d}

        def flush(c: int) -> None:
            if text_ids[c]:
                seg = Segment("model", text=self.tokenizer.decode(text_ids[c], skip_special_tokens=True))
                responses[c].segments.append(seg)
                self.history[c].append(seg)
                text_ids[c] = []

        def finish(c: int, reason: str) -> None:
            responses[c].stop_reason = reason
            active.remove(c)
            flush(c)

        with eval_mode(self.model):
            while active:
                text_rows: list[tuple[int, int]] = []
                drawing: list[int] = []
                for c in list(active):
                    if c in want_image:
                        drawing.append(c)
                        continue
                    if n_text[c] >= cfg.max_new_tokens:
                        finish(c, "max_tokens")
                        continue
                    if self.cache.next_t[self.row(c, FULL)] + 1 > self.context_limit:
                        finish(c, "context")
                        continue
                    tok = self.chat[0] if c in opening else self._next_token(c)
                    opening.discard(c)
                    if self.wrapped and not in_chunk[c]:  # after a chunk or an image: draw, a chunk, or the end
                        if tok == self.special.vision_start_id:
                            if n_img[c] >= cfg.max_images:
                                finish(c, "max_images")
                            else:
                                drawing.append(c)
                        elif tok == self.chat[0]:
                            text_rows.append((c, tok))
                            in_chunk[c] = True
                            n_text[c] += 1
                        else:
                            finish(c, "eos")
                        continue
                    if self.wrapped and tok in (self.chat[1], self.special.vision_start_id):  # the chunk ends
                        text_rows.append((c, self.chat[1]))
                        in_chunk[c] = False
                        n_text[c] += 1
                        flush(c)
                        continue
                    if tok == self.special.eos_id:
                        finish(c, "eos")
                    elif tok == self.special.vision_start_id:
                        if n_img[c] >= cfg.max_images:
                            finish(c, "max_images")
                        else:
                            drawing.append(c)
                    else:
                        text_rows.append((c, tok))
                        text_ids[c].append(tok)
                        n_text[c] += 1
                if text_rows:
                    out = cached_forward(self.model, self.cache, [self.row(c, FULL) for c, _ in text_rows],
                                         [[text_piece([t])] for _, t in text_rows], commit=True)
                    text_steps += 1
                    for i, (c, _) in enumerate(text_rows):
                        self.pending[c] = out.logits[i]
                if drawing:
                    for c in drawing:
                        flush(c)
                    images = self._draw(drawing)
                    want_image -= set(drawing)
                    for c, img in zip(drawing, images):
                        seg = Segment("model", image=img)
                        responses[c].segments.append(seg)
                        self.history[c].append(seg)
                        n_img[c] += 1
                        if n_img[c] >= cfg.max_images:
                            finish(c, "max_images")
            for _ in range(text_steps, cfg.max_new_tokens if cfg.lockstep and convs else 0):
                cached_forward(self.model, self.cache, [self.row(convs[0], FULL)],
                               [[text_piece([self.special.eos_id])]], commit=False)
        for c in convs:
            self.noise[c] = []  # (given for this response only)
        return [responses[c] for c in convs]

    # ---- images ------------------------------------------------------------------------------------------
    def _branches(self, c: int, sigma: float) -> tuple[int, ...]:
        if not self.guidance.active_at(sigma):
            return (FULL,)
        return self.guidance.branches(self.has_condition_image[c])

    def image_noise(self, c: int, grid: tuple[int, int]) -> torch.Tensor:
        """The starting noise (gh*gw, token_dim) of conversation c's next image: the next one given to `respond`,
        else drawn from a generator seeded by (seed + c, images made so far)."""
        if self.noise[c]:
            m = self.model
            return noise_tokens(self.noise[c].pop(0), grid, m.token_dim, m.autoencoder.latent_channels,
                                m.cfg.latent_patch, f"conversation {c}")
        g = torch.Generator().manual_seed(stable_seed("image", self.config.seed + c, self.images_made[c]))
        return torch.randn(grid[0] * grid[1], self.model.token_dim, generator=g)

    def velocity(self, convs: list[int], x: list[torch.Tensor], sigma: float, grid: tuple[int, int],
                 ) -> list[torch.Tensor]:
        """Guided velocity of each conversation's noisy block at σ: all branches in ONE batched forward."""
        rows, pieces, owners = [], [], []
        for c, xc in zip(convs, x):
            for b in self._branches(c, sigma):
                ps = [self._noisy_piece(xc, sigma, grid)]
                if b != FULL and self.bagel_branches and not self.wrapped:
                    # BAGEL's branches hold no begin marker (only the full context commits one): give it here
                    ps.insert(0, text_piece([self.special.vision_start_id]))
                rows.append(self.row(c, b))
                pieces.append(ps)
                owners.append((c, b))
        out = cached_forward(self.model, self.cache, rows, pieces, commit=False)
        per: dict[int, dict[int, torch.Tensor]] = {c: {} for c in convs}
        for (c, b), v in zip(owners, out.velocities):
            per[c][b] = v[0]
        return [per[c][FULL] if len(per[c]) == 1 else self.guidance.combine(per[c]) for c in convs]

    def _image_rows(self, c: int) -> list[int]:
        """The rows a drawn image enters: every branch (Mogao's guidance), or the full context only (BAGEL's,
        whose text-dropped branch then becomes a copy of it)."""
        return [self.row(c, FULL)] if self.bagel_branches else [self.row(c, b) for b in BRANCHES]

    def begin_image(self, convs: list[int]) -> None:
        """Commit `<|vision_start|>` to the branches of the conversations (one forward); with BAGEL's sequence
        format nothing (the noisy block carries its own markers)."""
        if self.wrapped:
            return
        rows = [r for c in convs for r in self._image_rows(c)]
        cached_forward(self.model, self.cache, rows, [[text_piece([self.special.vision_start_id])]] * len(rows),
                       commit=True)

    def end_image(self, convs: list[int], images: list[Image.Image], max_tokens: int) -> None:
        """Commit each finished image as a condition (ViT, clean VAE, `<|vision_end|>`; with BAGEL's format the
        wrapped clean VAE and ViT copies) to its rows."""
        rows, pieces = [], []
        for c, img in zip(convs, images):
            ps = self._image_pieces(img, max_tokens)
            ps = ps if self.wrapped else ps[1:]  # the begin marker is already in the cache
            image_rows = self._image_rows(c)
            rows += image_rows
            pieces += [ps] * len(image_rows)
        out = cached_forward(self.model, self.cache, rows, pieces, commit=True)
        for c in convs:
            self.pending[c] = out.logits[rows.index(self.row(c, FULL))]
            self.images_made[c] += 1
            if self.bagel_branches:
                self.cache.copy_row(self.row(c, FULL), self.row(c, TEXT_DROPPED))

    def sample_tokens(self, convs: list[int], grid: tuple[int, int]) -> list[torch.Tensor]:
        """Integrate the flow for one image per conversation (begin marker committed); float32 latent tokens."""
        cfg = self.config
        shift = cfg.shift if cfg.shift is not None else self.model.cfg.timestep_sampling.shift_for(grid[0] * grid[1])
        sigmas = sampling_sigmas(cfg.steps, shift)
        noise = torch.cat([self.image_noise(c, grid) for c in convs]).to(self.device)
        n = grid[0] * grid[1]
        bar = _progress(cfg.steps, f"image ({len(convs)})") if self.progress else None

        def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            v = self.velocity(convs, list(x.split(n)), float(sigma), grid)
            if bar is not None:
                bar.update(1)
            return torch.cat(v).to(x.dtype)

        try:
            x0 = euler_sample(fn, noise.float(), sigmas.to(self.device))
        finally:
            if bar is not None:
                bar.close()
        return list(x0.float().split(n))

    def _draw(self, convs: list[int]) -> list[Image.Image]:
        w, h = _size_wh(self.model, self.config.image_size)
        grid = (h // self.model.vae_patch, w // self.model.vae_patch)
        self.begin_image(convs)
        tokens = self.sample_tokens(convs, grid)
        images = [tensor_to_pil(self.model.decode_tokens(t, grid)) for t in tokens]
        self.end_image(convs, images, grid[0] * grid[1])
        return images


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, unit="step")
