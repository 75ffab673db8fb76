"""Inference: image and text generation from a trained `MogaoModel`, and helpers to look at the results.

- `session`: the KV-cached generation loop (`GenerationSession`) with multi-modal CFG (`guidance`: Mogao's, or
  BAGEL's branches and formula), the one sampler: `mogao generate` / `chat` / `eval`, the training's sample
  grids and exact-match validation and the run report all generate through it; `noise`: starting noise a
  caller gives it, to reproduce a sample exactly.
- `tasks`: text-to-image, editing, understanding and interleaved generation on that loop.
- `images`: the model's eval mode for a call, image sizes, tensors to PIL images, captioned image grids.
- `cli`: `mogao generate` and `mogao chat`.
"""

from mogao.inference.cache import KVCache, Piece, cached_forward
from mogao.inference.guidance import Guidance
from mogao.inference.images import eval_mode, image_grid, tensor_to_pil
from mogao.inference.noise import NoiseInput
from mogao.inference.session import GenerationConfig, GenerationSession, Response, Segment, default_image_size
from mogao.inference.tasks import answer, edit_image, generate, text_to_image

__all__ = [
    "GenerationConfig",
    "GenerationSession",
    "Guidance",
    "KVCache",
    "NoiseInput",
    "Piece",
    "Response",
    "Segment",
    "answer",
    "cached_forward",
    "default_image_size",
    "edit_image",
    "eval_mode",
    "generate",
    "image_grid",
    "tensor_to_pil",
    "text_to_image",
]
