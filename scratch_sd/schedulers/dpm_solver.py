"""DPM-Solver++ multistep (2M is Stable Diffusion's "DPM++ 2M"): Lu, Zhou, Bao, Chen, Li & Zhu 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models" (arXiv:2211.01095),
Algorithm 2 (multistep, data prediction); SDE variant: sec. 5 / diffusers' "sde-dpmsolver++". The noise-prediction
solvers "dpmsolver" / "sde-dpmsolver" are DPM-Solver (Lu et al. 2022, arXiv:2206.00927) eq. 3.7 and its SDE form."""
from __future__ import annotations

import numpy as np
import torch

from .base import COMMON_CHECKS, Flag, Number, OneOf, SchedulerOutput, StepIndexed, check_num_inference_steps, configured
from .common import broadcast_to_sample, interp_sigmas, karras_sigmas, randn_tensor, sigma_to_t, vp_tables
from .common import leading_timesteps, linspace_timesteps, lu_lambdas, threshold_sample, trailing_timesteps
from .euler import respaced_sigmas, sigma_kind


def alpha_sigma_from_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VE sigma -> VP (alpha_t, sigma_t): alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t


def log_snr(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t), the half log-SNR the solver steps in (paper sec. 3)."""
    return torch.log(alpha_t) - torch.log(sigma_t)


def dpmpp_first_order(sample: torch.Tensor, x0: torch.Tensor, sigma_to: torch.Tensor, sigma_from: torch.Tensor,
                      algorithm_type: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(1), eq. 8 (= DDIM in lambda): x_t = sigma_t/sigma_s x_s - alpha_t (e^{-h} - 1) x0."""
    alpha_t, sigma_t = alpha_sigma_from_sigma(sigma_to)
    alpha_s, sigma_s = alpha_sigma_from_sigma(sigma_from)
    h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s)
    if algorithm_type == "dpmsolver++":
        return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
    if algorithm_type == "dpmsolver":  # x0 here is the eps prediction
        return (alpha_t / alpha_s) * sample - (sigma_t * (torch.exp(h) - 1.0)) * x0
    if algorithm_type == "sde-dpmsolver":
        return ((alpha_t / alpha_s) * sample - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * x0
                + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise)
    # sde-dpmsolver++: first-order SDE solver
    return ((sigma_t / sigma_s * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


def dpmpp_second_order(sample: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor, sigma_to: torch.Tensor,
                       sigma_s0: torch.Tensor, sigma_s1: torch.Tensor, algorithm_type: str, solver_type: str,
                       noise: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2: x0 predictions m0 (now) and m1 (previous step) give the first
    divided difference D1 = (m0 - m1) / r0, r0 = h_prev / h; "midpoint" uses 0.5 D1, "heun" its exact weight."""
    alpha_t, sigma_t = alpha_sigma_from_sigma(sigma_to)
    alpha_s0, sigma_s0 = alpha_sigma_from_sigma(sigma_s0)
    alpha_s1, sigma_s1 = alpha_sigma_from_sigma(sigma_s1)
    lambda_t, lambda_s0, lambda_s1 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0), log_snr(alpha_s1, sigma_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    if algorithm_type == "dpmsolver++":
        if solver_type == "midpoint":
            return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1)
    if algorithm_type == "dpmsolver":
        if solver_type == "midpoint":
            return ((alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * D0
                    - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1)
        return ((alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * D0
                - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1)
    if algorithm_type == "sde-dpmsolver":
        if solver_type == "midpoint":
            return ((alpha_t / alpha_s0) * sample - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
                    - (sigma_t * (torch.exp(h) - 1.0)) * D1 + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise)
        return ((alpha_t / alpha_s0) * sample - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
                - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
                + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise)
    if solver_type == "midpoint":  # sde-dpmsolver++
        return ((sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
                + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)
    return ((sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


def dpmpp_third_order(sample: torch.Tensor, m0: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor,
                      sigma_to: torch.Tensor, sigma_s0: torch.Tensor, sigma_s1: torch.Tensor, sigma_s2: torch.Tensor,
                      algorithm_type: str, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DPM-Solver++(3M): second divided difference D2 from three past x0 predictions (DPM-Solver, eq. 3.5)."""
    alpha_t, sigma_t = alpha_sigma_from_sigma(sigma_to)
    alpha_s0, sigma_s0 = alpha_sigma_from_sigma(sigma_s0)
    alpha_s1, sigma_s1 = alpha_sigma_from_sigma(sigma_s1)
    alpha_s2, sigma_s2 = alpha_sigma_from_sigma(sigma_s2)
    lambda_t, lambda_s0 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0)
    lambda_s1, lambda_s2 = log_snr(alpha_s1, sigma_s1), log_snr(alpha_s2, sigma_s2)
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    if algorithm_type == "dpmsolver++":
        return ((sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
                - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2)
    if algorithm_type == "dpmsolver":
        return ((alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * D0
                - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
                - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2)
    if algorithm_type == "sde-dpmsolver":  # diffusers has no third-order SDE-DPM-Solver (its x_t is unbound)
        raise ValueError("DPMSolverMultistepScheduler: algorithm_type='sde-dpmsolver' has no third-order update "
                         "(diffusers fails with UnboundLocalError there); use solver_order <= 2")
    return ((sigma_t / sigma_s0 * torch.exp(-h)) * sample + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


def dpm_timesteps(spacing: str, num_train_timesteps: int, last_timestep: int, num_inference_steps: int,
                  steps_offset: int) -> np.ndarray:
    """DPM-Solver's grid: n + 1 points, the final (t = 0 end) one dropped, int64 descending."""
    if spacing == "linspace":
        return linspace_timesteps(last_timestep, num_inference_steps + 1).round()[:-1].astype(np.int64)
    if spacing == "leading":
        return leading_timesteps(last_timestep, num_inference_steps + 1, 0)[:-1].copy() + steps_offset
    if spacing == "trailing":
        return trailing_timesteps(num_train_timesteps, num_inference_steps, start=last_timestep)
    raise ValueError(f"unsupported value timestep_spacing={spacing!r}")


class DPMSolverMultistepScheduler(StepIndexed):
    """DPM-Solver++ multistep with diffusers' DPMSolverMultistepScheduler semantics."""

    DIFFUSERS_NAME = "DPMSolverMultistepScheduler"
    CHECKS = {
        **COMMON_CHECKS,
        "solver_order": OneOf(1, 2, 3),
        # "deis" (a DEIS config) becomes dpmsolver++, and UniPC/DEIS solver types become midpoint, as in diffusers
        "algorithm_type": OneOf("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis"),
        "solver_type": OneOf("midpoint", "heun", "logrho", "bh1", "bh2"),
        "lower_order_final": Flag(),
        "euler_at_final": Flag(),
        "use_karras_sigmas": Flag(),
        "use_exponential_sigmas": Flag(),
        "use_beta_sigmas": Flag(),
        "use_lu_lambdas": Flag(),
        "use_flow_sigmas": Flag(supported=False, why=" (flow-matching models, not Stable Diffusion 1.x/2.x)"),
        "flow_shift": Number(0.0, lo_open=True),
        "final_sigmas_type": OneOf("zero", "sigma_min"),
        "lambda_min_clipped": Number(),
        # only learned / learned_range act here; DDPM's values (a DDPM config loaded here) are accepted and inert
        "variance_type": OneOf(None, "learned", "learned_range", "fixed_small", "fixed_small_log", "fixed_large",
                               "fixed_large_log"),
        "use_dynamic_shifting": Flag(supported=False),
        "time_shift_type": OneOf("exponential"),
    }

    @configured
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, solver_order: int = 2,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 algorithm_type: str = "dpmsolver++", solver_type: str = "midpoint", lower_order_final: bool = True,
                 euler_at_final: bool = False, use_karras_sigmas: bool = False, use_exponential_sigmas: bool = False,
                 use_beta_sigmas: bool = False, use_lu_lambdas: bool = False, use_flow_sigmas: bool = False,
                 flow_shift: float = 1.0, final_sigmas_type: str = "zero", lambda_min_clipped: float = -float("inf"),
                 variance_type: str | None = None, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False, use_dynamic_shifting: bool = False,
                 time_shift_type: str = "exponential"):
        sigma_kind(self.config)
        if algorithm_type == "deis":
            self.register_to_config(algorithm_type="dpmsolver++")
        if solver_type in ("logrho", "bh1", "bh2"):
            self.register_to_config(solver_type="midpoint")
        if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++") and final_sigmas_type == "zero":
            # diffusers checks the value as given, so a DEIS config needs final_sigmas_type="sigma_min" too
            raise ValueError(f"`final_sigmas_type` {final_sigmas_type} is not supported for `algorithm_type` "
                             f"{algorithm_type}. Please choose `sigma_min` instead.")
        self.betas, self.alphas, self.alphas_cumprod = vp_tables(self.config)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).to("cpu")
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        timesteps = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self.timesteps = torch.from_numpy(timesteps)
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None


    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, mu: float | None = None,
                      timesteps: list[int] | None = None):
        """1. timesteps (clipped at lambda_min_clipped); 2. sigmas by interpolation or Karras;
        3. append the final sigma (0 or sigma_min); 4. reset the multistep history."""
        cfg = self.config
        if mu is not None:
            raise ValueError("set_timesteps(mu=...) needs use_dynamic_shifting, which scratch_sd does not support")
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        if timesteps is not None and cfg.use_karras_sigmas:
            raise ValueError("Cannot use `timesteps` with `config.use_karras_sigmas = True`")
        if timesteps is not None and cfg.use_lu_lambdas:
            raise ValueError("Cannot use `timesteps` with `config.use_lu_lambdas = True`")
        for kind in ("exponential", "beta"):
            if timesteps is not None and cfg[f"use_{kind}_sigmas"]:
                raise ValueError(f"Cannot set `timesteps` with `config.use_{kind}_sigmas = True`.")
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            num_inference_steps = check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
            # lambda clipping matters for the cosine schedule, whose lambda diverges at t = T
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), cfg.lambda_min_clipped)
            last_timestep = ((cfg.num_train_timesteps - clipped_idx).numpy()).item()
            timesteps = dpm_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, last_timestep,
                                      num_inference_steps, cfg.steps_offset)
        sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        log_sigmas = np.log(sigmas)
        if cfg.use_karras_sigmas:
            sigmas = np.flip(sigmas).copy()
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        elif cfg.use_lu_lambdas:  # uniform in log-SNR (here: in log sigma, lambda's mirror image)
            lambdas = np.flip(log_sigmas.copy())
            sigmas = np.exp(lu_lambdas(lambdas[-1].item(), lambdas[0].item(), num_inference_steps))
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        elif cfg.use_exponential_sigmas or cfg.use_beta_sigmas:  # timesteps truncated to int64 below, not rounded
            sigmas = respaced_sigmas(sigma_kind(cfg), cfg, np.flip(sigmas).copy(), num_inference_steps)
            timesteps = np.array([sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        else:
            sigmas = interp_sigmas(timesteps, sigmas)
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = float(((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5)
        else:
            sigma_last = 0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas).to("cpu")
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None

    def convert_model_output(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The data prediction x0_theta(x_t, t) DPM-Solver++ integrates (paper eq. 6), or for dpmsolver /
        sde-dpmsolver the noise prediction eps_theta; dynamic thresholding acts on x0 either way."""
        cfg = self.config
        alpha_t, sigma_t = alpha_sigma_from_sigma(self.sigmas[self.step_index])
        if cfg.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if cfg.prediction_type == "sample":
                x0_pred = model_output
            elif cfg.prediction_type == "epsilon":
                if cfg.variance_type in ["learned", "learned_range"]:
                    model_output = model_output[:, :3]  # (sic) diffusers keeps 3 channels, whatever the latent has
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            else:  # v_prediction
                x0_pred = alpha_t * sample - sigma_t * model_output
            if cfg.thresholding:
                x0_pred = threshold_sample(x0_pred, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            return x0_pred
        if cfg.prediction_type == "epsilon":
            epsilon = model_output[:, :3] if cfg.variance_type in ["learned", "learned_range"] else model_output
        elif cfg.prediction_type == "sample":
            epsilon = (sample - alpha_t * model_output) / sigma_t
        else:  # v_prediction
            epsilon = alpha_t * model_output + sigma_t * sample
        if cfg.thresholding:
            x0_pred = (sample - sigma_t * epsilon) / alpha_t
            x0_pred = threshold_sample(x0_pred, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
            epsilon = (sample - alpha_t * x0_pred) / sigma_t
        return epsilon

    def index_for_timestep(self, timestep, schedule_timesteps: torch.Tensor | None = None) -> int:
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        index_candidates = (schedule_timesteps == timestep).nonzero()
        if len(index_candidates) == 0:
            return len(self.timesteps) - 1
        if len(index_candidates) > 1:
            return index_candidates[1].item()
        return index_candidates[0].item()


    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True) -> SchedulerOutput | tuple:
        """One multistep update; the order ramps up 1, 2(, 3) while history accumulates and drops at the end."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the scheduler")
        cfg = self.config
        if self.step_index is None:
            self._init_step_index(timestep)
        n, i = len(self.timesteps), self.step_index
        # 1. lower the order at the end for stability (few steps), and always when the final sigma is 0
        lower_order_final = (i == n - 1) and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                               or cfg.final_sigmas_type == "zero")
        lower_order_second = (i == n - 2) and cfg.lower_order_final and n < 15
        # 2. x0 prediction into the history
        model_output = self.convert_model_output(model_output, sample=sample)
        for k in range(cfg.solver_order - 1):
            self.model_outputs[k] = self.model_outputs[k + 1]
        self.model_outputs[-1] = model_output
        sample = sample.to(torch.float32)
        # 3. noise for the SDE variant
        noise = None
        if cfg.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is None:
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                                     dtype=torch.float32)
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
        # 4. the update of the chosen order
        s = self.sigmas
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = dpmpp_first_order(sample, model_output, s[i + 1], s[i], cfg.algorithm_type, noise)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            m = self.model_outputs
            prev_sample = dpmpp_second_order(sample, m[-1], m[-2], s[i + 1], s[i], s[i - 1], cfg.algorithm_type,
                                             cfg.solver_type, noise)
        else:
            m = self.model_outputs
            prev_sample = dpmpp_third_order(sample, m[-1], m[-2], m[-3], s[i + 1], s[i], s[i - 1], s[i - 2],
                                            cfg.algorithm_type, noise)
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t x_0 + sigma_t noise at the sigma of each timestep's step index (VP forward process)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule_timesteps = self.timesteps.to(original_samples.device)
        timesteps = timesteps.to(original_samples.device)
        if self.begin_index is None:
            step_indices = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps]
        elif self.step_index is not None:
            step_indices = [self.step_index] * timesteps.shape[0]
        else:
            step_indices = [self.begin_index] * timesteps.shape[0]
        sigma = broadcast_to_sample(sigmas[step_indices], original_samples)
        alpha_t, sigma_t = alpha_sigma_from_sigma(sigma)
        return alpha_t * original_samples + sigma_t * noise
