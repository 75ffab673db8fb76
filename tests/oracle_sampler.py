"""The test oracle of the generation loop: samplers by full recomputation, every step re-running the whole packed
sequence through `MogaoModel.forward` (no KV cache). Tests compare `mogao.inference` (the cached loop every
caller uses) against it; benchmarks time it as the recompute baseline.

- `sample_images`: one image per context, by Euler integration of the rectified flow (DESIGN §4-5) with
  optional classifier-free guidance. All contexts (and their unconditional copies) are packed into one
  `PackedBatch`; each step asks the model for the velocity of the current noisy tokens
  (`MogaoModel.forward(batch, noisy=...)`).
- `generate_text`: greedy decoding, appending one token and re-running the sequence each time.

No KV cache and no incremental state: slow, but simple enough to serve as the reference a cached generation
loop is checked against. Both samplers put the model in eval mode and restore every module's mode afterwards.

Conventions (`mogao.diffusion.flow`): x_σ = (1 − σ)·x₀ + σ·ε, the model predicts v = ε − x₀, and sampling
integrates dx/dσ = v from σ = 1 (pure noise) to σ = 0 along `sampling_sigmas(steps, shift)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizerBase

from mogao.data.packer import collate_plans
from mogao.data.plan import IGNORE_INDEX, DataConfig, PlanSpan, SequencePlan, lower_sample
from mogao.data.samples import samples_from_dicts
from mogao.data.tokenizer import SpecialTokens
from mogao.diffusion.flow import euler_sample, sampling_sigmas
from mogao.errors import ConfigError
from mogao.inference.images import eval_mode, image_size_wh, tensor_to_pil
from mogao.model.mogao import MogaoModel, NoisyState
from mogao.sequence.batch import PackedBatch
from mogao.sequence.modality import Modality

Context = list[dict[str, Any]]
"""Segments (as in the sample format; a PIL image may stand in for an image path) preceding the output."""

_NO_LIMIT = 2**62  # token budget while lowering: the packed batch is sized to what the contexts need


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _samples(contexts: Sequence[Context], tail: list[dict[str, Any]]) -> list:
    """Validated samples: each context followed by `tail` (ids are positional, so always unique)."""
    raws = [{"id": f"context-{i}", "segments": [*ctx, *tail]} for i, ctx in enumerate(contexts)]
    return samples_from_dicts(raws, name="<sampler>")


# ---- images ------------------------------------------------------------------------------------------------


def build_generation_batch(
    model: MogaoModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Context],
    *,
    image_size: int | Sequence[int] = (32, 32),
    unconditional: bool = False,
) -> tuple[PackedBatch, tuple[int, int]]:
    """Pack every context followed by one generation target of `image_size` (width, height).

    The target is a blank placeholder image: the mask keeps a noisy copy from ever seeing its own clean
    copies, so the placeholder's pixels do not matter. With `unconditional`, each context is followed by its
    unconditional copy (after all conditional ones), lowered exactly like training's condition dropout with
    both text and condition images dropped: `<|vision_start|>`, the target's copies, `<|vision_end|>`, eos.
    Condition images in a context get at most as many tokens per copy as the target.
    Returns the batch (targets in context order, then the unconditional ones) and the target's token grid.
    """
    if not contexts:
        raise ValueError("no contexts to sample from")
    w, h = image_size_wh(image_size)
    vae_patch = model.vae_patch
    if w < 1 or h < 1 or w % vae_patch or h % vae_patch:
        raise ConfigError(
            f"image_size {w}x{h} must be positive multiples of the model's VAE patch ({vae_patch} "
            "pixels: autoencoder downsample x latent patch)"
        )
    grid = (h // vae_patch, w // vae_patch)
    cfg = DataConfig(
        token_budget=_NO_LIMIT,
        max_image_tokens=grid[0] * grid[1],
        vit_patch=model.vit_patch,
        vae_patch=vae_patch,
        p_drop_text=0.0,
        p_drop_images=0.0,
        drop_unread_vae=not model.cfg.text_sees_vae,
    )
    placeholder = {"image": Image.new("RGB", (w, h), (255, 255, 255)), "generate": True}
    samples = _samples(contexts, [placeholder])
    special = SpecialTokens.from_tokenizer(tokenizer)
    plans = [lower_sample(s, tokenizer, cfg, special=special) for s in samples]
    if unconditional:
        drop_all = replace(cfg, p_drop_text=1.0, p_drop_images=1.0)
        plans += [lower_sample(s, tokenizer, drop_all, special=special) for s in samples]
    for plan in plans:
        target = plan.images[-1]
        if not target.is_target or target.grid != grid:
            raise ConfigError(f"the generated image got grid {target.grid}, expected {grid}")
    return collate_plans(plans, sum(p.num_tokens for p in plans)), grid


@torch.no_grad()
def sample_image_tokens(
    model: MogaoModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Context],
    *,
    image_size: int | Sequence[int] = (32, 32),
    steps: int = 20,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """Latent tokens (gh*gw, token_dim) of one generated image per context (float32, CPU) and the grid.

    Image i starts from Gaussian noise of its own generator seeded with `seed + i`, so what a context draws
    does not depend on the other contexts of the call. With `cfg_scale != 1` the velocity is
    v = v_u + cfg_scale·(v_c − v_u), v_u from the unconditional copy packed into the same batch.
    """
    dev = _device_of(model, device)
    guided = cfg_scale != 1.0
    batch, grid = build_generation_batch(
        model, tokenizer, contexts, image_size=image_size, unconditional=guided
    )
    batch = batch.to(dev)
    n_img, per_img = len(contexts), grid[0] * grid[1]
    noise = torch.cat(
        [
            torch.randn(per_img, model.token_dim, generator=torch.Generator().manual_seed(seed + i))
            for i in range(n_img)
        ]
    ).to(dev)
    n_targets = n_img * (2 if guided else 1)

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat((x, x)) if guided else x
        sigmas = torch.full((n_targets,), float(sigma), device=dev)
        v = model(batch, noisy=NoisyState(sigmas=sigmas, tokens=tokens)).velocity.float()
        if not guided:
            return v
        v_cond, v_uncond = v[: x.shape[0]], v[x.shape[0] :]
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    with eval_mode(model):
        x0 = euler_sample(velocity, noise, sampling_sigmas(steps, shift).to(dev))
    return list(x0.float().cpu().split(per_img)), grid


@torch.no_grad()
def sample_images(
    model: MogaoModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Context],
    *,
    image_size: int | Sequence[int] = (32, 32),
    steps: int = 20,
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[Image.Image]:
    """Generate one image per context (text-to-image: `[{"text": prompt}]`; editing: `[image, instruction]`).

    image_size: an int or (width, height) in pixels, multiples of `model.vae_patch`.
    steps / shift: Euler steps over `sampling_sigmas(steps, shift)` (shift > 1 spends more steps near noise).
    cfg_scale: classifier-free guidance scale against the unconditional copy (text and condition images
        dropped); 1 = no guidance.
    seed: image i starts from the noise of seed + i.
    """
    tokens, grid = sample_image_tokens(
        model,
        tokenizer,
        contexts,
        image_size=image_size,
        steps=steps,
        shift=shift,
        cfg_scale=cfg_scale,
        seed=seed,
        device=device,
    )
    dev = _device_of(model, device)
    return [tensor_to_pil(model.decode_tokens(t.to(dev), grid)) for t in tokens]


# ---- text --------------------------------------------------------------------------------------------------


def _without_last_token(plan: SequencePlan) -> SequencePlan:
    """The plan without its final token (the end-of-sample token the lowering appends)."""
    last = plan.spans[-1]
    assert last.kind == Modality.TEXT, "a lowered sample ends in a text token"
    spans = plan.spans[:-1]
    if last.length > 1:
        spans = [
            *spans,
            PlanSpan(Modality.TEXT, last.length - 1, token_ids=last.token_ids[:-1], loss=last.loss[:-1]),
        ]
    return replace(
        plan,
        spans=spans,
        input_ids=plan.input_ids[:-1],
        labels=plan.labels[:-1],
        position_ids=plan.position_ids[:, :-1],
        modality=plan.modality[:-1],
    )


def _with_text(plan: SequencePlan, ids: list[int]) -> SequencePlan:
    """`plan` followed by the text tokens `ids` (positions continue after its last token); no labels."""
    k = len(ids)
    labels = torch.full((plan.num_tokens + k,), IGNORE_INDEX, dtype=torch.long)
    if not k:
        return replace(plan, labels=labels)
    t0 = int(plan.position_ids[0].max()) + 1
    pos = torch.arange(t0, t0 + k).expand(3, k)
    spans = list(plan.spans)
    tail = PlanSpan(Modality.TEXT, k, token_ids=tuple(ids), loss=(False,) * k)
    if spans[-1].kind == Modality.TEXT:
        prev = spans.pop()
        tail = PlanSpan(
            Modality.TEXT,
            prev.length + k,
            token_ids=prev.token_ids + tail.token_ids,
            loss=prev.loss + tail.loss,
        )
    return replace(
        plan,
        spans=[*spans, tail],
        labels=labels,
        input_ids=torch.cat((plan.input_ids, torch.tensor(ids, dtype=torch.long))),
        position_ids=torch.cat((plan.position_ids, pos), dim=1),
        modality=torch.cat((plan.modality, torch.full((k,), int(Modality.TEXT), dtype=torch.long))),
    )


def last_token_rows(batch: PackedBatch) -> torch.Tensor:
    """(S,) physical row of each sample's last logical token (a `text_logits` row when that token is text)."""
    ends = torch.tensor(batch.layout.sample_lengths, dtype=torch.long).cumsum(0) - 1
    return batch.layout.physical_of_logical[ends.to(batch.layout.physical_of_logical.device)]


@torch.no_grad()
def generate_text(
    model: MogaoModel,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Context],
    *,
    max_new_tokens: int = 16,
    max_image_tokens: int = 256,
    device: torch.device | str | None = None,
    lockstep: bool = False,
) -> list[str]:
    """Greedy text continuation of each context (e.g. `[{"image": img}, {"text": "What colour is it?"}]`).

    Decoding stops at `<|endoftext|>`, at a begin-of-image token (this reference decoder does not draw) or
    after `max_new_tokens`; the stop token is not part of the answer. Images in a context get at most
    `max_image_tokens` tokens per copy, as in `DataConfig`. Returns the decoded answers, stripped.
    `lockstep`: run exactly `max_new_tokens` forwards whatever the answers (a sharded model all-gathers in
    every forward, so every rank must run as many; finished answers are kept as they were).
    """
    dev = _device_of(model, device)
    special = SpecialTokens.from_tokenizer(tokenizer)
    stop = {special.eos_id, special.vision_start_id}
    cfg = DataConfig(
        token_budget=_NO_LIMIT,
        max_image_tokens=max_image_tokens,
        vit_patch=model.vit_patch,
        vae_patch=model.vae_patch,
        p_drop_text=0.0,
        p_drop_images=0.0,
        drop_unread_vae=not model.cfg.text_sees_vae,
    )
    prompts = [
        _without_last_token(lower_sample(s, tokenizer, cfg, special=special)) for s in _samples(contexts, [])
    ]
    answers: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    with eval_mode(model):
        for _ in range(max_new_tokens):
            if not active and not lockstep:
                break
            rows = active if active else [0]  # (lockstep with every answer done: a forward all the same)
            plans = [_with_text(prompts[i], answers[i]) for i in rows]
            batch = collate_plans(plans, sum(p.num_tokens for p in plans)).to(dev)
            logits = model(batch, return_logits=True).text_logits
            next_ids = logits[last_token_rows(batch)].argmax(dim=-1).tolist()
            still = []
            for i, token in zip(active, next_ids):
                if token not in stop:
                    answers[i].append(int(token))
                    still.append(i)
            active = still
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in answers]
