"""Timestep embedding and AdaLN modulation: zero-initialised so a modulated layer starts as the plain layer."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_timestep_embedding

from mogao.model.timestep import AdaLNModulation, AdditiveTimestep, TimestepEmbedder, gated_residual, modulate


def test_embedder_uses_sinusoid_of_1000_sigma():
    emb = TimestepEmbedder(hidden=16, freq_dim=8)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    out = emb(sigma)
    assert out.shape == (3, 16)
    feats = get_timestep_embedding(sigma * 1000, 8, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(out, emb.mlp(feats))
    assert not torch.allclose(out[0], out[1])


def _layer(x, mlp, norm, mod=None):
    """A pre-norm residual MLP block, optionally AdaLN-modulated (the pattern the generation expert uses)."""
    if mod is None:
        return x + mlp(norm(x))
    shift, scale, gate = mod
    return gated_residual(x, mlp(modulate(norm(x), shift, scale)), gate)


def test_zero_init_modulated_layer_equals_plain_layer():
    torch.manual_seed(0)
    hidden, cond_dim, m = 16, 8, 5
    ada = AdaLNModulation(cond_dim, hidden)
    cond = torch.randn(m, cond_dim)
    parts = ada(cond)
    assert len(parts) == 6 and all(p.shape == (m, hidden) for p in parts)
    assert all(torch.count_nonzero(p) == 0 for p in parts)
    x = torch.randn(m, hidden)
    mlp, norm = torch.nn.Linear(hidden, hidden), torch.nn.LayerNorm(hidden)
    shift_a, scale_a, gate_a, *_ = parts
    assert torch.equal(_layer(x, mlp, norm, (shift_a, scale_a, gate_a)), _layer(x, mlp, norm))
    assert torch.equal(modulate(x, shift_a, scale_a), x)


def test_gradients_reach_the_modulation_after_one_step():
    torch.manual_seed(1)
    hidden, cond_dim = 8, 4
    ada = AdaLNModulation(cond_dim, hidden)
    embed = TimestepEmbedder(cond_dim, freq_dim=8)
    mlp, norm = torch.nn.Linear(hidden, hidden), torch.nn.LayerNorm(hidden)
    x, target = torch.randn(6, hidden), torch.randn(6, hidden)
    opt = torch.optim.SGD(list(ada.parameters()) + list(embed.parameters()), lr=0.1)
    for _ in range(2):
        shift, scale, gate, *_ = ada(embed(torch.rand(6)))
        loss = (_layer(x, mlp, norm, (shift, scale, gate)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert ada.linear.weight.grad.abs().sum() > 0
        opt.step()
    assert torch.count_nonzero(ada.linear.weight) > 0 and torch.count_nonzero(ada.linear.bias) > 0
    # the embedder sits behind a zero layer: it only gets gradient once the modulation is non-zero
    assert embed.mlp.linear_1.weight.grad.abs().sum() > 0


def test_additive_timestep_starts_as_no_op_and_learns():
    add = AdditiveTimestep(hidden=12, freq_dim=8)
    sigma = torch.rand(4)
    out = add(sigma)
    assert out.shape == (4, 12) and torch.count_nonzero(out) == 0
    (out * torch.randn(4, 12)).sum().backward()
    assert add.embedder.mlp.linear_2.weight.grad.abs().sum() > 0
