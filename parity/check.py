"""`sdparity check`: the parity gate.

For each requested precision:
1. direct network checks (issue 2): each scratch network against its reference on the
   same weights and inputs (several seeds; UNet at timesteps across 0..999; VAE encode
   and decode);
2. scheduler checks (issue 3): timesteps/sigmas and full sampling loops (fp32);
3. the swap matrix (issue 4): diffusers' pipeline with one scratch component swapped in
   at a time, and all of them, txt2img and img2img, every intermediate tensor compared
   with the all-diffusers baseline at the same precision (and, for fp16/bf16, both with
   the fp32 baseline);
4. the scratch pipeline end to end against diffusers' pipeline (component `pipeline`).
Writes parity.csv and summary.md (plus plots) into --out; exit 1 on any failure.
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from parity.tolerances import DTYPES, Table, judge

COMPONENTS = ("text_encoder", "vae", "unet", "scheduler", "pipeline", "train")
DEFAULT_COMPONENTS = ("text_encoder", "vae", "unet", "scheduler", "pipeline")  # `all`; train is asked by name
NETWORKS = ("text_encoder", "vae", "unet")
UNET_TIMESTEPS = (0, 1, 250, 500, 745.3, 999)
PIPELINE_SCHEDULERS = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "lms")
COLUMNS = ["run_id", "preset", "component", "dtype", "device", "scheduler", "step", "tensor", "shape",
           "max_abs", "mean_abs", "rel_l2", "cosine_distance", "psnr_db", "atol", "rtol", "min_psnr_db", "passed",
           # added columns
           "mode", "case", "max_rel_l2", "scratch_rel_l2_vs_fp32", "diffusers_rel_l2_vs_fp32", "error_ratio",
           "max_error_ratio", "status", "reason", "net_mode"]


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="the parity gate: scratch vs diffusers, component by component")
    p.add_argument("--preset", default="tiny", help="tiny | sd15 (default tiny)")
    p.add_argument("--model", default=None, help="a local diffusers folder or a single .safetensors/.ckpt file")
    p.add_argument("--components", default="all",
                   help=f"comma list of {', '.join(COMPONENTS)} (default all = every one but train)")
    p.add_argument("--dtypes", default="fp32", help="comma list of fp32, fp16, bf16 (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--scheduler", default="pndm", help="scheduler for the pipeline runs, or 'all' (default pndm)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per pipeline run (tiny 4, sd15 2)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (tiny 64, sd15 256)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--num-seeds", type=int, default=2, help="seeds per direct network check (default 2)")
    p.add_argument("--modes", default="txt2img,img2img", help="pipeline modes (default txt2img,img2img)")
    p.add_argument("--exact", action="store_true",
                   help="run the scratch networks in exact mode (NCHW, diffusers' kernels: bit-identical) "
                        "instead of the default fast mode; rows say which in the net_mode column")
    p.add_argument("--tolerances", default=None, help="a tolerance TOML file replacing parity/tolerances.toml")
    p.add_argument("--out", default=None, help="run folder (default reports/check-<time>)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- options
@dataclass
class Options:
    preset: str
    model: str | None
    components: list[str]
    dtypes: list[str]
    device: str
    schedulers: list[str]
    steps: int
    size: int
    seed: int
    num_seeds: int
    modes: list[str]
    table: Table
    out: Path
    plots: bool
    quiet: bool
    exact: bool = False


def _csv(value: str, allowed, what: str) -> list[str]:
    from parity.cli import UsageError

    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"--{what} is empty")
    bad = [v for v in items if v not in allowed]
    if bad:
        raise UsageError(f"unknown {what.rstrip('s')} {bad[0]!r}; known: {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def parse_options(args) -> Options:
    from parity.cli import UsageError
    from scratch_sd.config import PRESETS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"--model path does not exist: {args.model}")
    components = list(DEFAULT_COMPONENTS) if args.components == "all" else \
        _csv(args.components, COMPONENTS, "components")
    dtypes = _csv(args.dtypes, tuple(DTYPES), "dtypes")
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {args.device!r}; known: cpu, cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this torch build")
    from scratch_sd.schedulers import SCHEDULERS

    if args.scheduler == "all":
        schedulers = list(PIPELINE_SCHEDULERS)
    else:
        if args.scheduler not in SCHEDULERS:
            raise UsageError(f"unknown scheduler {args.scheduler!r}; known: {', '.join(SCHEDULERS)}, all")
        if args.scheduler not in PIPELINE_SCHEDULERS:
            raise UsageError(f"scheduler {args.scheduler!r} does not drive StableDiffusionPipeline; "
                             f"use one of {', '.join(PIPELINE_SCHEDULERS)}")
        schedulers = [args.scheduler]
    big = args.preset != "tiny" or args.model is not None
    steps = args.steps if args.steps is not None else (2 if big else 4)
    size = args.size if args.size is not None else (256 if big else 64)
    if steps < 1:
        raise UsageError(f"--steps must be >= 1 (got {steps})")
    if size < 8 or size % 8:
        raise UsageError(f"--size must be a positive multiple of 8 (got {size})")
    if args.num_seeds < 1:
        raise UsageError(f"--num-seeds must be >= 1 (got {args.num_seeds})")
    modes = _csv(args.modes, ("txt2img", "img2img"), "modes")
    from parity.trace import STRENGTH

    if "img2img" in modes and int(steps * STRENGTH) < 1:
        raise UsageError(f"--steps {steps} leaves img2img (strength {STRENGTH}) no denoising step; "
                         "use --steps >= 2 or --modes txt2img")
    table = Table.load(args.tolerances)
    out = Path(args.out) if args.out else Path("reports") / time.strftime("check-%Y%m%d-%H%M%S")
    return Options(args.preset, args.model, components, dtypes, args.device, schedulers, steps, size, args.seed,
                   args.num_seeds, modes, table, out, not args.no_plots, args.quiet, getattr(args, "exact", False))


# --------------------------------------------------------------------------- rows
@dataclass
class Recorder:
    run_id: str
    preset: str
    device: str
    table: Table
    net_mode: str = "fast"  # the scratch networks' mode (layers.ExactOrFast): fast (default) or exact
    rows: list[dict] = field(default_factory=list)
    images: dict = field(default_factory=dict)  # (dtype, mode) -> {label: image tensor}

    def compare(self, component: str, dtype: str, tensor: str, ref, out, truth=None, *, mode="direct",
                case="", step=None, scheduler="") -> dict:
        tol = self.table.lookup(component, tensor, dtype)
        v = judge(ref, out, tol, dtype, truth)
        e = v.errors
        row = dict(run_id=self.run_id, preset=self.preset, component=component, dtype=dtype, device=self.device,
                   scheduler=scheduler, step="" if step is None else step, tensor=tensor,
                   shape="x".join(map(str, out.shape)), max_abs=e.max_abs, mean_abs=e.mean_abs, rel_l2=e.rel_l2,
                   cosine_distance=e.cosine_distance, psnr_db=e.psnr_db,
                   atol=_blank(tol.atol if dtype == "fp32" else None),
                   rtol=_blank(tol.rtol if dtype == "fp32" else None),
                   min_psnr_db=_blank(tol.min_psnr_db if dtype == "fp32" else None), passed=v.passed, mode=mode,
                   case=case, max_rel_l2=_blank(tol.max_rel_l2 if dtype == "fp32" else None),
                   scratch_rel_l2_vs_fp32=_blank(v.err_scratch_vs_fp32),
                   diffusers_rel_l2_vs_fp32=_blank(v.err_reference_vs_fp32), error_ratio=_blank(v.error_ratio),
                   max_error_ratio=_blank(tol.max_error_ratio if dtype != "fp32" else None), status="compared",
                   reason=v.reason, net_mode=self.net_mode)
        self.rows.append(row)
        return row

    def skip(self, component: str, dtype: str, reason: str, mode="", scheduler="") -> None:
        row = {c: "" for c in COLUMNS}
        row.update(run_id=self.run_id, preset=self.preset, component=component, dtype=dtype, device=self.device,
                   scheduler=scheduler, mode=mode, passed=True, status="skipped", reason=reason,
                   net_mode=self.net_mode)
        self.rows.append(row)


def _blank(x):
    return "" if x is None else x


def _progress(opts: Options, msg: str) -> None:
    if not opts.quiet:
        print(f"[check] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- 1. direct network checks
def _cast(module, dtype: str, device: str):
    return copy.deepcopy(module).to(device=device, dtype=DTYPES[dtype]).eval()


@torch.no_grad()
def _network_outputs(name: str, ref, ours, cfg, seed: int, dtype: str, device: str, tokenizer):
    """Yield (tensor kind, case, reference output, scratch output) for one seed."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    if name == "text_encoder":
        prompts = ["a photo of an astronaut riding a horse on mars", ""]
        ids = tokenizer(prompts, padding="max_length", max_length=cfg.text.max_positions, truncation=True,
                        return_tensors="pt").input_ids
        rand = torch.randint(0, cfg.text.vocab_size, (2, cfg.text.max_positions), generator=g)
        ids = torch.cat([ids, rand]).to(device)
        yield "text_embeddings", f"seed={seed}", ref(ids)[0], ours(ids)
    elif name == "vae":
        size = min(cfg.image_size, 128) if cfg.name == "sd15" else cfg.image_size
        x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dt)
        rd, od = ref.encode(x).latent_dist, ours.encode(x)
        yield "posterior_mean", f"seed={seed}", rd.mean, od.mean
        yield "posterior_logvar", f"seed={seed}", rd.logvar, od.logvar
        yield "latent_sample", f"seed={seed}", rd.sample(torch.Generator().manual_seed(seed)), \
            od.sample(generator=torch.Generator().manual_seed(seed))
        lat = size // cfg.vae.downsample_factor
        z = torch.randn(1, cfg.vae.latent_channels, lat, lat, generator=g).to(device, dt) / cfg.vae.scaling_factor
        yield "image", f"seed={seed},decode", ref.decode(z).sample, ours.decode(z)
    elif name == "unet":
        lat = min(cfg.latent_size, 16)
        x = torch.randn(2, cfg.unet.in_channels, lat, lat, generator=g).to(device, dt)
        ctx = torch.randn(2, cfg.text.max_positions, cfg.unet.cross_attention_dim, generator=g).to(device, dt)
        for t in UNET_TIMESTEPS:
            yield "noise_pred", f"seed={seed},t={t}", ref(x, t, encoder_hidden_states=ctx).sample, ours(x, t, ctx)


def check_networks(rec: Recorder, opts: Options, models, dtype: str, truth_cache: dict) -> None:
    for name in NETWORKS:
        if name not in opts.components or name not in models.pairs:
            continue
        pair = models.pairs[name]
        _progress(opts, f"{name} {dtype}: direct comparison on {opts.num_seeds} seeds")
        ref, ours = _cast(pair.reference, dtype, opts.device), _cast(pair.scratch, dtype, opts.device)
        for s in range(opts.seed, opts.seed + opts.num_seeds):
            outs = list(_network_outputs(name, ref, ours, models.cfg, s, dtype, opts.device, models.tokenizer))
            if dtype == "fp32":
                truth_cache[(name, s)] = [o[2].float().cpu() for o in outs]
            truths = truth_cache.get((name, s))
            for i, (kind, case, r, o) in enumerate(outs):
                rec.compare(name, dtype, kind, r, o, None if dtype == "fp32" else truths[i], case=case)
        del ref, ours


# --------------------------------------------------------------------------- 2. schedulers
def check_schedulers(rec: Recorder, opts: Options, dtype: str) -> None:
    if dtype != "fp32":
        rec.skip("scheduler", dtype, "scheduler arithmetic is fp32 in both libraries (latents are cast by the "
                 "pipeline); its low-precision effect is measured by the pipeline swap rows")
        return
    from parity.scheduler_check import run_scheduler_checks

    names = "all" if len(opts.schedulers) > 1 else opts.schedulers
    _progress(opts, f"schedulers {names}: timesteps, sigmas, sampling loops vs diffusers")
    for r in run_scheduler_checks(names):
        row = {c: "" for c in COLUMNS}
        row.update({k: ("" if v is None else v) for k, v in r.items() if k in COLUMNS})
        note = r.get("note", "")
        row.update(run_id=rec.run_id, preset=rec.preset, dtype="fp32", device="cpu", mode="loop",
                   status="skipped" if note.startswith("skipped") else "compared", passed=bool(r["passed"]),
                   reason=note)
        if not row["passed"] and not note:
            row["reason"] = f"max_abs {r['max_abs']:.3g} > atol {r['atol']}"
        rec.rows.append(row)


# --------------------------------------------------------------------------- 3. swap matrix
def _schedulers_for(name: str, models):
    import diffusers
    from scratch_sd.schedulers import DIFFUSERS_CLASS_NAMES, get_scheduler

    ref = getattr(diffusers, DIFFUSERS_CLASS_NAMES[name]).from_config(models.scheduler_config)
    ours = get_scheduler(name, dict(ref.config))
    return ref, ours


def _pipeline_parts(models, dtype: str, device: str, swap: set[str]) -> dict:
    from parity.adapters import adapt

    parts = {"tokenizer": models.tokenizer}
    for name in NETWORKS:
        pair = models.pairs[name]
        module = adapt(name, pair.scratch, pair.reference) if name in swap else pair.reference
        parts[name] = _cast(module, dtype, device)
    return parts


def _baseline(models, opts: Options, sched: str, mode: str, dtype: str, cache: dict, swap=frozenset()):
    """A traced diffusers pipeline run (with `swap` components replaced by scratch), cached."""
    from parity.trace import run_pipeline

    key = ("pipeline", sched, mode, dtype, frozenset(swap))
    if key not in cache:
        what = "baseline" if not swap else "swap " + ",".join(sorted(swap))
        _progress(opts, f"{what} {dtype} {mode} [{sched}]")
        parts = _pipeline_parts(models, dtype, opts.device, set(swap))
        ref_s, our_s = _schedulers_for(sched, models)
        cache[key] = run_pipeline(parts, our_s if "scheduler" in swap else ref_s, mode, opts.seed, opts.steps,
                                  opts.size, device=opts.device)
    return cache[key]


SWAP_SETS = {"text_encoder": {"text_encoder"}, "vae": {"vae"}, "unet": {"unet"}, "scheduler": {"scheduler"},
             "all_swapped": {"text_encoder", "vae", "unet", "scheduler"}}


def check_swaps(rec: Recorder, opts: Options, models, dtype: str, cache: dict) -> None:
    swaps = [c for c in ("text_encoder", "vae", "unet", "scheduler") if c in opts.components]
    if "pipeline" in opts.components:
        swaps.append("all_swapped")
    for sched in opts.schedulers:
        for mode in opts.modes:
            truth = _baseline(models, opts, sched, mode, "fp32", cache)
            base = _baseline(models, opts, sched, mode, dtype, cache)
            rec.images.setdefault((dtype, mode, sched), {})["diffusers"] = base.image
            for comp in swaps:
                out = _baseline(models, opts, sched, mode, dtype, {}, frozenset(SWAP_SETS[comp]))
                rec.images[(dtype, mode, sched)][comp] = out.image
                for (kind, step, r), (_, _, o), (_, _, t) in zip(base.tensors(), out.tensors(), truth.tensors()):
                    rec.compare(comp, dtype, kind, r, o, None if dtype == "fp32" else t, mode=mode,
                                case=f"seed={opts.seed}", step=step, scheduler=sched)


# --------------------------------------------------------------------------- 4. scratch pipeline
def check_scratch_pipeline(rec: Recorder, opts: Options, models, dtype: str, cache: dict) -> None:
    if "pipeline" not in opts.components:
        return
    from parity.pipeline_check import compare_pipelines

    for sched in opts.schedulers:
        for mode in opts.modes:
            truth = _baseline(models, opts, sched, mode, "fp32", cache)
            base = _baseline(models, opts, sched, mode, dtype, cache)
            _progress(opts, f"scratch pipeline {dtype} {mode} [{sched}]")
            for kind, step, ref, out, t in compare_pipelines(models, sched, mode, dtype, opts, base, truth):
                rec.compare("pipeline", dtype, kind, ref, out, None if dtype == "fp32" else t, mode=mode,
                            case=f"seed={opts.seed}", step=step, scheduler=sched)


# --------------------------------------------------------------------------- 5. training step
def check_training(rec: Recorder, opts: Options, dtype: str) -> None:
    """Training-step parity (issue 9): loss, every gradient, AdamW state and parameters after 3
    steps with accumulation and clipping; on the tiny preset's UNet (training sd15 here is not a CPU case)."""
    if "train" not in opts.components:
        return
    from parity.train_check import run_train_checks

    _progress(opts, f"training step {dtype}: scratch vs diffusers UNet")
    for r in run_train_checks(dtype, preset="tiny", seed=opts.seed, table=opts.table, exact=opts.exact):
        row = {c: "" for c in COLUMNS}
        row.update({k: v for k, v in r.items() if k in COLUMNS})
        row.update(run_id=rec.run_id, preset="tiny", net_mode=rec.net_mode)
        rec.rows.append(row)


# --------------------------------------------------------------------------- main
def cpu_cannot(dtype: str, opts: Options, preset_name: str) -> str | None:
    if opts.device == "cpu" and dtype == "fp16" and preset_name != "tiny":
        return ("fp16 at sd15 size is a GPU case: this CPU runs fp16 matmuls at ~1-2 GFLOP/s "
                "(a UNet step ~55x slower than fp32); run it with --device cuda")
    return None


def run(args) -> int:
    from parity import report
    from parity.models import build_models, quiet_libraries

    opts = parse_options(args)
    t0 = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S")
    quiet_libraries()
    models = None
    if set(opts.components) - {"train"}:  # the swap matrix needs all three networks, whatever is swapped
        _progress(opts, f"building {opts.model or opts.preset} ({', '.join(NETWORKS)})")
        models = build_models(opts.preset, opts.model, NETWORKS, seed=opts.seed)
        for pair in models.pairs.values():
            if hasattr(pair.scratch, "set_exact"):
                pair.scratch.set_exact(opts.exact)
    preset_name = models.cfg.name if models else opts.preset
    net_mode = "exact" if opts.exact else "fast"
    rec = Recorder(run_id, preset_name if not opts.model else f"model:{Path(opts.model).name}", opts.device,
                   opts.table, net_mode)
    cache: dict = {}  # fp32 truths and traced pipeline runs, shared by the sections below
    if models and any(d != "fp32" for d in opts.dtypes) and "fp32" not in opts.dtypes:
        # low precision is judged against fp32: compute the networks' fp32 outputs first, unjudged
        check_networks(Recorder(run_id, rec.preset, opts.device, opts.table, net_mode), opts, models, "fp32", cache)
    for dtype in sorted(opts.dtypes, key=list(DTYPES).index):  # fp32 first: it is the truth
        reason = cpu_cannot(dtype, opts, preset_name)
        if reason:
            for c in opts.components:
                rec.skip(c, dtype, reason)
            continue
        if models:
            check_networks(rec, opts, models, dtype, cache)
        if "scheduler" in opts.components:
            check_schedulers(rec, opts, dtype)
        if models:
            check_swaps(rec, opts, models, dtype, cache)
            check_scratch_pipeline(rec, opts, models, dtype, cache)
        check_training(rec, opts, dtype)
    paths = report.write_check(rec, opts, time.time() - t0)
    failed = [r for r in rec.rows if r["status"] == "compared" and not r["passed"]]
    compared = sum(r["status"] == "compared" for r in rec.rows)
    for r in failed[:50]:
        print(report.failure_line(r), file=sys.stderr)
    if len(failed) > 50:
        print(f"... and {len(failed) - 50} more failing rows in {paths['csv']}", file=sys.stderr)
    for comp in sorted({r["component"] for r in failed} & set(NETWORKS)):
        for dt in sorted({r["dtype"] for r in failed if r["component"] == comp}):
            print(f"  localise it: sdparity localize --component {comp} --dtype {dt} --preset {opts.preset}",
                  file=sys.stderr)
    verdict = "FAIL" if failed else "PASS"
    print(f"{verdict}: {compared - len(failed)}/{compared} comparisons within tolerance "
          f"({sum(r['status'] == 'skipped' for r in rec.rows)} skipped) in {time.time() - t0:.1f} s; "
          f"report: {paths['summary']}")
    return 1 if failed else 0
