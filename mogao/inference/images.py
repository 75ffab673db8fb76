"""Helpers of the generation loop and of what shows its results: the model's eval mode for a call, image sizes,
latent images to PIL, and captioned image grids for logs and reports."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch `model` to eval mode; on exit give every submodule back its own previous mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def image_size_wh(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(width, height) of an image size given as one side or a pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    w, h = (int(v) for v in image_size)
    return w, h


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> an RGB PIL image (rounded to the nearest 8-bit value)."""
    a = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(a), mode="RGB")


def _wrap(text: str, font: Any, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Word-wrap `text` to lines of at most `width` pixels (words longer than a line are cut)."""
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            cand = f"{line} {word}".strip()
            if draw.textlength(cand, font=font) <= width:
                line = cand
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and draw.textlength(word, font=font) > width:
                cut = len(word) - 1
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def image_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    cols: int = 4,
    min_size: int = 96,
) -> Image.Image:
    """Tile images in a grid (row by row, `cols` a row) with each caption wrapped underneath.

    Images smaller than `min_size` pixels a side are enlarged by an integer factor (nearest neighbour, so the
    pixels stay visible); cells are as large as the largest image. White background, black text.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    captions = list(captions) if captions is not None else [""] * len(images)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scaled = []
    for img in images:
        k = max(1, math.ceil(min_size / max(1, min(img.size))))
        scaled.append(img.convert("RGB").resize((img.width * k, img.height * k), Image.Resampling.NEAREST))
    cols = max(1, min(cols, len(scaled)))
    rows = math.ceil(len(scaled) / cols)
    pad = 4
    cell_w = max(i.width for i in scaled)
    img_h = max(i.height for i in scaled)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = measure.textbbox((0, 0), "Ag", font=font)
    line_h = bottom - top + 2
    wrapped = [_wrap(c, font, cell_w, measure) if c else [] for c in captions]
    cap_h = max(len(w) for w in wrapped) * line_h
    cell_h = img_h + (cap_h + pad if cap_h else 0)
    canvas = Image.new(
        "RGB", (cols * cell_w + (cols + 1) * pad, rows * cell_h + (rows + 1) * pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for n, (img, lines) in enumerate(zip(scaled, wrapped)):
        x = pad + (n % cols) * (cell_w + pad)
        y = pad + (n // cols) * (cell_h + pad)
        canvas.paste(img, (x + (cell_w - img.width) // 2, y))
        for j, line in enumerate(lines):
            draw.text((x, y + img_h + pad + j * line_h - top), line, fill=(0, 0, 0), font=font)
    return canvas
