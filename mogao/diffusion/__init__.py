"""Diffusion objectives and samplers: rectified flow (`flow`)."""

from mogao.diffusion.flow import (
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

__all__ = [
    "FlowMatchingLoss",
    "TimestepSampling",
    "add_noise",
    "draw_sigmas_and_noise",
    "euler_sample",
    "resolution_shift",
    "sampling_sigmas",
    "shift_sigmas",
    "velocity_target",
]
