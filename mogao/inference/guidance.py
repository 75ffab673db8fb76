"""Classifier-free guidance for image sampling: Mogao's multi-modal CFG, BAGEL's interval and renorm.

Three conditioning branches of one context, each with its own KV cache row:
- full: everything (text and condition images);
- image: the text dropped, condition images kept;
- none: text and condition images dropped (images the model generated earlier stay, as they are generation
  targets in training and condition dropout never removes those).

    v = v(∅) + γ_img·(v(img) − v(∅)) + γ·(v(img, txt) − v(img))        (3 branches, with a condition image)
    v = v(∅) + γ·(v(txt) − v(∅))                                          (2 branches, without one)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mogao.errors import ConfigError

FULL, IMAGE_ONLY, NONE = 0, 1, 2
BRANCHES = (FULL, IMAGE_ONLY, NONE)


@dataclass
class Guidance:
    """Classifier-free guidance settings.

    text_scale: γ, the weight of the text condition (7.5 in Mogao); 1 with image_scale 1 = no guidance.
    image_scale: γ_img, the weight of the condition images (1.5 in Mogao); used only with condition images.
    interval: (σ_lo, σ_hi): guidance applies at steps with σ_lo ≤ σ ≤ σ_hi; elsewhere only the full branch runs.
    renorm: rescale the guided velocity so its norm (over the whole image) does not exceed the full branch's.
    renorm_min: the smallest rescale factor renorm may apply (0 = no lower bound).
    """

    text_scale: float = 7.5
    image_scale: float = 1.5
    interval: tuple[float, float] = (0.0, 1.0)
    renorm: bool = False
    renorm_min: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ConfigError(f"cfg interval must satisfy 0 <= lo <= hi <= 1 (σ range), got {self.interval}")
        self.interval = (lo, hi)
        if not 0.0 <= self.renorm_min <= 1.0:
            raise ConfigError(f"cfg renorm_min must be in [0, 1], got {self.renorm_min}")
        for name in ("text_scale", "image_scale"):
            v = float(getattr(self, name))
            if not v == v or v in (float("inf"), float("-inf")):
                raise ConfigError(f"cfg {name} must be a finite number, got {v}")

    @property
    def enabled(self) -> bool:
        return self.text_scale != 1.0 or self.image_scale != 1.0

    def active_at(self, sigma: float) -> bool:
        """Whether the step at σ is guided."""
        return self.enabled and self.interval[0] <= sigma <= self.interval[1]

    def branches(self, has_condition_image: bool) -> tuple[int, ...]:
        """The branches a guided step runs: 3 with a condition image, else full and none."""
        return (FULL, IMAGE_ONLY, NONE) if has_condition_image else (FULL, NONE)

    def combine(self, v: dict[int, torch.Tensor]) -> torch.Tensor:
        """Guided velocity from the branches' velocities (each (n_tokens, token_dim)), renormed if asked."""
        full, none = v[FULL], v[NONE]
        if IMAGE_ONLY in v:
            img = v[IMAGE_ONLY]
            out = none + self.image_scale * (img - none) + self.text_scale * (full - img)
        else:
            out = none + self.text_scale * (full - none)
        if self.renorm:
            # BAGEL's global renorm: never let guidance make the velocity longer than the conditional one
            scale = (full.norm() / out.norm().clamp_min(1e-12)).clamp(min=self.renorm_min, max=1.0)
            out = out * scale
        return out
