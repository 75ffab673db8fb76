"""The vision side of the training FLOPs (`mogao.training.flops.image_forward_flops`) against counts made
independently of `FlopCounterMode`: the SigLIP ViT in closed form, the VAE encoder from the shapes its
convolutions and linear layers actually produce (forward hooks on a real run)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mogao.training import flops as F
from mogao.training.flops import image_forward_flops


@pytest.fixture(scope="module")
def vit():
    from transformers import SiglipVisionConfig

    from mogao.model.vision import VisionEncoder

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             patch_size=4, image_size=32, vision_use_head=False)
    return VisionEncoder.from_config(cfg)


@pytest.fixture(scope="module")
def vae(tiny_parts):
    from mogao.model.autoencoder import DiffusersVAE

    return DiffusersVAE.from_pretrained(tiny_parts["vae"])


@pytest.mark.parametrize("size", [(32, 32), (16, 24)])
def test_vit_flops_closed_form(vit, size):
    c = vit.config
    h, i, p = c.hidden_size, c.intermediate_size, c.patch_size
    t = (size[0] // p) * (size[1] // p)
    patch_embed = 2 * t * 3 * p * p * h
    per_layer = 2 * t * 4 * h * h + 2 * t * 2 * h * i + 4 * t * t * h  # q,k,v,o + MLP + scores and values
    assert image_forward_flops(vit, size) == patch_embed + c.num_hidden_layers * per_layer


def _hooked_encoder_flops(vae, image: torch.Tensor) -> int:
    """2 x multiply-adds of every Conv2d / Linear the encode pass runs, from their real output shapes, plus
    the mid-block attention's scores and weighted values (4 * T^2 * C)."""
    total = 0
    hooks = []

    def count(module: nn.Module, inputs, output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += 2 * output.numel() * k
        elif isinstance(module, nn.Linear):
            total += 2 * output.numel() * module.in_features
            if module.out_features == module.in_features and getattr(module, "_is_query", False):
                t, ch = output.shape[-2], output.shape[-1]
                total += 4 * t * t * ch

    encoder_side = [vae.vae.encoder]
    if getattr(vae.vae, "quant_conv", None) is not None:
        encoder_side.append(vae.vae.quant_conv)
    for part in encoder_side:
        for name, m in part.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m._is_query = name.endswith("to_q")
                hooks.append(m.register_forward_hook(count))
    try:
        with torch.no_grad():
            vae.encode([image])
    finally:
        for hk in hooks:
            hk.remove()
    return total


@pytest.mark.parametrize("size", [(32, 32), (16, 32)])
def test_vae_encoder_flops_match_hooked_shapes(vae, size):
    image = torch.rand(3, *size)
    want = _hooked_encoder_flops(vae, image)
    assert want > 0
    assert image_forward_flops(vae, size, encoder=True) == want


def test_rebuilt_copy_counts_like_a_deep_copy(vit, vae):
    """Under FSDP the vision modules are rebuilt from their configs: the count must not change."""
    for module, run in ((vit, F._run_vit), (vae, F._run_encoder)):
        counts = []
        for shadow in (F._meta_copy(module), F._rebuild_on_meta(module)):
            from torch.utils.flop_counter import FlopCounterMode

            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                run(shadow, torch.zeros(3, 32, 32, device="meta"))
            counts.append(counter.get_total_flops())
        assert counts[0] == counts[1] > 0
