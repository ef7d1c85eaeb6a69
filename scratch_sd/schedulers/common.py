"""Small pure functions every scheduler is built from: noise schedules, timestep spacing, sigmas, noise.

Each function reproduces diffusers' arithmetic step by step (same dtype, same library, same order of
operations), because parity here means bit-equal timesteps and sigmas: a float32 `torch.linspace`
and a float64 `np.linspace` cast to float32 are not the same numbers.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from scratch_sd.layers import randn_tensor  # noqa: F401 (the schedulers' noise)

# ---- beta schedules (the forward process q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)) ------


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """Ho et al. 2020 (DDPM), sec. 4: betas linear in t."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """Latent diffusion (Rombach et al. 2022): sqrt(beta) linear in t. Stable Diffusion's schedule."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def alpha_bar_betas(num_train_timesteps: int, alpha_bar_fn, max_beta: float = 0.999) -> torch.Tensor:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1]: beta_i = 1 - abar(t_{i+1}) / abar(t_i)."""
    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def cosine_alpha_bar(t: float) -> float:
    """Nichol & Dhariwal 2021 (improved DDPM), eq. 17 with s = 0.008: the "squaredcos_cap_v2" schedule."""
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def laplace_alpha_bar(t: float) -> float:
    """Laplace noise schedule (Hang & Gu 2024), as diffusers' DDPMScheduler "laplace"."""
    lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(lmb)
    return math.sqrt(snr / (1 + snr))


def sigmoid_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """GeoDiff (Xu et al. 2022) sigmoid schedule, as diffusers' DDPMScheduler "sigmoid"."""
    betas = torch.linspace(-6, 6, num_train_timesteps)
    return torch.sigmoid(betas) * (beta_end - beta_start) + beta_start


def make_betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int,
               trained_betas=None) -> torch.Tensor:
    """The betas a scheduler config names; `trained_betas` wins over `beta_schedule` (as in diffusers)."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
        if betas.ndim != 1 or betas.numel() != num_train_timesteps:
            raise ValueError(f"trained_betas has {betas.numel()} values but num_train_timesteps is "
                             f"{num_train_timesteps}; they must match")
        return betas
    if beta_schedule == "linear":
        return linear_betas(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        return scaled_linear_betas(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "squaredcos_cap_v2":
        return alpha_bar_betas(num_train_timesteps, cosine_alpha_bar)
    if beta_schedule == "laplace":
        return alpha_bar_betas(num_train_timesteps, laplace_alpha_bar)
    if beta_schedule == "sigmoid":
        return sigmoid_betas(beta_start, beta_end, num_train_timesteps)
    raise ValueError(f"unsupported value beta_schedule={beta_schedule!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift and scale sqrt(alpha_bar) so that the last timestep has SNR exactly 0."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_bar_sqrt = alphas_cumprod.sqrt()
    alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
    alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= alphas_bar_sqrt_T  # 1. last timestep -> 0
    alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)  # 2. first back to old value
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]  # 3. undo the cumulative product
    alphas = torch.cat([alphas_bar[0:1], alphas])
    return 1 - alphas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


def vp_tables(cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(betas, alphas, alphas_cumprod) of a config, for the sigma-space schedulers (Euler, LMS, DPM-Solver).

    With rescale_betas_zero_snr, abar_T is set to 2**-24 instead of 0 so that sigma_T stays finite.
    """
    betas = make_betas(cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, cfg.trained_betas)
    zero_snr = getattr(cfg, "rescale_betas_zero_snr", False)
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    if zero_snr:
        alphas_cumprod[-1] = 2**-24
    return betas, alphas, alphas_cumprod


# ---- timestep spacing (Lin et al. 2024, Table 2: "linspace", "leading", "trailing") ---------------------


def leading_timesteps(num_train_timesteps: int, num_inference_steps: int, steps_offset: int = 0) -> np.ndarray:
    """t = k * (T // n) + steps_offset, k = n-1..0 (int64, descending). Never reaches T-1 unless offset does."""
    step_ratio = num_train_timesteps // num_inference_steps
    timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].copy().astype(np.int64)
    timesteps += steps_offset
    return timesteps


def trailing_timesteps(num_train_timesteps: int, num_inference_steps: int, start: int | None = None) -> np.ndarray:
    """t = round(start - k * T / n) - 1 for start..0 (int64, descending): always begins at start - 1."""
    step_ratio = num_train_timesteps / num_inference_steps
    start = num_train_timesteps if start is None else start
    timesteps = np.round(np.arange(start, 0, -step_ratio)).astype(np.int64)
    timesteps -= 1
    return timesteps


def linspace_timesteps(num_train_timesteps: int, num_inference_steps: int) -> np.ndarray:
    """n evenly spaced points from T-1 down to 0, float64, not rounded (callers round or cast)."""
    return np.linspace(0, num_train_timesteps - 1, num_inference_steps)[::-1].copy()


def spaced_timesteps(spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int,
                     integer: bool) -> np.ndarray:
    """Descending timesteps for a spacing name: int64 when `integer` (DDPM, DDIM), else float32 (Euler, LMS).

    The float32 variants keep linspace's fractional timesteps (e.g. 998.9); leading/trailing are integers
    either way. `steps_offset` applies to "leading" only (diffusers ignores it elsewhere).
    """
    if spacing == "linspace":
        ts = linspace_timesteps(num_train_timesteps, num_inference_steps)
        return ts.round().astype(np.int64) if integer else ts.astype(np.float32)
    if spacing == "leading":
        ts = leading_timesteps(num_train_timesteps, num_inference_steps, 0)
    elif spacing == "trailing":
        ts = trailing_timesteps(num_train_timesteps, num_inference_steps)
        return ts if integer else ts.astype(np.float32)
    else:
        raise ValueError(f"unsupported value timestep_spacing={spacing!r}; expected linspace, leading or trailing")
    if integer:
        return ts + steps_offset
    ts = ts.astype(np.float32)
    ts += steps_offset
    return ts


# ---- sigmas (k-diffusion / EDM parameterisation: x_t = x_0 + sigma * eps, sigma = sqrt((1-abar)/abar)) ---


def interp_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """sigma at (possibly fractional) timesteps by linear interpolation over the training grid (float64)."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of a sigma: linear interpolation in log-sigma between the two nearest training sigmas."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


# ---- noise --------------------------------------------------------------------------------------------


class VPNoise:
    """`add_noise` of the variance-preserving schedulers (DDPM, DDIM, PNDM): forward process q(x_t | x_0)."""

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.alphas_cumprod = self.alphas_cumprod.to(device=original_samples.device)
        return add_noise_vp(self.alphas_cumprod, original_samples, noise, timesteps)


class VPVelocity(VPNoise):
    """`add_noise` and the v-prediction target `get_velocity` (DDPM, DDIM)."""

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.alphas_cumprod = self.alphas_cumprod.to(device=sample.device)
        return velocity_vp(self.alphas_cumprod, sample, noise, timesteps)


def broadcast_to_sample(values: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) so a per-sample scalar multiplies a (B, C, H, W) tensor."""
    values = values.flatten()
    while len(values.shape) < len(sample.shape):
        values = values.unsqueeze(-1)
    return values


def add_noise_vp(alphas_cumprod: torch.Tensor, original_samples: torch.Tensor, noise: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4)."""
    alphas_cumprod = alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
    timesteps = timesteps.to(original_samples.device)
    sqrt_alpha_prod = broadcast_to_sample(alphas_cumprod[timesteps] ** 0.5, original_samples)
    sqrt_one_minus_alpha_prod = broadcast_to_sample((1 - alphas_cumprod[timesteps]) ** 0.5, original_samples)
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def velocity_vp(alphas_cumprod: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, "Progressive Distillation", sec. 4)."""
    alphas_cumprod = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    timesteps = timesteps.to(sample.device)
    sqrt_alpha_prod = broadcast_to_sample(alphas_cumprod[timesteps] ** 0.5, sample)
    sqrt_one_minus_alpha_prod = broadcast_to_sample((1 - alphas_cumprod[timesteps]) ** 0.5, sample)
    return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample


def clip_pred_original(pred_original_sample: torch.Tensor, clip_sample: bool,
                       clip_sample_range: float, cfg=None) -> torch.Tensor:
    """Dynamic thresholding when `cfg.thresholding` (it wins, as in diffusers), else clip predicted x_0 to
    [-range, range] when clip_sample is on (DDPM, DDIM step 4)."""
    if cfg is not None and cfg.thresholding:
        return threshold_sample(pred_original_sample, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
    if clip_sample:
        return pred_original_sample.clamp(-clip_sample_range, clip_sample_range)
    return pred_original_sample


def pred_x0_and_eps(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor,
                    beta_prod_t: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted x_0 and eps from the network output, for x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps.

    epsilon: DDIM (Song et al. 2021) eq. 12's "predicted x_0"; v_prediction: Salimans & Ho 2022, sec. 4;
    sample: the network predicts x_0 itself.
    """
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"unsupported value prediction_type={prediction_type!r}")
    return pred_original_sample, pred_epsilon


# ---- more sigma schedules (diffusers' use_exponential_sigmas / use_beta_sigmas / use_lu_lambdas) --------


def sigma_range(cfg, in_sigmas: np.ndarray) -> tuple[float, float]:
    """(sigma_min, sigma_max): the config's when it has them (Euler, or any config that carried them along),
    else the ends of the descending `in_sigmas` (as diffusers' _convert_to_*)."""
    sigma_min = getattr(cfg, "sigma_min", None)
    sigma_max = getattr(cfg, "sigma_max", None)
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    return sigma_min, sigma_max


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """Log-uniform sigmas from sigma_max down to sigma_min (float64)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def lu_lambdas(lambda_min: float, lambda_max: float, num_inference_steps: int) -> np.ndarray:
    """Lu et al. 2022 (DPM-Solver++), sec. 3.3: log-SNR lambda uniform in [lambda_max, lambda_min] (rho = 1)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    return lambda_max + ramp * (lambda_min - lambda_max)


def _log_beta_fn(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Press et al., Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-17
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b), float64 to ~1e-15 relative."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - beta_cdf(1.0 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta_fn(a, b))
    return front * _betacf(a, b, x) / a


def beta_ppf(p: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b) in x (scipy.stats.beta.ppf, which diffusers' use_beta_sigmas calls): bracketed
    Newton on the float64 CDF, to a few ulp of the root (the float32 sigmas built from it then round alike)."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    x = 0.5
    log_b = _log_beta_fn(a, b)
    for _ in range(200):
        f = beta_cdf(x, a, b) - p
        if f == 0.0:
            return x
        if f < 0:
            lo = x
        else:
            hi = x
        pdf = math.exp((a - 1.0) * math.log(x) + (b - 1.0) * math.log1p(-x) - log_b)
        step = f / pdf if pdf > 0 else 0.0
        new = x - step
        if not (lo < new < hi) or step == 0.0:
            new = 0.5 * (lo + hi)
        if new == x or new == lo and new == hi:
            return x
        if abs(new - x) <= 2e-16 * x:
            return new
        x = new
    return x


def beta_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6,
                beta: float = 0.6) -> np.ndarray:
    """"Beta sampling is all you need" (Lee et al. 2024): sigmas at the Beta(0.6, 0.6) quantiles of 1 - linspace(0, 1, n)."""
    return np.array([sigma_min + (beta_ppf(float(t), alpha, beta) * (sigma_max - sigma_min))
                     for t in 1 - np.linspace(0, 1, num_inference_steps)])


def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, sec. 2.3): per sample, s = the `ratio` quantile of
    |x0| clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s."""
    dtype = sample.dtype
    batch_size, channels, *remaining_dims = sample.shape
    if dtype not in (torch.float32, torch.float64):
        sample = sample.float()  # quantile needs float; clamp has no CPU half kernel
    sample = sample.reshape(batch_size, channels * np.prod(remaining_dims))
    s = torch.quantile(sample.abs(), ratio, dim=1)
    s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
    sample = torch.clamp(sample, -s, s) / s
    return sample.reshape(batch_size, channels, *remaining_dims).to(dtype)
