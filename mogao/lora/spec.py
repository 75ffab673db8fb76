"""`LoraSpec`: what a LoRA / QLoRA fine-tune adapts, as a dataclass the Lightning CLI reads from YAML.

    model:
      init_args:
        init_from: runs/tiny/interleaved/model
        lora:
          gen: [q_proj, k_proj, v_proj, o_proj]   # only the generation expert's attention
          und: [q_proj, v_proj]
          rank: 16
          alpha: 32
          full: [connector]                       # trained in full, alongside the adapters

Module names are those inside one expert of a decoder layer (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`);
"attn", "mlp" and "all" are shorthands. They become one regex over the model's qualified module names, e.g.
`backbone.layers.3.gen.self_attn.q_proj`, which is what `peft` matches.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mogao.errors import ConfigError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SHORTHANDS = {"attn": ATTENTION, "mlp": MLP, "all": ATTENTION + MLP}
FULL_PARTS = ("vit", "connector", "latent_proj", "time_embed")
"""Parts that can train in full alongside the adapters: the SigLIP encoder, the ViT->LLM connector, the latent
in/out projections and the timestep embedder."""


@dataclass
class LoraSpec:
    """A LoRA fine-tune of a Mogao model: adapters on either or both experts, optionally some parts in full.

    Attributes:
        und: modules of the understanding expert to adapt (per layer); [] leaves the expert frozen.
        gen: modules of the generation expert to adapt (per layer); [] leaves the expert frozen.
        layers: indices of the decoder layers to adapt (None: every layer; negative counts from the end).
        rank: LoRA rank r.
        alpha: LoRA scaling numerator (the update is scaled by alpha / rank).
        dropout: dropout on the adapter's input.
        dora: weight-decomposed LoRA (DoRA) instead of plain LoRA.
        full: parts trained in full next to the adapters: any of "vit", "connector", "latent_proj", "time_embed".
        quantize: "nf4" stores the adapted experts' base Linear weights in 4-bit NF4 (bitsandbytes) with bf16
            compute - QLoRA; pair it with `bitsandbytes.optim.PagedAdamW8bit` as the optimizer. Needs CUDA: on
            CPU the run goes on as plain LoRA and says so in a warning.
    """

    und: list[str] = field(default_factory=list)
    gen: list[str] = field(default_factory=lambda: list(ATTENTION))
    layers: list[int] | None = None
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    dora: bool = False
    full: list[str] = field(default_factory=list)
    quantize: Literal["none", "nf4"] = "none"

    def __post_init__(self) -> None:
        for expert in ("und", "gen"):
            names = getattr(self, expert)
            if isinstance(names, str):
                names = [names]
            setattr(self, expert, list(names))
            self.modules(expert)  # validates
        if not (self.und or self.gen):
            raise ConfigError("model.lora: no module to adapt; give lora.und and/or lora.gen, e.g. "
                              "gen: [q_proj, k_proj, v_proj, o_proj]")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"model.lora.rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout!r}")
        bad = [p for p in self.full if p not in FULL_PARTS]
        if bad:
            raise ConfigError(f"model.lora.full: unknown part(s) {bad}; choose from {list(FULL_PARTS)}")
        if self.quantize not in ("none", "nf4"):
            raise ConfigError(f"model.lora.quantize must be 'none' or 'nf4', got {self.quantize!r}")

    def modules(self, expert: str) -> list[str]:
        """The expert's adapted module names, shorthands expanded, in a fixed order (no duplicates)."""
        names: list[str] = []
        for n in getattr(self, expert):
            for m in SHORTHANDS.get(n, (n,)):
                if m not in ATTENTION + MLP:
                    raise ConfigError(f"model.lora.{expert}: unknown module {n!r}; choose from "
                                      f"{list(ATTENTION + MLP)} or the shorthands {list(SHORTHANDS)}")
                if m not in names:
                    names.append(m)
        return [m for m in ATTENTION + MLP if m in names]

    def target_regex(self, num_layers: int) -> str:
        """One regex that fully matches the qualified names of every adapted Linear layer (peft's
        `target_modules` as a string)."""
        if self.layers is None:
            layer = r"\d+"
        else:
            idx = sorted({i % num_layers for i in self.layers if -num_layers <= i < num_layers})
            if len(idx) != len(set(self.layers)):
                raise ConfigError(f"model.lora.layers: {self.layers} names layers the model does not have "
                                  f"(it has {num_layers})")
            layer = "(?:" + "|".join(str(i) for i in idx) + ")"
        experts = []
        for expert in ("und", "gen"):
            mods = self.modules(expert)
            if mods:
                paths = [f"self_attn\\.{m}" if m in ATTENTION else f"mlp\\.{m}" for m in mods]
                experts.append(f"{expert}\\.(?:{'|'.join(paths)})")
        return rf"backbone\.layers\.{layer}\.(?:{'|'.join(experts)})"

    def matches(self, name: str, num_layers: int) -> bool:
        return re.fullmatch(self.target_regex(num_layers), name) is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)
