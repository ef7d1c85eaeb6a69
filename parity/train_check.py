"""Training parity: the scratch training step against diffusers' UNet trained the way
diffusers' examples/text_to_image/train_text_to_image.py trains it (accelerate left out).

Both sides start from the same weights (the zoo's seeded UNet2DConditionModel, converted to
the scratch UNet by the key table), see the same batch, timesteps and noise, and use
torch.optim.AdamW with the same hyper-parameters. Compared, one parity.csv-style row each:

- `loss`: the MSE of one micro-batch (per prediction_type: epsilon and v_prediction);
- `grad:all`, `grad:<group>`: the gradient of every parameter, compared in diffusers' names
  (scratch gradients go through `scratch_sd.convert.unet.to_diffusers`, which splits the fused
  q/k/v), all at once and per top-level block (`down_blocks.0`, `mid_block`, ...); in fp32 a
  group passes only when every parameter in it passes on its own, and `grad:worst_parameter`
  names the worst one;
- `grad_norm_per_step`, `loss_per_step`: the pre-clipping gradient norm and the loss of each of
  3 optimiser steps of 2 accumulated micro-batches each, clipped to norm 1, AdamW at diffusers'
  defaults (lr 1e-5, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8);
- `adam_exp_avg_after_3_steps`, `adam_exp_avg_sq_after_3_steps`: AdamW's moments, i.e. the
  accumulated, clipped gradients the optimiser was fed;
- `params_after_3_steps`.
  (The updates, after minus before, are not compared at rel_l2 1e-5: at lr 1e-5 an update is
  ~3e-5 while a parameter's fp32 spacing is ~6e-8 |p|, so a single last-bit rounding difference
  of a parameter is ~1e-3 of its update.)

`run_train_checks(dtype)` returns the rows; `sdparity check --components train` reports them.
For bf16/fp16 both sides run their forward under torch.autocast and each is compared with the
fp32 result (parity.tolerances' rule: scratch may not be more than max_error_ratio x as far).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from parity.tolerances import Table, judge
from scratch_sd.names import DTYPES

PREDICTION_TYPES = ("epsilon", "v_prediction")
ACCUMULATION = 2  # micro-batches per optimiser step
OPTIMISER_STEPS = 3
MICRO_BATCH = 2
MAX_GRAD_NORM = 1.0
LR = 1e-5
# Latents of 16x16: the tiny UNet's mid block then runs at 2x2. At the preset's 8x8 it runs at 1x1, where
# self-attention has one key, softmax is constantly 1, and to_q / to_k get an exactly zero gradient: their
# computed gradients are rounding noise (~1e-10) on both sides, and Adam turns that noise into updates.
LATENT_SIZE = 16


# --------------------------------------------------------------------------- the two sides
def schedulers(prediction_type: str):
    """(diffusers DDPMScheduler, scratch DDPMScheduler) from SD 1.5's scheduler config, as the
    training script loads it (`DDPMScheduler.from_pretrained(model, subfolder="scheduler")`)."""
    import diffusers

    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG, get_scheduler

    config = {**SD15_SCHEDULER_CONFIG, "prediction_type": prediction_type}
    return diffusers.DDPMScheduler.from_config(config), get_scheduler("ddpm", config)


def diffusers_loss(unet, noise_scheduler, latents, encoder_hidden_states, noise, timesteps, autocast_dtype=None):
    """The loss of train_text_to_image.py's training loop, line for line."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")


def _moments(model, optimizer, key: str) -> dict[str, torch.Tensor]:
    return {n: optimizer.state[p][key].detach().clone() for n, p in model.named_parameters()}


def diffusers_train_steps(unet, noise_scheduler, steps: list[list[dict]], autocast_dtype=None):
    """train_text_to_image.py's optimisation: per micro-batch `accelerator.backward(loss)` (which
    divides by gradient_accumulation_steps), then on sync clip_grad_norm_, optimizer.step, zero_grad."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    losses, norms = [], []
    for micro in steps:
        total = 0.0
        for b in micro:
            loss = diffusers_loss(unet, noise_scheduler, b["x0"], b["context"], b["noise"], b["t"], autocast_dtype)
            (loss / len(micro)).backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_GRAD_NORM)))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / len(micro))
    return losses, norms, {k: _moments(unet, optimizer, k) for k in ("exp_avg", "exp_avg_sq")}


def scratch_train_steps(unet, scheduler, steps: list[list[dict]], autocast_dtype=None):
    from scratch_sd.train import adamw, noise_prediction_loss, train_step

    optimizer = adamw(unet.parameters(), lr=LR)

    def loss_fn(b):
        return noise_prediction_loss(unet, scheduler, b["x0"], b["context"], timesteps=b["t"], noise=b["noise"],
                                     autocast_dtype=autocast_dtype)

    results = [train_step(unet, optimizer, micro, loss_fn, MAX_GRAD_NORM) for micro in steps]
    moments = {k: _moments(unet, optimizer, k) for k in ("exp_avg", "exp_avg_sq")}
    return [r.loss for r in results], [r.grad_norm for r in results], moments


def make_batch(cfg, g: torch.Generator, batch: int = MICRO_BATCH) -> dict:
    """Latents, text context, noise and timesteps for one micro-batch (drawn on the CPU)."""
    u, lat = cfg.unet, max(cfg.latent_size, LATENT_SIZE)
    return dict(x0=torch.randn(batch, u.in_channels, lat, lat, generator=g),
                context=torch.randn(batch, cfg.text.max_positions, u.cross_attention_dim, generator=g),
                noise=torch.randn(batch, u.in_channels, lat, lat, generator=g),
                t=torch.randint(0, 1000, (batch,), generator=g))


# --------------------------------------------------------------------------- rows
def _row(table: Table, dtype: str, tensor: str, ref: torch.Tensor, out: torch.Tensor, case: str,
         truth: torch.Tensor | None = None, kind: str | None = None, preset: str = "tiny") -> dict:
    tol = table.lookup("train", kind or tensor, dtype)
    v = judge(ref.detach().float().reshape(-1), out.detach().float().reshape(-1), tol, dtype,
              None if truth is None else truth.detach().float().reshape(-1))
    return dict(component="train", preset=preset, dtype=dtype, device="cpu", mode="train", case=case, tensor=tensor,
                shape="x".join(map(str, out.shape)) or "1", status="compared", **v.fields(dtype))


def group_of(name: str) -> str:
    """Top-level block of a diffusers UNet parameter: down_blocks.0, mid_block, time_embedding, conv_in, ..."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


def _grad_rows(table, dtype, ref_grads, our_grads, case, truth_grads, preset) -> list[dict]:
    """`grad:all`, one row per group, and (fp32) the worst single parameter.

    fp32: every parameter is also judged on its own; a group row passes only if each of its
    parameters does. bf16/fp16: groups only. There the rule compares two rounding errors, and
    for a 32-element norm bias their ratio is a coin toss (1.5x either way in a run where the
    ratio over each block is 0.95-1.05); over a block it measures the implementation.
    """
    def row(tensor, names):
        truth = None if truth_grads is None else _flat([truth_grads[n] for n in names])
        r = _row(table, dtype, tensor, _flat([ref_grads[n] for n in names]), _flat([our_grads[n] for n in names]),
                 case, truth, kind="grad", preset=preset)
        r["case"] = f"{case},parameters={len(names)}"
        return r

    names = list(ref_grads)
    rows = [row("grad:all", names)]
    per_param = {n: row(f"grad:{n}", [n]) for n in names} if dtype == "fp32" else {}
    for group in dict.fromkeys(group_of(n) for n in names):
        members = [n for n in names if group_of(n) == group]
        r = row(f"grad:{group}", members)
        bad = [n for n in members if n in per_param and not per_param[n]["passed"]]
        # a group is judged by its members too: its margin is the binding one of its own and theirs
        margins = [m for m in [r["margin"]] + [per_param[n]["margin"] for n in members if n in per_param] if m != ""]
        r["margin"] = max(margins, default="")
        if bad:
            r["passed"] = False
            r["reason"] = f"{len(bad)}/{len(members)} parameters fail, first {bad[0]}: {per_param[bad[0]]['reason']}"
        rows.append(r)
    if per_param:
        worst = max(per_param.values(), key=lambda r: r["rel_l2"])
        rows.append(dict(worst, tensor="grad:worst_parameter", case=f"{case},parameter={worst['tensor'][5:]}"))
    return rows


# --------------------------------------------------------------------------- the check
def _models(preset: str, seed: int, exact: bool = False):
    from parity import zoo
    from parity.candidates.scratch import network_from_reference
    from scratch_sd.config import preset as make_preset

    cfg = make_preset(preset)
    reference = zoo.reference_unet(cfg, seed)
    scratch = network_from_reference("unet", reference, cfg).set_exact(exact)
    return cfg, reference.train(), scratch.train()


def _grads(model) -> dict[str, torch.Tensor]:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    if missing:
        raise AssertionError(f"{len(missing)} parameters got no gradient, first {missing[0]}")
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def side_by_side(prediction_type: str, dtype: str, cfg, reference, scratch, seed: int = 0) -> tuple[dict, dict]:
    """Train copies of both models on the same data; return each side's results in diffusers' names:
    loss, grads (one micro-batch), losses and norms (per optimiser step), after and updates (flat)."""
    from scratch_sd.convert.unet import to_diffusers
    from scratch_sd.train import noise_prediction_loss

    autocast_dtype = None if dtype == "fp32" else DTYPES[dtype]
    ref_sched, our_sched = schedulers(prediction_type)
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(cfg, g)
    steps = [[make_batch(cfg, g) for _ in range(ACCUMULATION)] for _ in range(OPTIMISER_STEPS)]
    ref, ours = copy.deepcopy(reference), copy.deepcopy(scratch)
    names = [n for n, _ in ref.named_parameters()]

    # 1. one micro-batch: loss and every gradient
    ref_loss = diffusers_loss(ref, ref_sched, batch["x0"], batch["context"], batch["noise"], batch["t"],
                              autocast_dtype)
    ref_loss.backward()
    our_loss = noise_prediction_loss(ours, our_sched, batch["x0"], batch["context"], timesteps=batch["t"],
                                     noise=batch["noise"], autocast_dtype=autocast_dtype)
    our_loss.backward()
    ref_grads, our_grads = _grads(ref), to_diffusers(_grads(ours), cfg.unet)
    ref.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)

    # 2. three optimiser steps, two accumulated micro-batches each, clipped
    ref_losses, ref_norms, ref_moments = diffusers_train_steps(ref, ref_sched, steps, autocast_dtype)
    our_losses, our_norms, our_moments = scratch_train_steps(ours, our_sched, steps, autocast_dtype)
    our_moments = {k: to_diffusers(v, cfg.unet) for k, v in our_moments.items()}
    ref_after = {n: p.detach() for n, p in ref.named_parameters()}
    our_after = to_diffusers({n: p.detach() for n, p in ours.named_parameters()}, cfg.unet)

    def result(loss, grads, losses, norms, moments, after):
        return dict(loss=loss.detach(), grads=grads, losses=torch.tensor(losses), norms=torch.tensor(norms),
                    exp_avg=_flat([moments["exp_avg"][n] for n in names]),
                    exp_avg_sq=_flat([moments["exp_avg_sq"][n] for n in names]),
                    after=_flat([after[n] for n in names]))

    return (result(ref_loss, ref_grads, ref_losses, ref_norms, ref_moments, ref_after),
            result(our_loss, our_grads, our_losses, our_norms, our_moments, our_after))


def _rows(prediction_type: str, dtype: str, table: Table, ref: dict, ours: dict, truth: dict | None,
          preset: str) -> list[dict]:
    case = f"prediction_type={prediction_type}"
    t = truth or {}
    steps_case = f"{case},steps={OPTIMISER_STEPS},accumulation={ACCUMULATION}"
    rows = [_row(table, dtype, "loss", ref["loss"], ours["loss"], case, t.get("loss"), preset=preset)]
    rows += _grad_rows(table, dtype, ref["grads"], ours["grads"], case, t.get("grads"), preset)
    rows += [
        _row(table, dtype, "loss_per_step", ref["losses"], ours["losses"], steps_case, t.get("losses"),
             preset=preset),
        _row(table, dtype, "grad_norm_per_step", ref["norms"], ours["norms"],
             f"{steps_case},before clipping to {MAX_GRAD_NORM:g}", t.get("norms"), preset=preset),
        _row(table, dtype, "adam_exp_avg_after_3_steps", ref["exp_avg"], ours["exp_avg"], steps_case,
             t.get("exp_avg"), kind="adam_moments", preset=preset),
        _row(table, dtype, "adam_exp_avg_sq_after_3_steps", ref["exp_avg_sq"], ours["exp_avg_sq"], steps_case,
             t.get("exp_avg_sq"), kind="adam_moments", preset=preset),
        _row(table, dtype, "params_after_3_steps", ref["after"], ours["after"], f"{steps_case},AdamW lr={LR:g}",
             t.get("after"), kind="params", preset=preset),
    ]
    return rows


def run_train_checks(dtype: str = "fp32", preset: str = "tiny", seed: int = 0, table: Table | None = None,
                     prediction_types=PREDICTION_TYPES, exact: bool = False) -> list[dict]:
    """parity.csv-style rows (component "train") for the training step at `dtype`.

    fp32: scratch against diffusers directly. bf16/fp16: both sides autocast; each is compared
    with diffusers' fp32 run (the truth) by parity.tolerances' error-ratio rule. `exact`: the scratch
    UNet's mode (layers.ExactOrFast; default fast).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    table = table or Table.load()
    cfg, reference, scratch = _models(preset, seed, exact)
    rows = []
    for prediction_type in prediction_types:
        truth = None
        if dtype != "fp32":
            truth, _ = side_by_side(prediction_type, "fp32", cfg, reference, scratch, seed)
        ref, ours = side_by_side(prediction_type, dtype, cfg, reference, scratch, seed)
        rows += _rows(prediction_type, dtype, table, ref, ours, truth, preset)
    return rows


__all__ = ["run_train_checks", "side_by_side", "diffusers_loss", "diffusers_train_steps", "scratch_train_steps",
           "schedulers", "make_batch", "group_of", "PREDICTION_TYPES"]
