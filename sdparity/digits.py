"""The digits demo of `sdparity train`: a tiny class-conditional trainer for scikit-learn's 8x8
digits (upsampled), with two objectives on the same scratch UNet (labels embedded as its
cross-attention context), built on scratch_sd.train's step:
- DDPM (Ho et al. 2020, arXiv:2006.11239): the epsilon loss; sampled with the scratch DDIM / DDPM
  schedulers and classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598);
- VE-SDE denoising score matching (Song et al. 2021, arXiv:2011.13456, eq. 7 with
  lambda(sigma) = sigma^2); sampled with the scratch Euler-Maruyama (reverse-diffusion)
  predictor of `scratch_sd.schedulers.ScoreSdeVeScheduler`, optionally with its Langevin corrector.

The data set, the classifier and the files live in sdparity/train.py; this module takes tensors.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from scratch_sd.config import UNetConfig
from scratch_sd.train import adamw, autocast, noise_prediction_loss, train_step
from scratch_sd.unet import UNet

Tensor = torch.Tensor
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # the "no label" token of classifier-free guidance


def digits_unet_config(width: int = 32, image_size: int = 16, cross_attention_dim: int = 64) -> UNetConfig:
    """A small SD 1.x-structured UNet for 1-channel 16x16 digits: three levels (16x16, 8x8, 4x4),
    one resnet per level, a spatial transformer (self- + cross-attention to the label) on the two
    lower levels and in the middle block."""
    return UNetConfig(in_channels=1, out_channels=1, block_out_channels=(width, 2 * width, 2 * width),
                      layers_per_block=1, attention_levels=(False, True, True), num_heads=4,
                      cross_attention_dim=cross_attention_dim, norm_groups=8, sample_size=image_size)


class ClassConditionedUNet(nn.Module):
    """The scratch UNet with a label embedding as its cross-attention context: (B,) labels -> (B, 1, dim)."""

    def __init__(self, cfg: UNetConfig, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg)
        self.labels = nn.Embedding(num_classes + 1, cfg.cross_attention_dim)  # last row: the null label
        nn.init.normal_(self.labels.weight, std=1.0)

    def forward(self, x: Tensor, t: Tensor | float | int, labels: Tensor) -> Tensor:
        context = self.labels(labels)[:, None, :]  # (B, 1, cross_attention_dim)
        return self.unet(x, t, context)


def drop_labels(labels: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by NULL_LABEL with probability p (trains the unconditional model for CFG)."""
    if p <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop.to(labels.device), torch.full_like(labels, NULL_LABEL), labels)


def guided(model: nn.Module, x: Tensor, t, labels: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance: out_uncond + w (out_cond - out_uncond); w = 1 is the conditional model."""
    if guidance == 1.0:
        return model(x, t, labels)
    if torch.is_tensor(t) and t.ndim == 1:
        t = torch.cat([t, t])
    both = model(torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, NULL_LABEL)]))
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


# --------------------------------------------------------------------------- objective: DDPM (epsilon)
# The cosine schedule of Nichol & Dhariwal 2021 ("squaredcos_cap_v2"): DDPM's linear schedule has SNR below 0.01
# over the last third of its steps, wasted on images this small. clip_sample keeps predicted x_0 in [-1, 1].
DDPM_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                             prediction_type="epsilon", clip_sample=True)


@dataclass(frozen=True)
class DDPMObjective:
    """Epsilon-prediction DDPM; the loss is `noise_prediction_loss` with the scratch DDPM scheduler."""

    scheduler_config: Mapping[str, Any] = field(default_factory=lambda: dict(DDPM_SCHEDULER_CONFIG))
    # "ddpm" (ancestral) or "ddim" (eta 0). On the digits, ancestral sampling with guidance 3 labels ~99% right
    # after 300 steps where DDIM reaches ~75%: the deterministic path with CFG saturates against clip_sample.
    sampler: str = "ddpm"
    name: str = "ddpm"

    def train_scheduler(self):
        from scratch_sd.schedulers import get_scheduler

        return get_scheduler("ddpm", dict(self.scheduler_config))

    def loss(self, model: nn.Module, x0: Tensor, labels: Tensor, generator: torch.Generator | None = None,
             scheduler=None) -> Tensor:
        return noise_prediction_loss(model, scheduler or self.train_scheduler(), x0, labels, generator=generator)

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: Tensor, shape: tuple[int, ...], steps: int = 100,
               guidance: float = 2.0, generator: torch.Generator | None = None) -> Tensor:
        from scratch_sd.schedulers import get_scheduler

        scheduler = get_scheduler(self.sampler, dict(self.scheduler_config))
        scheduler.set_timesteps(steps)
        x = torch.randn((len(labels), *shape), generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            out = guided(model, scheduler.scale_model_input(x, t), t, labels, guidance)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        return x


# --------------------------------------------------------------------------- objective: VE-SDE score matching
@dataclass(frozen=True)
class VESDEObjective:
    """Variance-exploding SDE: x_t = x_0 + sigma(t) z, sigma(t) = sigma_min (sigma_max / sigma_min)^t, t ~ U[eps, 1].

    The score is parameterised through a denoiser with Karras et al. 2022's preconditioning (EDM,
    arXiv:2206.00364, table 1): D(x, sigma) = c_skip x + c_out F(c_in x, 999 t), and
    s(x, sigma) = (D - x) / sigma^2. Denoising score matching (Song et al. 2021, eq. 7) with weight
    lambda(sigma) = sigma^4 / c_out^2 is then || F - (x_0 - c_skip x_t) / c_out ||^2: unit-scale
    inputs and targets at every noise level, and a bounded estimate of x_0 at sigma_max (a plain
    -z / sigma output would multiply its errors by sigma there).
    sigma_max follows Song & Ermon 2020 (technique 1): about the largest distance between data points.
    """

    sigma_min: float = 0.01
    sigma_max: float = 25.0
    sigma_data: float = 0.5  # EDM's data scale
    sampling_eps: float = 1e-5
    snr: float = 0.15  # Langevin corrector's signal-to-noise ratio
    correct_steps: int = 0  # Langevin corrector steps per predictor step (0: Euler-Maruyama only)
    name: str = "vesde"

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def time_of(self, sigma: Tensor) -> Tensor:
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in), each (B, 1, 1, 1)."""
        sigma, sd2 = sigma[:, None, None, None], self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data * total.rsqrt(), total.rsqrt()

    def denoise(self, model: nn.Module, x: Tensor, sigma: Tensor, labels: Tensor, guidance: float = 1.0) -> Tensor:
        """D(x, sigma) ~ E[x_0 | x]; sigma: (B,)."""
        c_skip, c_out, c_in = self.preconditioning(sigma)
        return c_skip * x + c_out * guided(model, c_in * x, 999.0 * self.time_of(sigma), labels, guidance)

    def score(self, model: nn.Module, x: Tensor, sigma: Tensor, labels: Tensor, guidance: float = 1.0) -> Tensor:
        """s(x, sigma) ~ grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2 (Tweedie)."""
        return (self.denoise(model, x, sigma, labels, guidance) - x) / sigma[:, None, None, None] ** 2

    def loss(self, model: nn.Module, x0: Tensor, labels: Tensor, generator: torch.Generator | None = None,
             scheduler=None) -> Tensor:
        b = x0.shape[0]
        t = torch.rand(b, generator=generator) * (1 - self.sampling_eps) + self.sampling_eps
        z = torch.randn(x0.shape, generator=generator)
        sigma = self.sigma(t)
        x_t = x0 + sigma[:, None, None, None] * z
        c_skip, c_out, c_in = self.preconditioning(sigma)
        out = model(c_in * x_t, 999.0 * t, labels)
        return F.mse_loss(out.float(), ((x0 - c_skip * x_t) / c_out).float(), reduction="mean")

    def train_scheduler(self):
        return None

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: Tensor, shape: tuple[int, ...], steps: int = 100,
               guidance: float = 2.0, generator: torch.Generator | None = None) -> Tensor:
        """diffusers' ScoreSdeVePipeline loop on the scratch ScoreSdeVeScheduler: from sigma_max noise,
        `correct_steps` Langevin corrections then one reverse-diffusion (Euler-Maruyama) step per
        noise level; returns the last step's mean (no noise added at the end)."""
        from scratch_sd.schedulers import ScoreSdeVeScheduler

        scheduler = ScoreSdeVeScheduler(num_train_timesteps=steps, snr=self.snr, sigma_min=self.sigma_min,
                                        sigma_max=self.sigma_max, sampling_eps=self.sampling_eps,
                                        correct_steps=self.correct_steps)
        scheduler.set_timesteps(steps)
        scheduler.set_sigmas(steps)
        b = len(labels)
        x = torch.randn((b, *shape), generator=generator) * scheduler.init_noise_sigma
        x_mean = x
        for i, t in enumerate(scheduler.timesteps):
            sigma = scheduler.sigmas[i] * torch.ones(b)
            for _ in range(self.correct_steps):
                x = scheduler.step_correct(self.score(model, x, sigma, labels, guidance), x,
                                           generator=generator).prev_sample
            out = scheduler.step_pred(self.score(model, x, sigma, labels, guidance), t, x, generator=generator)
            x, x_mean = out.prev_sample, out.prev_sample_mean
        return x_mean


OBJECTIVES = {"ddpm": DDPMObjective, "vesde": VESDEObjective}


# --------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a model's parameters (warm-up: decay_t = min(decay, (1+t)/(10+t)))."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v, 1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict(self.shadow, strict=True)
        return model


# --------------------------------------------------------------------------- trainer
@dataclass
class DigitsTrainConfig:
    steps: int = 2000  # total optimiser steps (a resumed run continues up to this count)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    grad_accum: int = 1  # micro-batches per optimiser step (each of batch_size)
    label_dropout: float = 0.1  # p(label -> null) for classifier-free guidance
    ema_decay: float = 0.995
    seed: int = 0
    bf16: bool = False  # autocast the forward in bfloat16


class DigitsTrainer:
    """Trains one ClassConditionedUNet on (images, labels) with one objective; resumable.

    State (model, EMA, AdamW moments, step) goes to and from a flat tensor dict under a prefix, so
    one safetensors file can hold several objectives (`state_dict(prefix)` / `load_state_dict`).
    """

    def __init__(self, objective, unet_cfg: UNetConfig, cfg: DigitsTrainConfig):
        if cfg.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {cfg.batch_size}")
        if cfg.steps < 0:
            raise ValueError(f"steps must be >= 0, got {cfg.steps}")
        self.objective, self.unet_cfg, self.cfg = objective, unet_cfg, cfg
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, global RNG untouched
            torch.manual_seed(cfg.seed)
            self.model = ClassConditionedUNet(unet_cfg)
        self.ema = EMA(self.model, cfg.ema_decay)
        self.optimizer = adamw(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = objective.train_scheduler()
        self.step = 0
        self.history: list[dict] = []

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup_steps))

    def _loss(self, batch) -> Tensor:
        x0, labels, g = batch
        with autocast(torch.bfloat16 if self.cfg.bf16 else None):
            return self.objective.loss(self.model, x0, labels, generator=g, scheduler=self.scheduler)

    def train(self, images: Tensor, labels: Tensor, steps: int | None = None,
              on_step: Callable[[dict], None] | None = None) -> list[dict]:
        """Run optimiser steps until `steps` (default cfg.steps) in total; returns this run's history."""
        end = self.cfg.steps if steps is None else steps
        run: list[dict] = []
        self.model.train()
        while self.step < end:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
            micro = []
            for _ in range(self.cfg.grad_accum):
                idx = torch.randint(0, len(images), (self.cfg.batch_size,), generator=g)
                micro.append((images[idx], drop_labels(labels[idx], self.cfg.label_dropout, g), g))
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step)
            result = train_step(self.model, self.optimizer, micro, self._loss, self.cfg.max_grad_norm)
            self.step += 1
            self.ema.update(self.model, self.step)
            row = dict(objective=self.objective.name, step=self.step, loss=result.loss,
                       grad_norm=result.grad_norm, lr=self.lr_at(self.step - 1))
            run.append(row)
            self.history.append(row)
            if on_step is not None:
                on_step(row)
        self.model.eval()
        return run

    def ema_model(self) -> ClassConditionedUNet:
        """A copy of the model carrying the EMA weights (what sampling uses)."""
        model = ClassConditionedUNet(self.unet_cfg)
        return self.ema.copy_to(model).eval()

    # ---- checkpoint state as a flat tensor dict
    def state_dict(self, prefix: str = "") -> dict[str, Tensor]:
        out = {f"{prefix}model.{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"{prefix}ema.{k}": v for k, v in self.ema.shadow.items()})
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, st in ((p, self.optimizer.state.get(p)) for g in self.optimizer.param_groups for p in g["params"]):
            for key, value in (st or {}).items():
                out[f"{prefix}optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).reshape(-1) \
                    if key == "step" else value
        out[f"{prefix}step"] = torch.tensor([self.step], dtype=torch.int64)
        return out

    def expected_shapes(self, prefix: str = "") -> dict[str, torch.Size]:
        shapes = {f"{prefix}model.{k}": v.shape for k, v in self.model.state_dict().items()}
        shapes.update({f"{prefix}ema.{k}": v for k, v in ((k, v.shape) for k, v in self.ema.shadow.items())})
        return shapes

    def load_state_dict(self, state: Mapping[str, Tensor], prefix: str = "", source: str = "checkpoint") -> None:
        """Restore model, EMA, AdamW moments and step from `state[prefix + ...]`; a checkpoint made
        for another model shape is a ValueError naming the first mismatches."""
        expected = self.expected_shapes(prefix)
        missing = [k for k in expected if k not in state]
        bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(s)})" for k, s in expected.items()
               if k in state and tuple(state[k].shape) != tuple(s)]
        if missing or bad or f"{prefix}step" not in state:
            what = f"{len(bad)} mis-shaped tensors: {', '.join(bad[:3])}" if bad else \
                f"{len(missing)} missing tensors: {', '.join(missing[:3])}"
            raise ValueError(f"{source} does not fit the {self.objective.name} digits model ({what})")
        self.model.load_state_dict({k: state[f"{prefix}model.{k}"] for k in self.model.state_dict()}, strict=True)
        self.ema.shadow = {k: state[f"{prefix}ema.{k}"].clone() for k in self.ema.shadow}
        names = dict(self.model.named_parameters())
        for name, p in names.items():
            st = {key: state[f"{prefix}optim.{name}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq")
                  if f"{prefix}optim.{name}.{key}" in state}
            if len(st) == 3:
                self.optimizer.state[p] = {"step": st["step"].reshape(()).clone().float(),
                                           "exp_avg": st["exp_avg"].clone(), "exp_avg_sq": st["exp_avg_sq"].clone()}
        self.step = int(state[f"{prefix}step"].reshape(-1)[0])

    def metadata(self) -> dict[str, str]:
        return {f"{self.objective.name}.unet_config": json.dumps(asdict(self.unet_cfg)),
                f"{self.objective.name}.objective": json.dumps(asdict(self.objective), default=str),
                f"{self.objective.name}.train_config": json.dumps(asdict(self.cfg))}


__all__ = ["NUM_CLASSES", "NULL_LABEL", "digits_unet_config", "ClassConditionedUNet", "drop_labels", "guided",
           "DDPM_SCHEDULER_CONFIG", "DDPMObjective", "VESDEObjective", "OBJECTIVES", "EMA", "DigitsTrainConfig",
           "DigitsTrainer"]
