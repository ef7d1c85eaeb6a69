"""PNDM / PLMS: Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"
(arXiv:2202.09778). With `skip_prk_steps` (Stable Diffusion's default) the warm-up Runge-Kutta steps are
replaced by lower-order linear multistep steps, as in CompVis' PLMS sampler."""
from __future__ import annotations

import numpy as np
import torch

from .base import COMMON_CHECKS, Flag, OneOf, Scheduler, SchedulerOutput, check_num_inference_steps, configured
from .common import VPNoise, alphas_cumprod_from_betas, make_betas, spaced_timesteps

PNDM_ORDER = 4  # the linear multistep method is 4th order (Adams-Bashforth)


def pndm_transfer(sample: torch.Tensor, model_output: torch.Tensor, alpha_prod_t: torch.Tensor,
                  alpha_prod_t_prev: torch.Tensor) -> torch.Tensor:
    """The transfer part phi(x_t, eps, t, t - delta) of the paper's eq. 9 (a DDIM step with a given eps):

    x_{t-d} = sqrt(abar_{t-d} / abar_t) x_t
              - (abar_{t-d} - abar_t) / (abar_t sqrt(1 - abar_{t-d}) + sqrt(abar_t (1 - abar_t) abar_{t-d})) eps
    """
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
    model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev ** (0.5) + (
        alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5)
    return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff


def plms_combine(ets: list[torch.Tensor]) -> torch.Tensor:
    """Linear multistep eps' from the last eps values (eq. 12): Adams-Bashforth of order len(ets) <= 4."""
    if len(ets) == 2:
        return (3 * ets[-1] - ets[-2]) / 2
    if len(ets) == 3:
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


def pndm_timesteps(base: np.ndarray, num_train_timesteps: int, num_inference_steps: int,
                   skip_prk_steps: bool) -> tuple[np.ndarray, np.ndarray]:
    """(prk_timesteps, plms_timesteps) from the ascending base grid.

    skip_prk_steps: the PLMS grid repeats the second-to-last base timestep, because the second PLMS step
    is a Heun-like correction at the same t (CompVis PLMS). Otherwise 3 Runge-Kutta steps (4 model calls each,
    at t, t - d/2, t - d/2, t - d) warm up the multistep history.
    """
    if skip_prk_steps:
        prk = np.array([])
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
    else:
        if len(base) < PNDM_ORDER:
            raise ValueError(f"PNDM with skip_prk_steps=False needs num_inference_steps >= {PNDM_ORDER} "
                             f"(its Runge-Kutta warm-up uses the last {PNDM_ORDER} timesteps), got {len(base)}")
        prk = np.array(base[-PNDM_ORDER:]).repeat(2) + np.tile(
            np.array([0, num_train_timesteps // num_inference_steps // 2]), PNDM_ORDER)
        prk = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
        plms = base[:-3][::-1].copy()
    return prk, plms


class PNDMScheduler(VPNoise, Scheduler):
    """PNDM / PLMS with diffusers' PNDMScheduler semantics (the scheduler in Stable Diffusion 1.x's config)."""

    DIFFUSERS_NAME = "PNDMScheduler"
    CHECKS = {**COMMON_CHECKS, "skip_prk_steps": Flag(), "prediction_type": OneOf("epsilon", "v_prediction")}

    @configured
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, skip_prk_steps: bool = False,
                 set_alpha_to_one: bool = False, prediction_type: str = "epsilon", timestep_spacing: str = "leading",
                 steps_offset: int = 0):
        self.betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = PNDM_ORDER
        self._reset_history()
        self.num_inference_steps = None
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None

    def _reset_history(self) -> None:
        self.cur_model_output = 0  # running Runge-Kutta sum
        self.counter = 0  # model calls seen so far
        self.cur_sample = None
        self.ets = []  # past eps values (the multistep history)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        cfg = self.config
        self.num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        # the base grid, ascending (diffusers keeps PNDM's grid ascending and flips it below)
        self._timesteps = spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, self.num_inference_steps,
                                           cfg.steps_offset, integer=True)[::-1].copy()
        self.prk_timesteps, self.plms_timesteps = pndm_timesteps(self._timesteps, cfg.num_train_timesteps,
                                                                 self.num_inference_steps, cfg.skip_prk_steps)
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._reset_history()

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict)

    def step_prk(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
                 return_dict: bool = True) -> SchedulerOutput | tuple:
        """One of the 4 model calls of a pseudo Runge-Kutta step (eq. 13): weights 1/6, 1/3, 1/3, 1/6."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        # 1. the stage's target time: t - d/2 for stages 1-2 (and 3's input), t - d for stage 4
        diff_to_prev = 0 if self.counter % 2 else ratio // 2
        prev_timestep = timestep - diff_to_prev
        timestep = self.prk_timesteps[self.counter // 4 * 4]
        # 2. accumulate the RK combination
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        # 3. transfer from the stage's start sample
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._get_prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def step_plms(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
                  return_dict: bool = True) -> SchedulerOutput | tuple:
        """One linear multistep step (eq. 12); the first two steps bootstrap the history (CompVis PLMS)."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(f"{self.__class__} can only be run AFTER scheduler has been run in 'prk' mode for at "
                             "least 12 iterations")
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        # 1. target time; the second call redoes the first step from the same start (Heun-like average)
        prev_timestep = timestep - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + ratio
        # 2. combined eps'
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        else:
            model_output = plms_combine(self.ets)
        # 3. transfer
        prev_sample = self._get_prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _get_prev_sample(self, sample, timestep, prev_timestep, model_output) -> torch.Tensor:
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        if self.config.prediction_type == "v_prediction":  # v -> eps (Salimans & Ho 2022)
            beta_prod_t = 1 - alpha_prod_t
            model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        return pndm_transfer(sample, model_output, alpha_prod_t, alpha_prod_t_prev)
