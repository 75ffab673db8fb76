"""Tasks on the generation loop, batched over prompts: text-to-image, editing, understanding, interleaved chat.

Each builds a `GenerationSession` with one conversation per prompt, adds the user turn and asks for one
response; `chat` keeps a session across turns (previous turns' text and images stay in the cache).

A turn is a list of segments `{"text": str}` / `{"image": path | PIL image}`; segments in the sample format
(e.g. with a `loss` flag) are taken as they are, other keys ignored. The tasks that draw take `noise`: per
prompt, the starting noise of its image(s) (`noise.NoiseInput`: tokens or an autoencoder latent), so that a
sample can be reproduced exactly; None (or None for a prompt) draws it from the seeded generator. `draw_images` and `text_replies` take
such turns (the general forms of `text_to_image` / `edit_image` and of `answer`); every caller that generates
(`mogao generate` / `chat` / `eval`, the training's sample grids and exact-match validation, the run report)
goes through these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from transformers import PreTrainedTokenizerBase

from mogao.errors import ConfigError
from mogao.inference.guidance import Guidance
from mogao.inference.noise import NoiseInput
from mogao.inference.session import GenerationConfig, GenerationSession, Response
from mogao.model.mogao import MogaoModel

ImageInput = str | Path | Image.Image


def _run(model: MogaoModel, tokenizer: PreTrainedTokenizerBase, turns: list[list[dict[str, Any]]], draw: bool,
         config: GenerationConfig | None, guidance: Guidance | None, progress: bool = False,
         noise: Sequence[NoiseInput] | None = None) -> list[Response]:
    if not turns:
        raise ConfigError("no prompts given")
    if noise is not None and len(noise) != len(turns):
        raise ConfigError(f"noise for {len(noise)} prompts, but {len(turns)} prompts given")
    session = GenerationSession(model, tokenizer, len(turns), config, guidance, progress=progress)
    session.add_user_turn(turns)
    return session.respond(draw=draw, noise=noise)


def draw_images(model: MogaoModel, tokenizer: PreTrainedTokenizerBase, turns: Sequence[Sequence[dict[str, Any]]],
                *, config: GenerationConfig | None = None, guidance: Guidance | None = None,
                noise: Sequence[NoiseInput] | None = None) -> list[Image.Image]:
    """One image per turn: each response begins with an image and ends after it (Mogao's guidance: condition
    images of the turn get 3-branch CFG, a turn without one 2-branch CFG)."""
    cfg = replace(config or GenerationConfig(), max_images=1)
    return [r.images[0] for r in generate(model, tokenizer, turns, draw=True, config=cfg, guidance=guidance,
                                          noise=noise)]


def text_replies(model: MogaoModel, tokenizer: PreTrainedTokenizerBase, turns: Sequence[Sequence[dict[str, Any]]],
                 *, config: GenerationConfig | None = None) -> list[str]:
    """The text reply to each turn, stripped; no images are drawn (a begin-of-image token ends the reply)."""
    cfg = replace(config or GenerationConfig(), max_images=0)
    return [r.text.strip() for r in generate(model, tokenizer, turns, config=cfg, guidance=None)]


def text_to_image(model: MogaoModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
                  config: GenerationConfig | None = None, guidance: Guidance | None = None,
                  noise: Sequence[NoiseInput] | None = None) -> list[Image.Image]:
    """One image per prompt (the response begins with an image and ends after it)."""
    return draw_images(model, tokenizer, [[{"text": p}] for p in prompts], config=config, guidance=guidance,
                       noise=noise)


def edit_image(model: MogaoModel, tokenizer: PreTrainedTokenizerBase, images: Sequence[ImageInput],
               instructions: Sequence[str], *, config: GenerationConfig | None = None,
               guidance: Guidance | None = None, noise: Sequence[NoiseInput] | None = None) -> list[Image.Image]:
    """One edited image per (image, instruction): the input image is the condition, 3-branch CFG applies."""
    if len(images) != len(instructions):
        raise ConfigError(f"edit_image: {len(images)} images but {len(instructions)} instructions")
    turns = [[{"image": img}, {"text": text}] for img, text in zip(images, instructions)]
    return draw_images(model, tokenizer, turns, config=config, guidance=guidance, noise=noise)


def answer(model: MogaoModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str | None], *,
           images: Sequence[ImageInput | None] | None = None, config: GenerationConfig | None = None,
           ) -> list[str]:
    """Understanding: the text answer to each question about its image (None question = caption the image).

    No images are drawn (a begin-of-image token ends the answer).
    """
    images = list(images) if images is not None else [None] * len(questions)
    if len(images) != len(questions):
        raise ConfigError(f"answer: {len(images)} images but {len(questions)} questions")
    turns = []
    for img, q in zip(images, questions):
        turn = ([{"image": img}] if img is not None else []) + ([{"text": q}] if q is not None else [])
        if not turn:
            raise ConfigError("answer: each question needs text, an image or both")
        turns.append(turn)
    return text_replies(model, tokenizer, turns, config=config)


def generate(model: MogaoModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Sequence[dict[str, Any]]],
             *, draw: bool = False, config: GenerationConfig | None = None, guidance: Guidance | None = None,
             progress: bool = False, noise: Sequence[NoiseInput] | None = None) -> list[Response]:
    """The free-running loop: each prompt (segments `{"text": ...}` / `{"image": ...}`) gets a response of
    interleaved text and images; `draw` makes every response begin with an image. noise: per prompt, the
    starting noise of its images in order."""
    return _run(model, tokenizer, [list(p) for p in prompts], draw, config, guidance, progress, noise)
