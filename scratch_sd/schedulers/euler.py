"""Euler and Euler-ancestral samplers in the sigma (VE) parameterisation.

Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
(arXiv:2206.00364), Algorithm 2 (Euler with optional churn); the ancestral variant is k-diffusion's
`sample_euler_ancestral` (Crowson), which splits each step into a deterministic part down to sigma_down
and fresh noise of size sigma_up (Song et al. 2021's ancestral sampling).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import COMMON_CHECKS, Flag, Number, OneOf, PredX0SchedulerOutput, StepIndexed, check_num_inference_steps, configured
from .common import (beta_sigmas, broadcast_to_sample, exponential_sigmas, interp_sigmas, karras_sigmas, randn_tensor,
                     sigma_range, sigma_to_t, spaced_timesteps, vp_tables)

def x0_from_sigma_output(model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor,
                         sigma_hat: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Denoised D(x; sigma) from the network output, Karras et al. 2022 Table 1 (VP preconditioning):
    epsilon: x - sigma eps; v_prediction: c_skip x + c_out v with c_skip = 1/(sigma^2+1), c_out = -sigma/sqrt(sigma^2+1)."""
    if prediction_type in ("sample", "original_sample"):
        return model_output
    if prediction_type == "epsilon":
        return sample - sigma_hat * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    raise ValueError(f"unsupported value prediction_type={prediction_type!r}")


def euler_update(sample: torch.Tensor, denoised: torch.Tensor, sigma_from: torch.Tensor,
                 sigma_to: torch.Tensor) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Algorithm 2, l. 7-8)."""
    derivative = (sample - denoised) / sigma_from
    dt = sigma_to - sigma_from
    return sample + derivative * dt


def ancestral_sigmas(sigma_from: torch.Tensor, sigma_to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion get_ancestral_step, eta=1)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sigma_kind(cfg) -> str | None:
    """Which re-spacing of the sigmas a config asks for: "karras", "exponential", "beta" or None (at most one)."""
    kinds = [k for k in ("karras", "exponential", "beta") if getattr(cfg, f"use_{k}_sigmas", False)]
    if len(kinds) > 1:
        raise ValueError("Only one of `config.use_beta_sigmas`, `config.use_exponential_sigmas`, "
                         "`config.use_karras_sigmas` can be used.")
    return kinds[0] if kinds else None


def respaced_sigmas(kind: str, cfg, in_sigmas: np.ndarray, num_inference_steps: int,
                    karras_config_range: bool = True) -> np.ndarray:
    """Karras et al. 2022 eq. 5, log-uniform, or Beta(0.6, 0.6)-quantile sigmas between the ends of `in_sigmas`
    (or the config's sigma_min / sigma_max when it has them; LMS's Karras path never looks, as in diffusers)."""
    sigma_min, sigma_max = sigma_range(cfg if karras_config_range or kind != "karras" else None, in_sigmas)
    if kind == "karras":
        return karras_sigmas(sigma_min, sigma_max, num_inference_steps)
    if kind == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, num_inference_steps)
    return beta_sigmas(sigma_min, sigma_max, num_inference_steps)


def discrete_sigma_schedule(cfg, alphas_cumprod: torch.Tensor, num_inference_steps: int, timesteps=None,
                            sigmas=None, kind: str | None = None, interpolation_type: str = "linear",
                            final_sigmas_type: str = "zero", karras_config_range: bool = True
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float, sigmas float32 with the final sigma appended) for the Euler/LMS family.

    1. timesteps from `timestep_spacing` (fractional for linspace); 2. sigma at each timestep by linear
    interpolation of the training sigmas (or log-linear); 3. Karras et al. 2022 eq. 5 sigmas on request, with
    timesteps mapped back through log-sigma interpolation; 4. append 0 (or sigma_min) as the end point.
    """
    train_sigmas = np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    log_sigmas = np.log(train_sigmas)
    if sigmas is not None:  # custom sigmas: timesteps follow from them; no end point is appended
        sigmas = np.array(sigmas).astype(np.float32)
        timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas[:-1]])
        return timesteps, sigmas
    if timesteps is not None:
        timesteps = np.array(timesteps).astype(np.float32)
    else:
        timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, num_inference_steps,
                                     cfg.steps_offset, integer=False)
    if interpolation_type == "linear":
        sigmas = interp_sigmas(timesteps, train_sigmas)
    else:  # log_linear: n + 1 log-spaced sigmas from sigma_max to sigma_min (diffusers' shape, kept as is)
        sigmas = torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), num_inference_steps + 1).exp().numpy()
    if kind is not None:
        sigmas = respaced_sigmas(kind, cfg, sigmas, num_inference_steps, karras_config_range)
        timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
    if final_sigmas_type == "sigma_min":
        sigma_last = float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)
    else:
        sigma_last = 0
    sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
    return timesteps, sigmas


class _SigmaScheduler(StepIndexed):
    """Shared machinery of the sigma-space schedulers: step index bookkeeping, input scaling, add_noise."""

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Std of the initial latents: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing (as diffusers)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ["linspace", "trailing"]:
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5


    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        """Position of `timestep` in the schedule; the second match when it repeats (so img2img skips no sigma)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        pos = 1 if len(indices) > 1 else 0
        return indices[pos].item()


    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x / sqrt(sigma^2 + 1): the UNet was trained on VP inputs (c_in of Karras et al. 2022, Table 1)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample / ((sigma**2 + 1) ** 0.5)
        self.is_scale_input_called = True
        return sample

    @staticmethod
    def _reject_integer_timestep(timestep) -> None:
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `step()` is "
                             "not supported. Make sure to pass one of the `scheduler.timesteps` as a timestep.")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 + sigma(t) * noise, with sigma looked up by step index (VE forward process)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule_timesteps = self.timesteps.to(original_samples.device)
        timesteps = timesteps.to(original_samples.device)
        if self.begin_index is None:  # training, or a pipeline without set_begin_index
            step_indices = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps]
        elif self.step_index is not None:  # after the first denoising step (inpainting)
            step_indices = [self.step_index] * timesteps.shape[0]
        else:  # before the first denoising step (img2img)
            step_indices = [self.begin_index] * timesteps.shape[0]
        sigma = broadcast_to_sample(sigmas[step_indices], original_samples)
        return original_samples + noise * sigma


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler (Karras et al. 2022, Algorithm 2) with diffusers' EulerDiscreteScheduler semantics."""

    DIFFUSERS_NAME = "EulerDiscreteScheduler"
    CHECKS = {
        **COMMON_CHECKS,
        "prediction_type": OneOf("epsilon", "v_prediction", "sample", "original_sample"),
        "interpolation_type": OneOf("linear", "log_linear"),
        "use_karras_sigmas": Flag(),
        "use_exponential_sigmas": Flag(),
        "use_beta_sigmas": Flag(),
        "sigma_min": Number(0.0, optional=True, lo_open=True),
        "sigma_max": Number(0.0, optional=True, lo_open=True),
        "timestep_type": OneOf("discrete", "continuous"),
        "final_sigmas_type": OneOf("zero", "sigma_min"),
    }

    @configured
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 interpolation_type: str = "linear", use_karras_sigmas: bool | None = False,
                 use_exponential_sigmas: bool | None = False, use_beta_sigmas: bool | None = False,
                 sigma_min: float | None = None, sigma_max: float | None = None, timestep_spacing: str = "linspace",
                 timestep_type: str = "discrete", steps_offset: int = 0, rescale_betas_zero_snr: bool = False,
                 final_sigmas_type: str = "zero"):
        sigma_kind(self.config)
        self.betas, self.alphas, self.alphas_cumprod = vp_tables(self.config)
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        timesteps = torch.from_numpy(timesteps).to(dtype=torch.float32)
        self.num_inference_steps = None
        if self._continuous_v():
            self.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas])
        else:
            self.timesteps = timesteps
        self.sigmas = torch.cat([sigmas, torch.zeros(1, device=sigmas.device)]).to("cpu")
        self.is_scale_input_called = False
        self.use_karras_sigmas = use_karras_sigmas
        self._step_index = None
        self._begin_index = None

    def _continuous_v(self) -> bool:
        """EDM-style c_noise = log(sigma) / 4 timesteps (only for v_prediction, as diffusers)."""
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[float] | None = None,
                      sigmas: list[float] | None = None):
        cfg = self.config
        if timesteps is not None and sigmas is not None:
            raise ValueError("Only one of `timesteps` or `sigmas` should be set.")
        if num_inference_steps is None and timesteps is None and sigmas is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps` or `sigmas.")
        if num_inference_steps is not None and (timesteps is not None or sigmas is not None):
            raise ValueError("Can only pass one of `num_inference_steps` or `timesteps` or `sigmas`.")
        for kind in ("karras", "exponential", "beta"):
            if timesteps is not None and cfg[f"use_{kind}_sigmas"]:
                raise ValueError(f"Cannot set `timesteps` with `config.use_{kind}_sigmas = True`.")
        if timesteps is not None and self._continuous_v():
            raise ValueError("Cannot set `timesteps` with `config.timestep_type = 'continuous'` and "
                             "`config.prediction_type = 'v_prediction'`.")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        else:
            num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        self.num_inference_steps = num_inference_steps
        ts, sig = discrete_sigma_schedule(cfg, self.alphas_cumprod, num_inference_steps, timesteps, sigmas,
                                          kind=sigma_kind(cfg), interpolation_type=cfg.interpolation_type,
                                          final_sigmas_type=cfg.final_sigmas_type)
        sig = torch.from_numpy(sig).to(dtype=torch.float32, device=device)
        if self._continuous_v():
            self.timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sig[:-1]]).to(device=device)
        else:
            self.timesteps = torch.from_numpy(ts.astype(np.float32)).to(device=device)
        self._step_index = None
        self._begin_index = None
        self.sigmas = sig.to("cpu")

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, s_churn: float = 0.0,
             s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None, return_dict: bool = True) -> PredX0SchedulerOutput | tuple:
        """Karras et al. 2022 Algorithm 2: optional churn to sigma_hat, then one Euler step to the next sigma."""
        self._reject_integer_timestep(timestep)
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)  # upcast, as diffusers
        sigma = self.sigmas[self.step_index]
        # 1. churn: sigma_hat = sigma (1 + gamma), adding noise of variance sigma_hat^2 - sigma^2 (lines 4-6)
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                 generator=generator)
            eps = noise * s_noise
            sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5
        # 2. denoised D(x; sigma_hat)
        pred_original_sample = x0_from_sigma_output(model_output, sample, sigma, sigma_hat, self.config.prediction_type)
        # 3. Euler step sigma_hat -> sigma_{i+1}
        prev_sample = euler_update(sample, pred_original_sample, sigma_hat, self.sigmas[self.step_index + 1])
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return PredX0SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler ancestral (k-diffusion sample_euler_ancestral) with diffusers' EulerAncestralDiscreteScheduler semantics."""

    DIFFUSERS_NAME = "EulerAncestralDiscreteScheduler"
    CHECKS = {**COMMON_CHECKS, "prediction_type": OneOf(
        "epsilon", "v_prediction", why=" (diffusers raises NotImplementedError for 'sample')")}

    @configured
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "linspace", steps_offset: int = 0, rescale_betas_zero_snr: bool = False):
        self.betas, self.alphas, self.alphas_cumprod = vp_tables(self.config)
        sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32))
        self.num_inference_steps = None
        timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=float)[::-1].copy()
        self.timesteps = torch.from_numpy(timesteps)  # float64 until set_timesteps, as diffusers
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    def set_timesteps(self, num_inference_steps: int, device=None):
        cfg = self.config
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        ts, sig = discrete_sigma_schedule(cfg, self.alphas_cumprod, self.num_inference_steps)
        self.sigmas = torch.from_numpy(sig).to(device=device).to("cpu")
        self.timesteps = torch.from_numpy(ts).to(device=device)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> PredX0SchedulerOutput | tuple:
        """Deterministic Euler step to sigma_down, then fresh noise of std sigma_up."""
        self._reject_integer_timestep(timestep)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        sample = sample.to(torch.float32)
        # 1. denoised D(x; sigma)
        pred_original_sample = x0_from_sigma_output(model_output, sample, sigma, sigma, self.config.prediction_type)
        # 2. split sigma_{i+1} into a deterministic part and a noise part
        sigma_down, sigma_up = ancestral_sigmas(self.sigmas[self.step_index], self.sigmas[self.step_index + 1])
        # 3. Euler step sigma -> sigma_down
        prev_sample = euler_update(sample, pred_original_sample, sigma, sigma_down)
        # 4. + sigma_up z
        noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                             generator=generator)
        prev_sample = prev_sample + noise * sigma_up
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return PredX0SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
