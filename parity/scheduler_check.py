"""Scheduler parity: scratch_sd.schedulers against diffusers' schedulers, one row per compared tensor.

For each scheduler and config variant (SD 1.5's config, every timestep_spacing, every prediction_type,
steps_offset 0/1, set_alpha_to_one, and the scheduler's own options) and each step count:
  (a) timesteps and sigmas, exactly (same dtype, max_abs 0);
  (b) a full sampling loop driven by a smooth deterministic model function, from the same initial noise,
      stochastic steps fed by identically seeded torch.Generators: final fp32 latents within 1e-6;
  (c) optionally the same loop with a real (tiny) UNet for a few step counts;
  and add_noise. Inputs are drawn from a seed (the gate's --seed). Combinations diffusers itself
  rejects are skipped with a note, after checking that ours rejects them too.
"""
from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from typing import Any, Callable, Iterable

import torch

from parity.metrics import compare
from parity.scheduler_variants import SD15, Variant, variants_for  # noqa: F401 (re-exported)
from scratch_sd import schedulers as ours_mod

DEFAULT_STEPS = (1, 2, 10, 20, 50, 1000)
LONG_STEPS = 1000  # the long loop runs only for variants marked `long`
UNET_STEPS = (1, 2, 10, 50)
LATENT_SHAPE = (1, 4, 8, 8)
SEED = 0
LATENT_ATOL = 1e-6

def model_fn(sample: torch.Tensor, t: Any) -> torch.Tensor:
    """A smooth, deterministic stand-in for the UNet: eps = 0.1 x + 0.05 sin(x + t / 100)."""
    t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
    return 0.1 * sample + 0.05 * torch.sin(sample + t / 100.0)


def score_fn(sample: torch.Tensor, sigma: Any) -> torch.Tensor:
    """Stand-in for a VE score model: about -x / (sigma^2 + 1), plus a smooth perturbation."""
    s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    return -sample / (s * s + 1.0) + 0.01 * torch.sin(sample)


def tiny_unet_fn(seed: int = 0) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A tiny random-weight diffusers UNet2DConditionModel as `(sample, t) -> eps`, with fixed text states.

    Small enough for 1000-step loops on a CPU; used for the "latents_unet" rows."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8,
                                norm_num_groups=8).eval()
    text = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(seed + 1))

    @torch.no_grad()
    def fn(sample: torch.Tensor, t: Any) -> torch.Tensor:
        return unet(sample, t, encoder_hidden_states=text.expand(sample.shape[0], -1, -1)).sample

    return fn


def _with_variance(eps: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "learned":  # a positive variance
        return torch.cat([eps, 0.02 * torch.sigmoid(eps)], dim=1)
    if kind == "learned_range":  # an interpolation weight in [-1, 1]
        return torch.cat([eps, torch.tanh(eps)], dim=1)
    return eps


# ------------------------------------------------------------------------------------------ the two sides


@contextlib.contextmanager
def single_thread():
    """Run with one intra-op thread, then restore: these tensors are tiny, and on a busy 2-core machine a
    second thread costs ~25x per UNet call in synchronisation instead of saving anything."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet_diffusers():
    import diffusers.utils.logging as dlog
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


def make_pair(variant: Variant):
    """(diffusers scheduler, scratch scheduler) from the same config dict."""
    import diffusers
    ref_cls = getattr(diffusers, ours_mod.DIFFUSERS_CLASS_NAMES[variant.name])
    with _quiet_diffusers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers' deprecation notice for dpmsolver / sde-dpmsolver
        ref = ref_cls.from_config(dict(variant.config))
    ours = ours_mod.SCHEDULERS[variant.name].from_config(dict(variant.config))
    return ref, ours


def _step_kwargs(sched, variant: Variant, generator: torch.Generator) -> dict:
    """As StableDiffusionPipeline.prepare_extra_step_kwargs: pass what `step` accepts."""
    params = set(inspect.signature(sched.step).parameters)
    kwargs = {k: v for k, v in variant.step_kwargs.items() if k in params}
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def sample_loop(sched, variant: Variant, steps: int, noise: torch.Tensor, model: Callable,
                generator: torch.Generator | None = None, seed: int = SEED) -> torch.Tensor:
    """The denoising loop of StableDiffusionPipeline (or ScoreSdeVePipeline for sde_ve); returns final latents.
    Stochastic steps draw from `generator` (a fresh one seeded seed + 1 by default)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(seed + 1)
    if variant.name == "sde_ve":
        sched.set_timesteps(steps)
        sched.set_sigmas(steps)
        sample = noise * sched.init_noise_sigma
        for i, t in enumerate(sched.timesteps):
            sigma_t = sched.sigmas[i] * torch.ones(sample.shape[0])
            for _ in range(sched.config.correct_steps):
                sample = sched.step_correct(model(sample, sigma_t), sample, generator=generator).prev_sample
            sample = sched.step_pred(model(sample, sigma_t), t, sample, generator=generator).prev_sample
        return sample
    sched.set_timesteps(steps)
    latents = noise * sched.init_noise_sigma
    kwargs = _step_kwargs(sched, variant, generator)
    for t in sched.timesteps:
        inp = sched.scale_model_input(latents, t)
        out = _with_variance(model(inp, t), variant.model)
        latents = sched.step(out, t, latents, **kwargs, return_dict=False)[0]
    return latents


def add_noise_one(sched, variant: Variant, steps: int, seed: int = SEED) -> torch.Tensor:
    """add_noise on a batch of 3 at the first, middle and last timestep of an n-step schedule."""
    g = torch.Generator().manual_seed(seed + 2)
    x0 = torch.randn((3,) + LATENT_SHAPE[1:], generator=g)
    eps = torch.randn((3,) + LATENT_SHAPE[1:], generator=g)
    sched.set_timesteps(steps)
    if variant.name == "sde_ve":  # integer indices into discrete_sigmas
        sched.set_sigmas(steps)
        ts = torch.tensor([0, steps // 2, steps - 1])
    else:
        n = len(sched.timesteps)
        ts = sched.timesteps[torch.tensor([0, n // 2, n - 1])]
    return sched.add_noise(x0, eps, ts)


# ------------------------------------------------------------------------------------------------- rows


def _row(label: str, steps: int | str, tensor: str, ref: torch.Tensor | None, out: torch.Tensor | None,
         atol: float, note: str = "", passed: bool | None = None) -> dict:
    row = {"component": "scheduler", "scheduler": label, "step": str(steps), "tensor": tensor, "dtype": "fp32",
           "device": "cpu", "shape": "", "max_abs": None, "mean_abs": None, "rel_l2": None, "cosine_distance": None,
           "psnr_db": None, "atol": atol, "rtol": 0.0, "min_psnr_db": None, "passed": passed, "note": note}
    if ref is not None and out is not None:
        row["shape"] = "x".join(str(s) for s in ref.shape)
        if ref.shape != out.shape:
            row.update(passed=False, note=f"shape mismatch: diffusers {tuple(ref.shape)} vs scratch {tuple(out.shape)}")
            return row
        err = compare(ref, out)
        row.update(max_abs=err.max_abs, mean_abs=err.mean_abs, rel_l2=err.rel_l2,
                   cosine_distance=err.cosine_distance, psnr_db=err.psnr_db)
        ok = err.finite and err.max_abs <= atol
        if ref.dtype != out.dtype:
            ok = False
            row["note"] = (note + "; " if note else "") + f"dtype differs: diffusers {ref.dtype} vs scratch {out.dtype}"
        if not err.finite:
            # diffusers itself may produce inf/NaN (e.g. repeated timesteps): equal only if the same elements
            # are non-finite and the rest agree
            same_mask = torch.equal(torch.isfinite(ref), torch.isfinite(out))
            fin = torch.isfinite(ref)
            rest_ok = same_mask and (not fin.any() or float((ref[fin] - out[fin]).abs().max()) <= atol)
            ok = bool(rest_ok) and ref.dtype == out.dtype
            row["note"] = (note + "; " if note else "") + ("diffusers output is non-finite too; finite parts "
                                                            "agree" if ok else "non-finite values differ")
        row["passed"] = bool(ok)
    return row


def _run_both(fn_ref: Callable, fn_ours: Callable):
    """Run both sides; (ref_result, ours_result, ref_exc, ours_exc)."""
    results, excs = [], []
    for fn in (fn_ref, fn_ours):
        try:
            results.append(fn())
            excs.append(None)
        except Exception as e:  # noqa: BLE001 - a raised error is a result to compare
            results.append(None)
            excs.append(e)
    return results[0], results[1], excs[0], excs[1]


def _exception_row(label, steps, tensor, ref_exc, ours_exc, atol) -> dict:
    if ref_exc is not None and ours_exc is not None:
        return _row(label, steps, tensor, None, None, atol, passed=True,
                    note=f"skipped: diffusers raises {type(ref_exc).__name__}({str(ref_exc)[:80]}); scratch raises "
                         f"{type(ours_exc).__name__}({str(ours_exc)[:80]})")
    if ref_exc is not None:
        return _row(label, steps, tensor, None, None, atol, passed=False,
                    note=f"diffusers raises {type(ref_exc).__name__}({str(ref_exc)[:80]}) but scratch does not")
    return _row(label, steps, tensor, None, None, atol, passed=False,
                note=f"scratch raises {type(ours_exc).__name__}({str(ours_exc)[:120]}) but diffusers does not")


def check_variant(variant: Variant, steps: Iterable[int] = DEFAULT_STEPS, unet: Callable | None = None,
                  seed: int = SEED) -> list[dict]:
    """The rows of one variant. `seed` draws the initial noise (seed), the stochastic steps' noise (seed + 1,
    a fresh generator per side) and add_noise's inputs (seed + 2): the gate passes its --seed."""
    rows = []
    model = score_fn if variant.name == "sde_ve" else model_fn
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(LATENT_SHAPE, generator=g)
    for n in steps:
        if n == LONG_STEPS and not variant.long:
            continue
        ref, ours = make_pair(variant)
        # (a) timesteps and sigmas, exact
        def schedule(s):
            s.set_timesteps(n)
            if variant.name == "sde_ve":
                s.set_sigmas(n)
            return s
        r, o, re, oe = _run_both(lambda: schedule(ref), lambda: schedule(ours))
        if re or oe:
            rows.append(_exception_row(variant.label, n, "timesteps", re, oe, 0.0))
            continue
        rows.append(_row(variant.label, n, "timesteps", ref.timesteps, ours.timesteps, 0.0))
        if hasattr(ref, "sigmas"):
            rows.append(_row(variant.label, n, "sigmas", ref.sigmas, ours.sigmas, 0.0))
        if hasattr(ref, "discrete_sigmas"):
            rows.append(_row(variant.label, n, "discrete_sigmas", ref.discrete_sigmas, ours.discrete_sigmas, 0.0))
        # (b) the sampling loop
        ref, ours = make_pair(variant)
        with _quiet_diffusers(), torch.no_grad():
            r, o, re, oe = _run_both(lambda: sample_loop(ref, variant, n, noise.clone(), model, seed=seed),
                                     lambda: sample_loop(ours, variant, n, noise.clone(), model, seed=seed))
        rows.append(_exception_row(variant.label, n, "latents", re, oe, LATENT_ATOL) if (re or oe)
                    else _row(variant.label, n, "latents", r, o, LATENT_ATOL))
        # add_noise
        ref, ours = make_pair(variant)
        r, o, re, oe = _run_both(lambda: add_noise_one(ref, variant, n, seed),
                                 lambda: add_noise_one(ours, variant, n, seed))
        rows.append(_exception_row(variant.label, n, "add_noise", re, oe, LATENT_ATOL) if (re or oe)
                    else _row(variant.label, n, "add_noise", r, o, LATENT_ATOL))
        # (c) the loop with a real UNet
        if unet is not None and n in UNET_STEPS and variant.unet:
            ref, ours = make_pair(variant)
            with _quiet_diffusers(), torch.no_grad():
                r, o, re, oe = _run_both(lambda: sample_loop(ref, variant, n, noise.clone(), unet, seed=seed),
                                         lambda: sample_loop(ours, variant, n, noise.clone(), unet, seed=seed))
            rows.append(_exception_row(variant.label, n, "latents_unet", re, oe, LATENT_ATOL) if (re or oe)
                        else _row(variant.label, n, "latents_unet", r, o, LATENT_ATOL))
    return rows


def run_scheduler_checks(names: list[str] | str = "all", steps: Iterable[int] = DEFAULT_STEPS,
                         unet: Callable | None = None, progress: Callable[[str], None] | None = None,
                         seed: int = SEED) -> list[dict]:
    """All rows for the named schedulers ("all" = every registry entry), their inputs drawn from `seed`.
    `unet(sample, t) -> eps` adds the "latents_unet" rows (SD 1.5 config variant, 1/2/10/50 steps; not
    sde_ve, whose model is a score)."""
    if names == "all":
        names = list(ours_mod.SCHEDULERS)
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in ours_mod.SCHEDULERS]
    if unknown:
        raise ValueError(f"unknown scheduler {unknown[0]!r}; known: {', '.join(ours_mod.SCHEDULERS)}")
    steps = tuple(steps)
    rows: list[dict] = []
    for name in names:
        for variant in variants_for(name):
            t0 = time.perf_counter()
            with single_thread():
                vrows = check_variant(variant, steps, unet, seed)
            rows.extend(vrows)
            if progress is not None:
                bad = sum(1 for r in vrows if not r["passed"])
                progress(f"{variant.label}: {len(vrows)} rows, {bad} failed, {time.perf_counter() - t0:.2f}s")
    return rows


def worst_by_scheduler(rows: list[dict]) -> dict[str, dict]:
    """{registry name: {"max_abs": worst, "rows": n, "failed": n}} over rows with a measured max_abs."""
    out: dict[str, dict] = {}
    for r in rows:
        name = r["scheduler"].split("[", 1)[0]
        d = out.setdefault(name, {"max_abs": 0.0, "rows": 0, "failed": 0, "skipped": 0})
        d["rows"] += 1
        d["failed"] += 0 if r["passed"] else 1
        d["skipped"] += 1 if r["note"].startswith("skipped") else 0
        if r["max_abs"] is not None and r["max_abs"] == r["max_abs"]:
            d["max_abs"] = max(d["max_abs"], r["max_abs"])
    return out


if __name__ == "__main__":  # python -m parity.scheduler_check [names|all] [--unet]
    import sys
    t0 = time.perf_counter()
    args = [a for a in sys.argv[1:] if a != "--unet"]
    unet = tiny_unet_fn() if "--unet" in sys.argv else None
    rows = run_scheduler_checks(args[0] if args else "all", unet=unet, progress=print)
    for r in rows:
        if not r["passed"] or r["note"]:
            print("FAIL" if not r["passed"] else "note", r["scheduler"], r["step"], r["tensor"], r["max_abs"], r["note"])
    for name, d in worst_by_scheduler(rows).items():
        print(f"{name:16s} worst max_abs {d['max_abs']:.3g}  rows {d['rows']}  failed {d['failed']}  skipped {d['skipped']}")
    print(f"{len(rows)} rows, {sum(not r['passed'] for r in rows)} failed, {time.perf_counter() - t0:.1f}s")
