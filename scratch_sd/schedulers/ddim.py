"""DDIM: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (arXiv:2010.02502)."""
from __future__ import annotations

import numpy as np
import torch

from .base import COMMON_CHECKS, Scheduler, PredX0SchedulerOutput, check_num_inference_steps, configured
from .common import (VPVelocity, alphas_cumprod_from_betas, clip_pred_original, make_betas, pred_x0_and_eps,
                     randn_tensor, rescale_zero_terminal_snr, spaced_timesteps)


def ddim_sigma(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) = eta * sqrt((1 - abar_{t-1}) / (1 - abar_t)) * sqrt(1 - abar_t / abar_{t-1}), eq. 16."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    return eta * variance ** (0.5)


def ddim_update(pred_original_sample: torch.Tensor, pred_epsilon: torch.Tensor, alpha_prod_t_prev: torch.Tensor,
                std_dev_t: torch.Tensor) -> torch.Tensor:
    """Eq. 12 without its noise term: sqrt(abar_{t-1}) x_0 + sqrt(1 - abar_{t-1} - sigma_t^2) eps."""
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon  # "direction to x_t"
    return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction


class DDIMScheduler(VPVelocity, Scheduler):
    """DDIM sampler (eta = 0: deterministic; eta = 1: DDPM-like) with diffusers' DDIMScheduler semantics.

    Parity knobs: `set_alpha_to_one` picks abar_prev at the final step (1.0, or abar_0 as in SD 1.x
    configs); the previous timestep is always t - T // n, whatever `timestep_spacing` is (as diffusers).
    """

    DIFFUSERS_NAME = "DDIMScheduler"
    CHECKS = COMMON_CHECKS

    @configured
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self.betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        # abar "before" t = 0, used by the last step: 1.0, or abar_0 (set_alpha_to_one=False, SD 1.x)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        cfg = self.config
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        ts = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, self.num_inference_steps,
                              cfg.steps_offset, integer=True)
        self.timesteps = torch.from_numpy(ts).to(device)

    def _alpha_prod_prev(self, prev_timestep) -> torch.Tensor:
        return self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> PredX0SchedulerOutput | tuple:
        """x_t -> x_{t-1} by eq. 12, with sigma_t(eta) from eq. 16."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        cfg = self.config
        # 1. previous timestep t - T // n
        prev_timestep = timestep - cfg.num_train_timesteps // self.num_inference_steps
        # 2. alpha_bar_t, alpha_bar_{t-1}
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self._alpha_prod_prev(prev_timestep)
        beta_prod_t = 1 - alpha_prod_t
        # 3. predicted x_0 and eps (eq. 12's "predicted x_0")
        pred_original_sample, pred_epsilon = pred_x0_and_eps(model_output, sample, alpha_prod_t, beta_prod_t,
                                                             cfg.prediction_type)
        # 4. clip x_0
        pred_original_sample = clip_pred_original(pred_original_sample, cfg.clip_sample, cfg.clip_sample_range, cfg)
        # 5. sigma_t(eta), eq. 16
        std_dev_t = ddim_sigma(alpha_prod_t, alpha_prod_t_prev, eta)
        if use_clipped_model_output:  # re-derive eps from the clipped x_0 (as in GLIDE)
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        # 6-7. x_{t-1} without noise, eq. 12
        prev_sample = ddim_update(pred_original_sample, pred_epsilon, alpha_prod_t_prev, std_dev_t)
        # 8. + sigma_t z
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either "
                                 "`generator` or `variance_noise` stays `None`.")
            if variance_noise is None:
                variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                              dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return PredX0SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
