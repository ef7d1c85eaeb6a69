"""DDPM ancestral sampling: Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (arXiv:2006.11239)."""
from __future__ import annotations

import numpy as np
import torch

from .base import COMMON_CHECKS, OneOf, Scheduler, PredX0SchedulerOutput, check_num_inference_steps, configured
from .common import (VPVelocity, alphas_cumprod_from_betas, clip_pred_original, make_betas, pred_x0_and_eps,
                     randn_tensor, rescale_zero_terminal_snr, spaced_timesteps)

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range", None)


def ddpm_posterior_mean(pred_original_sample: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                        alpha_prod_t_prev: torch.Tensor) -> torch.Tensor:
    """mu~_t(x_t, x_0) of q(x_{t-1} | x_t, x_0), Ho et al. 2020 eq. 7."""
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    return pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample


def ddpm_noise_scale(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, variance_type: str,
                     predicted_variance: torch.Tensor | None = None) -> torch.Tensor:
    """Standard deviation of the added noise.

    fixed_small: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (eq. 7); fixed_large: beta_t (sec. 3.2);
    learned / learned_range: Nichol & Dhariwal 2021, eq. 15 (interpolate log beta~_t and log beta_t).
    """
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t
    variance = torch.clamp(variance, min=1e-20)  # log(0) guard at t = 0
    if variance_type in ("fixed_small", None):  # None (a DPM-Solver config's value): diffusers falls through to fixed_small
        return variance**0.5
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(variance))
    if variance_type == "fixed_large":
        return current_beta_t**0.5
    if variance_type == "fixed_large_log":  # as diffusers: the square root of log(beta_t) < 0, i.e. NaN noise
        return torch.log(current_beta_t) ** 0.5
    if variance_type == "learned":
        return predicted_variance**0.5
    if variance_type == "learned_range":
        min_log = torch.log(variance)
        max_log = torch.log(current_beta_t)
        frac = (predicted_variance + 1) / 2
        return torch.exp(0.5 * (frac * max_log + (1 - frac) * min_log))
    raise ValueError(f"unsupported value variance_type={variance_type!r}")


class DDPMScheduler(VPVelocity, Scheduler):
    """Ancestral DDPM sampler with diffusers' DDPMScheduler config and step semantics."""

    DIFFUSERS_NAME = "DDPMScheduler"
    CHECKS = {
        **COMMON_CHECKS,
        "beta_schedule": OneOf("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"),
        "variance_type": OneOf(*VARIANCE_TYPES),
    }

    @configured
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        self.betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self.variance_type = variance_type

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """Inference timesteps from `timestep_spacing` (or a custom descending list), int64."""
        cfg = self.config
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None:
            if any(timesteps[i] >= timesteps[i - 1] for i in range(1, len(timesteps))):
                raise ValueError("`custom_timesteps` must be in descending order.")
            if timesteps[0] >= cfg.num_train_timesteps:
                raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {cfg.num_train_timesteps}.")
            ts = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if num_inference_steps is None:
                raise ValueError("pass `num_inference_steps` or `timesteps` to set_timesteps")
            self.num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
            self.custom_timesteps = False
            ts = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, self.num_inference_steps,
                                  cfg.steps_offset, integer=True)
        self.timesteps = torch.from_numpy(ts).to(device)

    def previous_timestep(self, timestep) -> int | torch.Tensor:
        """The next entry of `timesteps` (-1 after the last), or t - 1 before set_timesteps."""
        if self.custom_timesteps or self.num_inference_steps:
            index = (self.timesteps == timestep).nonzero(as_tuple=True)[0][0]
            if index == self.timesteps.shape[0] - 1:
                return torch.tensor(-1)
            return self.timesteps[index + 1]
        return timestep - 1

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> PredX0SchedulerOutput | tuple:
        """x_t -> x_{t-1} ~ N(mu~_t(x_t, x_0_pred), sigma_t^2 I) (Ho et al. 2020, Algorithm 2)."""
        cfg = self.config
        t = timestep
        prev_t = self.previous_timestep(t)
        # 1. split off the predicted variance when the model learns it (2x channels)
        if self.variance_type in ("learned", "learned_range"):
            if model_output.shape[1] != sample.shape[1] * 2:
                raise ValueError(f"variance_type={self.variance_type!r} needs a model output with "
                                 f"{sample.shape[1] * 2} channels (mean and variance), got {model_output.shape[1]}")
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
        else:
            predicted_variance = None
        # 2. alpha_bar_t and alpha_bar_{t-1}
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        # 3. predicted x_0 (eq. 15), clipped when clip_sample
        pred_original_sample, _ = pred_x0_and_eps(model_output, sample, alpha_prod_t, beta_prod_t, cfg.prediction_type)
        pred_original_sample = clip_pred_original(pred_original_sample, cfg.clip_sample, cfg.clip_sample_range, cfg)
        # 4. posterior mean (eq. 7)
        pred_prev_sample = ddpm_posterior_mean(pred_original_sample, sample, alpha_prod_t, alpha_prod_t_prev)
        # 5. add sigma_t * z, z ~ N(0, I), except at t = 0
        variance = 0
        if t > 0:
            variance_noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                          dtype=model_output.dtype)
            std = ddpm_noise_scale(alpha_prod_t, alpha_prod_t_prev, self.variance_type, predicted_variance)
            variance = std * variance_noise
        pred_prev_sample = pred_prev_sample + variance
        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return PredX0SchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)
