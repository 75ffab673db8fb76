"""Rectified flow: noising convention, seeded per-image draws, shifts, the loss and Euler sampling."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mogao.diffusion import (
    FlowMatchingLoss,
    TimestepSampling,
    add_noise,
    draw_sigmas_and_noise,
    euler_sample,
    resolution_shift,
    sampling_sigmas,
    shift_sigmas,
    velocity_target,
)
from mogao.errors import ConfigError


def test_add_noise_endpoints_and_velocity():
    x0, eps = torch.randn(6, 4), torch.randn(6, 4)
    assert torch.equal(add_noise(x0, eps, 0.0), x0)
    assert torch.equal(add_noise(x0, eps, 1.0), eps)
    torch.testing.assert_close(add_noise(x0, eps, 0.25), 0.75 * x0 + 0.25 * eps)
    assert torch.equal(velocity_target(x0, eps), eps - x0)
    # per-token sigma (n,) broadcasts over each token's channels
    sig = torch.linspace(0, 1, 6)
    torch.testing.assert_close(add_noise(x0, eps, sig), add_noise(x0, eps, sig[:, None]))
    # moving along sigma at the target velocity follows the path
    torch.testing.assert_close(
        add_noise(x0, eps, 0.7) - add_noise(x0, eps, 0.2), 0.5 * velocity_target(x0, eps)
    )


def test_euler_with_exact_velocity_recovers_x0():
    """For data concentrated at x0, the exact velocity at (x, σ) is (x − x0)/σ; Euler from σ=1 lands on x0."""
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(5, 3, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64),
    )
    sigmas = sampling_sigmas(7, shift=3.0).double()
    out = euler_sample(lambda x, s: (x - x0) / s, eps, sigmas)
    torch.testing.assert_close(out, x0, atol=1e-10, rtol=0)
    # the constant velocity ε − x0 also integrates to x0 (the sign convention)
    torch.testing.assert_close(euler_sample(lambda x, s: eps - x0, eps, sigmas), x0, atol=1e-10, rtol=0)


def test_euler_step_matches_diffusers_scheduler():
    torch.manual_seed(1)
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sched = FlowMatchEulerDiscreteScheduler(shift=2.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 0.2, 5).tolist())
    sigmas = sampling_sigmas(5, shift=2.0)
    torch.testing.assert_close(sched.sigmas, sigmas)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    x = eps.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step((x - x0) / sched.sigmas[i], t, x).prev_sample
    ours = euler_sample(lambda x, s: (x - x0) / s, eps, sigmas)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def _draw(seeds, shapes, cfg=None, dtype=torch.float32):
    cfg = cfg or TimestepSampling()
    return draw_sigmas_and_noise(
        torch.tensor(seeds, dtype=torch.int64), shapes, [s[0] for s in shapes], cfg, "cpu", dtype
    )


def test_draws_depend_only_on_the_image_seed():
    shapes = [(4, 12), (16, 12), (9, 3)]
    sig, noise = _draw([11, 7, 3], shapes)
    assert sig.shape == (3,) and sig.dtype == torch.float32
    assert [tuple(n.shape) for n in noise] == shapes
    # other order, other grouping (two packs / ranks): same draw per image
    sig_b, noise_b = _draw([3, 11], [shapes[2], shapes[0]])
    sig_c, noise_c = _draw([7], [shapes[1]])
    assert sig_b[0] == sig[2] and sig_b[1] == sig[0] and sig_c[0] == sig[1]
    assert (
        torch.equal(noise_b[0], noise[2])
        and torch.equal(noise_b[1], noise[0])
        and torch.equal(noise_c[0], noise[1])
    )
    # dtype only casts the same float32 draw; σ stays float32
    sig_h, noise_h = _draw([11], [shapes[0]], dtype=torch.bfloat16)
    assert sig_h.dtype == torch.float32 and sig_h[0] == sig[0]
    assert torch.equal(noise_h[0], noise[0].to(torch.bfloat16))
    # different seeds, different draws
    assert sig[0] != sig[1] and not torch.equal(noise[0][:4], noise[1][:4])
    assert _draw([], [])[0].shape == (0,)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_sigmas_inside_unit_interval(scheme):
    cfg = TimestepSampling(weighting_scheme=scheme)
    sig, _ = _draw(list(range(500)), [(1024, 1)] * 500, cfg)
    assert bool(((sig > 0) & (sig < 1)).all())


def test_logit_normal_statistics_and_shift():
    seeds = list(range(2000))
    cfg = TimestepSampling(logit_mean=0.5, logit_std=0.8, use_dynamic_shift=False)
    sig, _ = _draw(seeds, [(1, 1)] * 2000, cfg)
    logit = torch.log(sig / (1 - sig))
    assert abs(logit.mean().item() - 0.5) < 0.06 and abs(logit.std().item() - 0.8) < 0.06
    # a fixed shift maps each unshifted draw through shift_sigmas
    shifted, _ = _draw(seeds, [(1, 1)] * 2000, TimestepSampling(logit_mean=0.5, logit_std=0.8, shift=3.0))
    torch.testing.assert_close(shifted, shift_sigmas(sig, 3.0))
    assert shifted.mean() > sig.mean()


def test_shift_sigmas_properties():
    s = torch.linspace(0, 1, 11)
    out = shift_sigmas(s, 3.0)
    assert out[0] == 0 and out[-1] == 1 and bool((out[1:] > out[:-1]).all()) and bool((out >= s).all())
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)
    # FLUX's exponential time shift with mu equals a shift of exp(mu)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=[1.0, 0.6, 0.3, 0.1], mu=0.8)
    torch.testing.assert_close(
        sched.sigmas[:-1], shift_sigmas(torch.tensor([1.0, 0.6, 0.3, 0.1]), math.exp(0.8))
    )


def test_resolution_shift_monotone_in_token_count():
    cfg = TimestepSampling()
    assert resolution_shift(256, cfg) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096, cfg) == pytest.approx(math.exp(1.15))
    counts = [16, 64, 256, 1024, 4096, 8192]
    shifts = [resolution_shift(n, cfg) for n in counts]
    assert all(a < b for a, b in zip(shifts, shifts[1:]))
    assert cfg.shift_for(1024) == resolution_shift(1024, cfg)
    assert TimestepSampling(shift=2.0).shift_for(1024) == 2.0
    assert TimestepSampling(use_dynamic_shift=False).shift_for(1024) == 1.0
    # larger images get noisier σ from the same seed
    small, _ = _draw([5], [(64, 4)])
    large, _ = _draw([5], [(4096, 4)])
    assert large[0] > small[0]


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="weighting_scheme"):
        TimestepSampling(weighting_scheme="lognormal")
    with pytest.raises(ConfigError, match="max_seq_len"):
        TimestepSampling(base_seq_len=4096, max_seq_len=256)
    with pytest.raises(ConfigError, match="shift"):
        TimestepSampling(shift=0.0)
    with pytest.raises(ConfigError, match="weighting"):
        FlowMatchingLoss("sqrt")


def test_loss_sum_and_weight_sum_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    weights = torch.tensor([1.0, 0.5, 2.0])
    # per-token MSE: (1 + 4)/2 = 2.5, (1 + 1)/2 = 1, (0 + 4)/2 = 2
    total, wsum = FlowMatchingLoss()(pred, target, weights)
    assert total.item() == pytest.approx(2.5 * 1 + 1 * 0.5 + 2 * 2)
    assert wsum.item() == pytest.approx(3.5)
    # tokens with weight 0 (condition images) do not count; the gradient reaches pred
    p = pred.clone().requires_grad_(True)
    total, _ = FlowMatchingLoss()(p, target, torch.tensor([0.0, 1.0, 0.0]))
    total.backward()
    assert total.item() == pytest.approx(1.0)
    assert torch.count_nonzero(p.grad[0]) == 0 and torch.count_nonzero(p.grad[1]) == 2


def test_loss_sigma_weighting():
    pred, target = torch.ones(2, 3), torch.zeros(2, 3)
    weights, sigmas = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25])
    total, wsum = FlowMatchingLoss("sigma_sqrt")(pred, target, weights, sigmas)
    assert total.item() == pytest.approx(1 * 4 + 2 * 16) and wsum.item() == 3.0
    with pytest.raises(ValueError, match="needs each token's sigma"):
        FlowMatchingLoss("cosmap")(pred, target, weights)
    with pytest.raises(ValueError, match="must be"):
        FlowMatchingLoss()(pred, target, torch.ones(3))
