"""Inference: image and text generation from a trained `MogaoModel`, and helpers to look at the results.

- `simple`: reference samplers by full recomputation (slow, the ground truth the cached loop is tested against).
- `session`: the KV-cached generation loop (`GenerationSession`) with multi-modal CFG (`guidance`).
- `tasks`: text-to-image, editing, understanding and interleaved generation on that loop.
- `cli`: `mogao generate` and `mogao chat`.
"""

from mogao.inference.cache import KVCache, Piece, cached_forward
from mogao.inference.guidance import Guidance
from mogao.inference.session import GenerationConfig, GenerationSession, Response, Segment, default_image_size
from mogao.inference.simple import (
    build_generation_batch,
    eval_mode,
    generate_text,
    image_grid,
    last_token_rows,
    sample_image_tokens,
    sample_images,
    tensor_to_pil,
)
from mogao.inference.tasks import answer, edit_image, generate, text_to_image

__all__ = [
    "GenerationConfig",
    "GenerationSession",
    "Guidance",
    "KVCache",
    "Piece",
    "Response",
    "Segment",
    "answer",
    "build_generation_batch",
    "cached_forward",
    "default_image_size",
    "edit_image",
    "eval_mode",
    "generate",
    "generate_text",
    "image_grid",
    "last_token_rows",
    "sample_image_tokens",
    "sample_images",
    "tensor_to_pil",
    "text_to_image",
]
