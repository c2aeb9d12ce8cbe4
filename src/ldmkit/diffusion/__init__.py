"""Diffusion math: noise schedules, training objectives / denoiser wrappers, and samplers (sigma space).

Backbones live in `ldmkit.diffusion.unet` and `ldmkit.diffusion.dit`; import them from there.
"""

from ldmkit.seeding import example_generators

from .objectives import Objective, draw_training_noise, make_denoiser, training_loss
from .samplers import SAMPLERS, get_sampler, prior_noise
from .schedules import FlowSchedule, VPSchedule, get_schedule, karras_sigmas

__all__ = [
    "Objective", "draw_training_noise", "make_denoiser", "training_loss",
    "SAMPLERS", "example_generators", "get_sampler", "prior_noise",
    "FlowSchedule", "VPSchedule", "get_schedule", "karras_sigmas",
]
