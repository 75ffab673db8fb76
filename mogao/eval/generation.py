"""The one place where evaluation asks a model to generate: every suite goes through these functions.

They are the suites' settings on `mogao.inference.tasks` (the KV-cached generation loop every caller uses):
images with classifier-free guidance against the branch with text and condition images dropped, text greedily.
Condition images get as many tokens as a generated image of the same size, as in the tiny recipes' training
data.

A context is a list of segments in the sample format (`{"text": ..., "loss": False}` for a prompt,
`{"image": PIL.Image}` for a condition image); it is one user turn of a conversation.

`Generator` is what the suites call: `ModelGenerator` wraps a model and its tokenizer; anything with the same
two methods (for example a stub that returns reference images) runs through exactly the same suite code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

Context = list[dict[str, Any]]


def prompt(text: str) -> dict[str, Any]:
    """A prompt segment (no loss, as in the data's prompts)."""
    return {"text": text, "loss": False}


def generate_images(model: Any, tokenizer: Any, contexts: Sequence[Context], *, seed: int = 0, steps: int = 20,
                    cfg: float = 3.0, image_size: int = 32, shift: float | None = None,
                    position_offset: int = 0) -> list[Image.Image]:
    """One image per context (`mogao.inference.tasks.draw_images`); image i starts from the noise of `seed + i`.
    shift: of the σ schedule (None: the model's training shift, as `mogao generate` and `mogao chat` sample).
    position_offset: where each context starts (`GenerationConfig.position_offset`; 0 as in training).

    One guidance scale for text and images alike: with γ_img = γ = cfg the multi-modal CFG formula is plain
    CFG against the branch with neither text nor condition images.
    """
    from mogao.inference import tasks
    from mogao.inference.guidance import Guidance
    from mogao.inference.session import GenerationConfig

    config = GenerationConfig(image_size=image_size, steps=steps, shift=shift, seed=seed,
                              position_offset=position_offset)
    return tasks.draw_images(model, tokenizer, contexts, config=config,
                             guidance=Guidance(text_scale=cfg, image_scale=cfg))


def generate_texts(model: Any, tokenizer: Any, contexts: Sequence[Context], *, max_new_tokens: int = 8,
                   image_size: int = 32, position_offset: int = 0) -> list[str]:
    """Greedy text continuation of each context (`mogao.inference.tasks.text_replies`: an answer ends where the
    model would begin an image). Images in a context get the token grid of an `image_size` image, as the
    conditions of `generate_images` do."""
    from mogao.inference import tasks
    from mogao.inference.session import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, image_size=image_size, position_offset=position_offset)
    return tasks.text_replies(model, tokenizer, contexts, config=config)


def t2i(model: Any, tokenizer: Any, prompts: Sequence[str], *, seed: int = 0, steps: int = 20, cfg: float = 3.0,
        image_size: int = 32) -> list[Image.Image]:
    """Text-to-image: one image per prompt."""
    return generate_images(model, tokenizer, [[prompt(p)] for p in prompts], seed=seed, steps=steps, cfg=cfg,
                           image_size=image_size)


class Generator(Protocol):
    """What a suite asks of a model: images and texts for batches of contexts."""

    def images(self, contexts: Sequence[Context], *, seed: int, cfg: float) -> list[Image.Image]:
        """One image per context; image i from the noise of `seed + i`."""
        ...

    def texts(self, contexts: Sequence[Context]) -> list[str]:
        """One answer per context."""
        ...


@dataclass
class ModelGenerator:
    """A `Generator` backed by a model: `steps` Euler steps over the σ schedule of `shift` (None: the model's
    training shift), images of `image_size` pixels, answers of at most `max_new_tokens` tokens, every context
    started at `position_offset` (0 as in training; another value probes depth dependence)."""

    model: Any
    tokenizer: Any
    steps: int = 20
    image_size: int = 32
    max_new_tokens: int = 8
    shift: float | None = None
    position_offset: int = 0

    def images(self, contexts: Sequence[Context], *, seed: int, cfg: float) -> list[Image.Image]:
        return generate_images(self.model, self.tokenizer, contexts, seed=seed, steps=self.steps, cfg=cfg,
                               image_size=self.image_size, shift=self.shift, position_offset=self.position_offset)

    def texts(self, contexts: Sequence[Context]) -> list[str]:
        return generate_texts(self.model, self.tokenizer, contexts, max_new_tokens=self.max_new_tokens,
                              image_size=self.image_size, position_offset=self.position_offset)
