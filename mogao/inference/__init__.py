"""Inference: image and text generation from a trained `MogaoModel`, and helpers to look at the results."""

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

__all__ = [
    "build_generation_batch",
    "eval_mode",
    "generate_text",
    "image_grid",
    "last_token_rows",
    "sample_image_tokens",
    "sample_images",
    "tensor_to_pil",
]
