"""Variance-exploding SDE sampler: Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole 2021,
"Score-Based Generative Modeling through Stochastic Differential Equations" (arXiv:2011.13456).
Predictor: reverse-diffusion / Euler-Maruyama (eq. 6, 47); corrector: Langevin dynamics (Algorithm 4).
The model output is the score grad_x log p_t(x)."""
from __future__ import annotations

import math

import torch

from .base import Number, Scheduler, SchedulerOutput, SdeVeOutput, check_num_inference_steps, configured
from .common import broadcast_to_sample, randn_tensor


def ve_sigma(sigma_min: float, sigma_max: float, t: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t, t in [eps, 1] (sec. 3.4, VE SDE)."""
    return sigma_min * (sigma_max / sigma_min) ** t


def reverse_diffusion_predictor(sample: torch.Tensor, score: torch.Tensor, sigma: torch.Tensor,
                                adjacent_sigma: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{i-1} = x_i + (sigma_i^2 - sigma_{i-1}^2) score + sqrt(sigma_i^2 - sigma_{i-1}^2) z (eq. 47 for VE).
    Returns (x_{i-1}, its mean without noise)."""
    diffusion = (sigma**2 - adjacent_sigma**2) ** 0.5
    diffusion = broadcast_to_sample(diffusion, sample)
    drift = torch.zeros_like(sample) - diffusion**2 * score
    prev_sample_mean = sample - drift  # minus: dt is a negative time step
    return prev_sample_mean + diffusion * noise, prev_sample_mean


def langevin_corrector(sample: torch.Tensor, score: torch.Tensor, noise: torch.Tensor, snr: float) -> torch.Tensor:
    """Algorithm 4: step eps = 2 (r ||z|| / ||score||)^2, x <- x + eps score + sqrt(2 eps) z
    (norms are per-sample, averaged over the batch)."""
    grad_norm = torch.norm(score.reshape(score.shape[0], -1), dim=-1).mean()
    noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
    step_size = (snr * noise_norm / grad_norm) ** 2 * 2
    step_size = step_size * torch.ones(sample.shape[0]).to(sample.device)
    step_size = broadcast_to_sample(step_size, sample)
    prev_sample_mean = sample + step_size * score
    return prev_sample_mean + ((step_size * 2) ** 0.5) * noise


class ScoreSdeVeScheduler(Scheduler):
    """VE-SDE predictor-corrector with diffusers' ScoreSdeVeScheduler semantics.

    Continuous time: timesteps run from 1 down to `sampling_eps` (float32); `set_sigmas` fills both the
    continuous `sigmas` and the geometric `discrete_sigmas` the predictor uses. More inference steps than
    `num_train_timesteps` is allowed here (as diffusers), since nothing is indexed by training step.
    """

    DIFFUSERS_NAME = "ScoreSdeVeScheduler"
    CHECKS = {
        "num_train_timesteps": Number(1, integer=True),
        "snr": Number(0.0, lo_open=True),
        "sigma_min": Number(0.0, lo_open=True),
        "sigma_max": Number(0.0, lo_open=True),
        "sampling_eps": Number(0.0, 1.0, lo_open=True),
        "correct_steps": Number(0, integer=True),
    }

    @configured
    def __init__(self, num_train_timesteps: int = 2000, snr: float = 0.15, sigma_min: float = 0.01,
                 sigma_max: float = 1348.0, sampling_eps: float = 1e-5, correct_steps: int = 1):
        if sigma_max <= sigma_min:
            raise ValueError(f"ScoreSdeVeScheduler: sigma_max={sigma_max!r} must exceed sigma_min={sigma_min!r}")
        self.init_noise_sigma = sigma_max
        self.timesteps = None
        self.set_sigmas(num_train_timesteps, sigma_min, sigma_max, sampling_eps)

    @property
    def num_inference_steps(self) -> int | None:
        return None if self.timesteps is None else len(self.timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, sampling_eps: float | None = None, device=None):
        """Continuous timesteps t_i = linspace(1, sampling_eps, n) (float32)."""
        num_inference_steps = check_num_inference_steps(num_inference_steps, None)
        sampling_eps = sampling_eps if sampling_eps is not None else self.config.sampling_eps
        self.timesteps = torch.linspace(1, sampling_eps, num_inference_steps, device=device)

    def set_sigmas(self, num_inference_steps: int, sigma_min: float | None = None, sigma_max: float | None = None,
                   sampling_eps: float | None = None):
        """sigmas[i] = sigma(t_i) for the current timesteps; discrete_sigmas: n geometric steps min -> max."""
        num_inference_steps = check_num_inference_steps(num_inference_steps, None)
        sigma_min = sigma_min if sigma_min is not None else self.config.sigma_min
        sigma_max = sigma_max if sigma_max is not None else self.config.sigma_max
        sampling_eps = sampling_eps if sampling_eps is not None else self.config.sampling_eps
        if self.timesteps is None:
            self.set_timesteps(num_inference_steps, sampling_eps)
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), num_inference_steps))
        # element by element, as diffusers (a vectorised pow can differ in the last bit)
        self.sigmas = torch.tensor([ve_sigma(sigma_min, sigma_max, t) for t in self.timesteps])

    def get_adjacent_sigma(self, timesteps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """sigma_{i-1} of the discrete grid (0 below the first)."""
        return torch.where(timesteps == 0, torch.zeros_like(t.to(timesteps.device)),
                           self.discrete_sigmas[timesteps - 1].to(timesteps.device))

    def step_pred(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                  generator: torch.Generator | None = None, return_dict: bool = True) -> SdeVeOutput | tuple:
        """Predictor: one reverse-diffusion step from continuous time `timestep`."""
        if self.timesteps is None:
            raise ValueError("`self.timesteps` is not set, you need to run 'set_timesteps' after creating the scheduler")
        # 1. continuous t -> index into the discrete sigma grid
        timestep = timestep * torch.ones(sample.shape[0], device=sample.device)
        timesteps = (timestep * (len(self.timesteps) - 1)).long().to(self.discrete_sigmas.device)
        sigma = self.discrete_sigmas[timesteps].to(sample.device)
        adjacent_sigma = self.get_adjacent_sigma(timesteps, timestep).to(sample.device)
        # 2. noise z, then the Euler-Maruyama step
        noise = randn_tensor(sample.shape, layout=sample.layout, generator=generator, device=sample.device,
                             dtype=sample.dtype)
        prev_sample, prev_sample_mean = reverse_diffusion_predictor(sample, model_output, sigma, adjacent_sigma, noise)
        if not return_dict:
            return (prev_sample, prev_sample_mean)
        return SdeVeOutput(prev_sample=prev_sample, prev_sample_mean=prev_sample_mean)

    def step_correct(self, model_output: torch.Tensor, sample: torch.Tensor,
                     generator: torch.Generator | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """Corrector: one Langevin step at the current noise level."""
        if self.timesteps is None:
            raise ValueError("`self.timesteps` is not set, you need to run 'set_timesteps' after creating the scheduler")
        noise = randn_tensor(sample.shape, layout=sample.layout, generator=generator).to(sample.device)
        prev_sample = langevin_corrector(sample, model_output, noise, self.config.snr)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> SdeVeOutput | tuple:
        """`step` = the predictor, so generic loops can drive this scheduler (diffusers has no `step` here)."""
        return self.step_pred(model_output, timestep, sample, generator=generator, return_dict=return_dict)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor | None,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 + discrete_sigmas[timesteps] * noise (integer indices into the discrete grid)."""
        timesteps = timesteps.to(original_samples.device)
        sigmas = self.discrete_sigmas.to(original_samples.device)[timesteps]
        if noise is None:
            noise = torch.randn_like(original_samples)
        return noise * sigmas[:, None, None, None] + original_samples
