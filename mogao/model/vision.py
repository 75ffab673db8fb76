"""The semantic vision encoder: a SigLIP ViT (from `transformers`) and the MLP connector into the LLM width.

Its tokens feed the understanding expert. SigLIP has no CLS token, so every output token is one patch, and
the patch features of an image come back row-major over its (gh, gw) token grid - the same cell order as the
VAE tokens of the image, so IL-RoPE can give the two copies the same (H, W).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn
from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel
from transformers.utils import cached_file

from mogao.errors import ConfigError, DataError


def _processor_mean_std(path: str | os.PathLike) -> tuple[list[float], list[float]]:
    """Normalisation constants of the checkpoint's image processor, or the SigLIP processor's defaults.

    Read from `preprocessor_config.json` without building the processor: we never use its resizing (the
    packer decides resolutions), only its mean/std. SigLIP's are 0.5/0.5, which maps [0, 1] to [-1, 1].
    """
    file = cached_file(str(path), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if file is not None:
        with open(file) as f:
            cfg = json.load(f)
        if "image_mean" in cfg and "image_std" in cfg:
            return list(cfg["image_mean"]), list(cfg["image_std"])
    return list(SiglipImageProcessorPil.image_mean), list(SiglipImageProcessorPil.image_std)


class VisionEncoder(nn.Module):
    """SigLIP vision tower that encodes a list of variable-size images into per-image patch features.

    Args:
        model: a `transformers.SiglipVisionModel`.
        image_mean, image_std: per-channel normalisation applied to [0, 1] pixels; default the SigLIP image
            processor's (0.5, 0.5: pixels to [-1, 1]).
        feature_layer: -1 for the last layer (after SigLIP's final LayerNorm, `last_hidden_state`), -2 for the
            output of the second-to-last encoder layer (no final norm), as LLaVA-style models use.

    The attention-pooling head is removed (only patch features are used; an unused head would also trip DDP's
    unused-parameter check). With `feature_layer=-2` the last encoder layer and the final LayerNorm are
    removed for the same reason - the features are identical to `hidden_states[-2]` of the full model.
    `config` stays the source checkpoint's (not edited), so `from_config(config, feature_layer)` rebuilds
    the same trimmed module.

    `positions` (`ModelConfig.vit_positions`, set by the model): how the learned position embedding meets a
    grid other than the native one - "interpolate" (HF's bicubic resize of the whole table) or "navit" (each
    patch takes row `row * S + column` of the table, S the native side: BAGEL's NaViT indexing). On the native
    grid both give the table itself.
    """

    POSITIONS = ("interpolate", "navit")

    def __init__(
        self,
        model: SiglipVisionModel,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        feature_layer: int = -1,
    ):
        super().__init__()
        if feature_layer not in (-1, -2):
            raise ConfigError(f"VisionEncoder: feature_layer must be -1 or -2, got {feature_layer}")
        if getattr(model, "use_head", False):
            model.use_head = False
            del model.head
        if feature_layer == -2:
            model.encoder.layers = model.encoder.layers[:-1]
            model.post_layernorm = nn.Identity()
        self.model = model
        self.feature_layer = feature_layer
        self.positions = "interpolate"
        # Plain floats, not buffers: nothing to restore after a meta-device init or `to_empty`.
        self.image_mean = tuple(float(v) for v in (image_mean or SiglipImageProcessorPil.image_mean))
        self.image_std = tuple(float(v) for v in (image_std or SiglipImageProcessorPil.image_std))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, feature_layer: int = -1, **kwargs) -> VisionEncoder:
        """Load a SigLIP vision checkpoint (`kwargs` go to `SiglipVisionModel.from_pretrained`, e.g. `dtype`)."""
        model = SiglipVisionModel.from_pretrained(path, **kwargs)
        mean, std = _processor_mean_std(path)
        return cls(model, mean, std, feature_layer=feature_layer)

    @classmethod
    def from_config(cls, config: SiglipVisionConfig | dict, feature_layer: int = -1) -> VisionEncoder:
        """A randomly initialised encoder (tests, tiny recipes)."""
        config = SiglipVisionConfig(**config) if isinstance(config, dict) else config
        return cls(SiglipVisionModel(config), feature_layer=feature_layer)

    @property
    def config(self) -> SiglipVisionConfig:
        return self.model.config

    @property
    def patch_size(self) -> int:
        """Pixels per token side."""
        return int(self.model.config.patch_size)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def native_grid(self) -> tuple[int, int]:
        """Token grid the position embeddings were trained for; other grids interpolate them."""
        n = self.model.config.image_size // self.model.config.patch_size
        return n, n

    def forward(self, pixels: list[torch.Tensor]) -> list[torch.Tensor]:
        """pixels: I tensors (3, gh*patch, gw*patch) in [0, 1] -> I tensors (gh*gw, hidden), row-major cells.

        Images of equal size go through the ViT as one batch; results come back in input order.
        """
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, img in enumerate(pixels):
            groups[self._check(i, img)].append(i)
        out: list[torch.Tensor | None] = [None] * len(pixels)
        device = self.model.embeddings.patch_embedding.weight.device
        mean = torch.tensor(self.image_mean, device=device).view(3, 1, 1)
        std = torch.tensor(self.image_std, device=device).view(3, 1, 1)
        for (h, w), idx in groups.items():
            batch = torch.stack([pixels[i] for i in idx]).to(device, torch.float32)
            batch = (batch - mean) / std
            grid = (h // self.patch_size, w // self.patch_size)
            if self.positions == "navit":
                feats = self._navit_features(batch, grid)
            else:
                feats = self.model(
                    pixel_values=batch, interpolate_pos_encoding=grid != self.native_grid
                ).last_hidden_state  # (B, gh*gw, hidden)
            for j, i in enumerate(idx):
                out[i] = feats[j]
        return out  # type: ignore[return-value]

    def _navit_features(self, batch: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, gh*gw, hidden) features of normalised images (B, 3, H, W) whose patches take the rows
        `row * S + column` of the position table (S its native side): SigLIP's own forward (patch embedding,
        encoder, final norm) with that one change."""
        side = self.native_grid[0]
        gh, gw = grid
        if gh > side or gw > side:
            raise DataError(f"a {gh}x{gw} ViT token grid does not fit the ViT's {side}x{side} position table "
                            f"(vit_positions 'navit' does not interpolate): resize the image to at most "
                            f"{side * self.patch_size} pixels a side")
        emb = self.model.embeddings
        x = emb.patch_embedding(batch.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        rows = torch.arange(gh, device=x.device)[:, None] * side + torch.arange(gw, device=x.device)[None, :]
        x = x + emb.position_embedding(rows.flatten())[None]
        h = self.model.encoder(inputs_embeds=x).last_hidden_state
        return self.model.post_layernorm(h)

    def _check(self, i: int, img: torch.Tensor) -> tuple[int, int]:
        p = self.patch_size
        if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] % p or img.shape[2] % p or img.shape[1] == 0:
            raise DataError(
                f"ViT input {i} has shape {tuple(img.shape)}; expected (3, H, W) with H and W positive multiples "
                f"of the ViT patch size {p} - resize the image to a multiple of {p} pixels"
            )
        return int(img.shape[1]), int(img.shape[2])


class MLPConnector(nn.Module):
    """Linear -> GELU(tanh) -> Linear: maps ViT features (in_dim) into the LLM's hidden size (out_dim)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
