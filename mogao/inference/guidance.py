"""Classifier-free guidance for image sampling: Mogao's multi-modal CFG, or BAGEL's, as options of one `Guidance`.

Each conversation has three KV cache rows; what rows 1 and 2 hold depends on the mode.

Mode "mogao" (the default):
- full: everything (text and condition images);
- image (row 1): the text dropped, condition images kept;
- none (row 2): text and condition images dropped (images the model generated earlier stay, as they are
  generation targets in training and condition dropout never removes those).

    v = v(∅) + γ_img·(v(img) − v(∅)) + γ·(v(img, txt) − v(img))        (3 branches, with a condition image)
    v = v(∅) + γ·(v(txt) − v(∅))                                          (2 branches, without one)

  guided at the steps with lo ≤ σ ≤ hi; optional renorm of the result to the full branch's norm.

Mode "bagel" (ByteDance-Seed/Bagel `inferencer.py` 226-282, `modeling/bagel/bagel.py` 693-746, 873-907):
- full: everything;
- text dropped (row 1): the context as it was before the last text the user gave - a snapshot of the full
  context taken before each user text segment and after each image (the user's or one the model drew), so
  text the model wrote since is missing too;
- images dropped (row 2): the user's text only - no image, and no text the model wrote;

  combined by `mogao.bagel.rules.combine_cfg` (the text step, then the image step; no guidance at all unless
  γ > 1; the image branch only when γ_img > 1, with or without condition images), renormalised by
  `renorm_type` ("global", "channel", or "text_channel": after the text step only) unless `renorm` is False,
  and guided at the steps with lo < σ ≤ hi (`rules.cfg_applies`). σ is the shifted time the model sees (the
  sampler's σ; BAGEL's t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mogao.bagel.rules import RENORM_TYPES, cfg_applies, combine_cfg
from mogao.errors import ConfigError

FULL, IMAGE_ONLY, NONE = 0, 1, 2  # Mogao's branches
TEXT_DROPPED, IMAGES_DROPPED = 1, 2  # BAGEL's branches (the same two rows)
BRANCHES = (FULL, IMAGE_ONLY, NONE)
GUIDANCE_MODES = ("mogao", "bagel")


@dataclass
class Guidance:
    """Classifier-free guidance settings.

    text_scale: γ, the weight of the text condition (7.5 in Mogao; BAGEL's inferencer uses 4); 1 with
        image_scale 1 = no guidance (mode "bagel": γ <= 1 = no guidance, whatever γ_img).
    image_scale: γ_img, the weight of the condition images (1.5 in Mogao and BAGEL); mode "mogao" uses it only
        with condition images, mode "bagel" whenever it is above 1.
    interval: (σ_lo, σ_hi): the steps guidance applies at - σ_lo ≤ σ ≤ σ_hi (mode "mogao") or σ_lo < σ ≤ σ_hi
        (mode "bagel", BAGEL's rule; its inferencer uses (0.4, 1.0)); elsewhere only the full branch runs.
    renorm: rescale the guided velocity so its norm does not exceed the full branch's. None: the mode's own
        choice - off for "mogao", on for "bagel" (BAGEL always renormalises).
    renorm_min: the smallest rescale factor renorm may apply (0 = no lower bound).
    mode: "mogao" or "bagel": the branches, the formula and the interval rule (see the module docstring).
    renorm_type: what the renorm measures: "global" (the whole image), "channel" (each token), or, mode "bagel"
        only, "text_channel" (each token, after the text step only - BAGEL's).
    """

    text_scale: float = 7.5
    image_scale: float = 1.5
    interval: tuple[float, float] = (0.0, 1.0)
    renorm: bool | None = None
    renorm_min: float = 0.0
    mode: str = "mogao"
    renorm_type: str = "global"

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
        if self.mode not in GUIDANCE_MODES:
            raise ConfigError(f"cfg mode must be one of {', '.join(GUIDANCE_MODES)}, got {self.mode!r}")
        if self.renorm_type not in RENORM_TYPES:
            raise ConfigError(f"cfg renorm_type must be one of {', '.join(RENORM_TYPES)}, got {self.renorm_type!r}")
        if self.renorm_type == "text_channel" and self.mode != "bagel":
            raise ConfigError("cfg renorm_type 'text_channel' renormalises between BAGEL's text and image steps: it "
                              "needs mode 'bagel'")

    @property
    def renormalises(self) -> bool:
        """Whether the guided velocity is renormalised (`renorm`, or the mode's choice when it is None)."""
        return self.mode == "bagel" if self.renorm is None else bool(self.renorm)

    @property
    def enabled(self) -> bool:
        if self.mode == "bagel":
            return self.text_scale > 1.0
        return self.text_scale != 1.0 or self.image_scale != 1.0

    def active_at(self, sigma: float) -> bool:
        """Whether the step at σ is guided."""
        if self.mode == "bagel":
            return self.enabled and cfg_applies(sigma, self.interval)
        return self.enabled and self.interval[0] <= sigma <= self.interval[1]

    def branches(self, has_condition_image: bool) -> tuple[int, ...]:
        """The branches a guided step runs: mode "mogao": 3 with a condition image, else full and none; mode
        "bagel": full and text dropped, and images dropped when image_scale > 1."""
        if self.mode == "bagel":
            return (FULL, TEXT_DROPPED, IMAGES_DROPPED) if self.image_scale > 1.0 else (FULL, TEXT_DROPPED)
        return (FULL, IMAGE_ONLY, NONE) if has_condition_image else (FULL, NONE)

    def combine(self, v: dict[int, torch.Tensor]) -> torch.Tensor:
        """Guided velocity from the branches' velocities (each (n_tokens, token_dim)), renormed if asked."""
        if self.mode == "bagel":
            return self._combine_bagel(v)
        full, none = v[FULL], v[NONE]
        if IMAGE_ONLY in v:
            img = v[IMAGE_ONLY]
            out = none + self.image_scale * (img - none) + self.text_scale * (full - img)
        else:
            out = none + self.text_scale * (full - none)
        if self.renormalises:
            # never let guidance make the velocity longer than the conditional one (BAGEL's renorm)
            if self.renorm_type == "channel":
                ratio = full.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            else:
                ratio = full.norm() / out.norm().clamp_min(1e-12)
            out = out * ratio.clamp(min=self.renorm_min, max=1.0)
        return out

    def _combine_bagel(self, v: dict[int, torch.Tensor]) -> torch.Tensor:
        full, no_text, no_image = v[FULL], v.get(TEXT_DROPPED), v.get(IMAGES_DROPPED)
        if self.renormalises:
            return combine_cfg(full, no_text, no_image, self.text_scale, self.image_scale, self.renorm_type,
                               self.renorm_min)
        if self.text_scale <= 1.0:  # (the same steps without the rescale)
            return full
        out = no_text + self.text_scale * (full - no_text)
        return no_image + self.image_scale * (out - no_image) if self.image_scale > 1.0 else out
