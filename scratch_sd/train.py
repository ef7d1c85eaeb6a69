"""Training, from scratch (pure torch).

The noise-prediction training step of diffusers' `train_text_to_image.py`, written
so that the same weights, batch, timesteps and noise give the same loss, gradients and
parameters as diffusers' loop (`parity/train_check.py` proves it):

    t ~ U{0, .., T-1};  x_t = add_noise(x_0, eps, t);  pred = model(x_t, t, context)
    loss = mse(pred.float(), target.float()),  target = eps | v (prediction_type)
    (loss / accumulation).backward() per micro-batch;  clip_grad_norm_;  AdamW step;  zero_grad

A demo that trains a small class-conditional UNet on digits with this step lives with the
command that runs it (`sdparity train`: sdparity/digits.py, sdparity/train.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


Tensor = torch.Tensor

# AdamW defaults of diffusers' train_text_to_image.py (learning_rate, adam_beta1/2, adam_weight_decay, adam_epsilon).
ADAMW_DEFAULTS = dict(lr=1e-5, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
MAX_GRAD_NORM = 1.0  # train_text_to_image.py's --max_grad_norm


# =========================================================================== part 1: the training step
def adamw(params: Iterable[nn.Parameter], lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999),
          weight_decay: float = 1e-2, eps: float = 1e-8) -> torch.optim.AdamW:
    """torch's AdamW with diffusers' fine-tuning defaults."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def sample_timesteps(batch: int, num_train_timesteps: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """t ~ U{0, ..., T-1}, one per sample, int64 (drawn on the generator's device, then moved)."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, num_train_timesteps, (batch,), generator=generator, device=gen_device).to(device)


def training_target(scheduler, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the model is trained to output, by the scheduler's `prediction_type`.

    epsilon: the noise; v_prediction: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022,
    diffusers' get_velocity); sample: x_0.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r} (epsilon, v_prediction, sample)")


def autocast(dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    """torch.autocast for `dtype` (e.g. torch.bfloat16), or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def noise_prediction_loss(model: Callable[[Tensor, Tensor, Any], Tensor], scheduler, x0: Tensor, context: Any, *,
                          timesteps: Tensor | None = None, noise: Tensor | None = None,
                          generator: torch.Generator | None = None,
                          autocast_dtype: torch.dtype | None = None) -> Tensor:
    """MSE between model(x_t, t, context) and the target of `scheduler.config.prediction_type`.

    `timesteps` and `noise` are drawn (from `generator`) when not given; the loss is computed in float32
    whatever the model's dtype, as diffusers does (`F.mse_loss(model_pred.float(), target.float())`).
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype,
                            device=generator.device if generator is not None else x0.device).to(x0.device)
    if timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], scheduler.config.num_train_timesteps, generator, x0.device)
    noisy = scheduler.add_noise(x0, noise, timesteps)
    target = training_target(scheduler, x0, noise, timesteps)
    with autocast(autocast_dtype, x0.device):
        pred = model(noisy, timesteps, context)
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


@dataclass
class StepResult:
    loss: float  # mean of the micro-batch losses (before the division by the accumulation count)
    grad_norm: float  # total gradient norm before clipping


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Iterable[Any],
               loss_fn: Callable[[Any], Tensor], max_grad_norm: float | None = MAX_GRAD_NORM) -> StepResult:
    """One optimiser step with gradient accumulation over `micro_batches`.

    Each micro-batch's loss is divided by their number before backward (as accelerate's `backward`
    divides by gradient_accumulation_steps), so the step sees the mean gradient; then the total
    gradient norm is clipped to `max_grad_norm` (None: no clipping), AdamW steps, gradients are zeroed.
    """
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("train_step needs at least one micro-batch")
    total = 0.0
    for batch in micro_batches:
        loss = loss_fn(batch)
        (loss / len(micro_batches)).backward()
        total += float(loss.detach())
    params = [p for p in model.parameters() if p.grad is not None]
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total / len(micro_batches), grad_norm)


__all__ = ["ADAMW_DEFAULTS", "MAX_GRAD_NORM", "adamw", "sample_timesteps", "training_target", "autocast",
           "noise_prediction_loss", "StepResult", "train_step"]
