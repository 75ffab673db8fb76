"""Named parts of a `MogaoModel` that stages train or freeze: one place that says which parameter is where."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from mogao.errors import ConfigError

PARTS = ("und", "gen", "vit", "connector")
"""und: the understanding expert (embeddings, its half of every layer, final norm, LM head);
gen: the generation expert (its half of every layer, AdaLN, timestep embedding, latent projections);
vit: the SigLIP encoder; connector: the ViT→LLM MLP. The autoencoder is always frozen."""


def part_parameters(model: nn.Module) -> dict[str, dict[str, nn.Parameter]]:
    """{part: {qualified parameter name: parameter}} covering every parameter outside the autoencoder."""
    names = {id(p): n for n, p in model.named_parameters()}
    gen = list(model.backbone.generation_parameters()) + list(model.latent_proj.parameters())
    if getattr(model, "additive_time", None) is not None:  # (AdaLN's σ embedding is then not used)
        gen += list(model.additive_time.parameters())
    else:
        gen += list(model.time_embed.parameters())
    groups = {
        "und": list(model.backbone.understanding_parameters()),
        "gen": gen,
        "vit": list(model.vit.parameters()),
        "connector": list(model.connector.parameters()),
    }
    return {k: {names[id(p)]: p for p in ps} for k, ps in groups.items()}


def check_parts(parts: Iterable[str], what: str = "train") -> list[str]:
    parts = list(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ConfigError(f"{what}: unknown part(s) {bad}; choose from {list(PARTS)}")
    return parts


def check_lr_scale(scale: dict[str, float], what: str = "model.lr_scale") -> dict[str, float]:
    """A learning-rate multiplier per part: known parts, finite multipliers > 0 (a part that must not learn is
    left out of `train`)."""
    check_parts(scale, what)
    bad = {k: v for k, v in scale.items() if not isinstance(v, (int, float)) or not 0.0 < float(v) < float("inf")}
    if bad:
        raise ConfigError(f"{what}: multipliers must be finite numbers > 0 (to freeze a part, leave it out of "
                          f"train), got {bad}")
    return scale


def set_trainable(model: nn.Module, parts: Iterable[str]) -> dict[str, int]:
    """Make exactly `parts` trainable (everything else frozen); returns trainable parameter counts per part."""
    parts = check_parts(parts)
    groups = part_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    counts = {}
    for name in parts:
        for p in groups[name].values():
            p.requires_grad_(True)
        counts[name] = sum(p.numel() for p in groups[name].values())
    return counts
