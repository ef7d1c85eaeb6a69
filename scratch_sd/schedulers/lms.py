"""Linear multistep (LMS) in sigma space: k-diffusion's `sample_lms` (Crowson), the classical Adams-Bashforth
idea applied to the probability-flow ODE of Karras et al. 2022 (arXiv:2206.00364)."""
from __future__ import annotations

import numpy as np
import torch

from .base import COMMON_CHECKS, Flag, OneOf, PredX0SchedulerOutput, check_num_inference_steps, configured
from .common import vp_tables
from .euler import _SigmaScheduler, discrete_sigma_schedule, sigma_kind, x0_from_sigma_output
from .quadpack import qags


def lms_coefficient(sigmas_f32: np.ndarray, order: int, t: int, current_order: int) -> float:
    """Integral over [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial through sigma_t .. sigma_{t-order+1}
    that is 1 at sigma_{t-current_order}: the weight of that past derivative in the multistep update.

    As diffusers, the integrand is evaluated in float32 (its sigmas are a float32 tensor) and integrated
    with QUADPACK's QAGS at epsrel=1e-4 (scipy.integrate.quad); both are reproduced here bit for bit.
    """
    s = sigmas_f32

    def lms_derivative(tau: float) -> float:
        tau32 = np.float32(tau)
        prod = None
        for k in range(order):
            if current_order == k:
                continue
            term = (tau32 - s[t - k]) / (s[t - current_order] - s[t - k])
            prod = term if prod is None else prod * term
        return 1.0 if prod is None else float(prod)

    with np.errstate(divide="ignore", invalid="ignore"):  # repeated sigmas give inf/NaN, as in diffusers
        return qags(lms_derivative, float(s[t]), float(s[t + 1]), epsrel=1e-4)[0]


class LMSDiscreteScheduler(_SigmaScheduler):
    """LMS with diffusers' LMSDiscreteScheduler semantics (order 4 by default, ramping up from 1)."""

    DIFFUSERS_NAME = "LMSDiscreteScheduler"
    CHECKS = {
        **COMMON_CHECKS,
        "use_karras_sigmas": Flag(),
        "use_exponential_sigmas": Flag(),
        "use_beta_sigmas": Flag(),
        "prediction_type": OneOf("epsilon", "v_prediction", "sample"),
    }

    @configured
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False,
                 prediction_type: str = "epsilon", timestep_spacing: str = "linspace", steps_offset: int = 0):
        sigma_kind(self.config)
        self.betas, self.alphas, self.alphas_cumprod = vp_tables(self.config)
        sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32))
        self.num_inference_steps = None
        self.use_karras_sigmas = use_karras_sigmas
        self.set_timesteps(num_train_timesteps, None)
        self.derivatives = []
        self.is_scale_input_called = False

    def set_timesteps(self, num_inference_steps: int, device=None):
        cfg = self.config
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        ts, sig = discrete_sigma_schedule(cfg, self.alphas_cumprod, self.num_inference_steps,
                                          kind=sigma_kind(cfg), karras_config_range=False)
        self.sigmas = torch.from_numpy(sig).to(device=device).to("cpu")
        self._sigmas_np = sig  # float32 copy for the coefficient integrals
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None
        self.derivatives = []

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        return lms_coefficient(self._sigmas_np, order, t, current_order)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, order: int = 4,
             return_dict: bool = True) -> PredX0SchedulerOutput | tuple:
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        # 1. denoised D(x; sigma)
        pred_original_sample = x0_from_sigma_output(model_output, sample, sigma, sigma, self.config.prediction_type)
        # 2. ODE derivative dx/dsigma = (x - D) / sigma, kept for the last `order` steps
        derivative = (sample - pred_original_sample) / sigma
        self.derivatives.append(derivative)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        # 3. multistep coefficients (order ramps up 1, 2, 3, 4 with the history)
        order = min(self.step_index + 1, order)
        lms_coeffs = [self.get_lms_coefficient(order, self.step_index, k) for k in range(order)]
        # 4. x_{i+1} = x_i + sum_k c_k d_{i-k}
        prev_sample = sample + sum(coeff * d for coeff, d in zip(lms_coeffs, reversed(self.derivatives)))
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return PredX0SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
