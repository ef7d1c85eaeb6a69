"""From-scratch diffusion schedulers, equal to diffusers' (timesteps and sigmas bit-exact, sampling loops to fp32
rounding). Pure functions per update rule, thin classes that take diffusers' scheduler config.

    from scratch_sd.schedulers import get_scheduler, SD15_SCHEDULER_CONFIG
    sched = get_scheduler("dpmpp_2m", SD15_SCHEDULER_CONFIG)     # keys of other schedulers are skipped
    pipe.scheduler = sched                                     # runs inside diffusers' pipelines
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import (CONFIG_NAME, DIFFUSERS_VERSION, KNOWN_SCHEDULER_KEYS, BaseOutput, PredX0SchedulerOutput, Scheduler,
                   SchedulerConfig, SchedulerOutput, SdeVeOutput)
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .sde_ve import ScoreSdeVeScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
    "sde_ve": ScoreSdeVeScheduler,
}

DIFFUSERS_CLASS_NAMES: dict[str, str] = {name: cls.DIFFUSERS_NAME for name, cls in SCHEDULERS.items()}

# Stable Diffusion 1.5's scheduler/scheduler_config.json (runwayml/stable-diffusion-v1-5), plus the
# timestep_spacing it implies ("leading"; the file predates the key) and prediction_type.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def get_scheduler(name: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Scheduler:
    """A scheduler by registry name, built with `from_config` (so a full scheduler_config.json works)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config or {}, **overrides)


def img2img_timesteps(scheduler, num_inference_steps: int, strength: float,
                      device: str | torch.device | None = None) -> tuple[torch.Tensor, int]:
    """The denoising schedule of img2img at `strength` (diffusers' StableDiffusionImg2ImgPipeline.get_timesteps).

    Sets the scheduler's timesteps, keeps the last int(n * strength) of them (times `scheduler.order`
    entries per step), and tells the scheduler where it starts (`set_begin_index`) so that `add_noise`
    and the first `step` use that sigma. Returns (timesteps, number of denoising steps).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"The value of strength should in [0.0, 1.0] but is {strength}")
    scheduler.set_timesteps(num_inference_steps, device=device)
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps[t_start * order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return timesteps, num_inference_steps - t_start


__all__ = [
    "BaseOutput", "CONFIG_NAME", "DIFFUSERS_VERSION", "PredX0SchedulerOutput",
    "BaseOutput", "CONFIG_NAME", "DIFFUSERS_VERSION", "PredX0SchedulerOutput",
    "DDIMScheduler", "DDPMScheduler", "DIFFUSERS_CLASS_NAMES", "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "KNOWN_SCHEDULER_KEYS", "LMSDiscreteScheduler",
    "PNDMScheduler", "SCHEDULERS", "SD15_SCHEDULER_CONFIG", "Scheduler", "SchedulerConfig", "SchedulerOutput",
    "ScoreSdeVeScheduler", "SdeVeOutput", "get_scheduler", "img2img_timesteps",
]
