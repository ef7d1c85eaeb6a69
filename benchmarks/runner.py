"""`sdparity bench`: every component, scratch vs diffusers in the same run, into bench.csv,
summary.md and plots.

    sdparity bench --preset tiny --out /tmp/bench            # under a minute
    sdparity bench --preset sd15 --device cpu --dtypes fp32,bf16

One run: measure this device's matmul peak per dtype; build both implementations on the same
weights; for each case (component x dtype x batch x resolution) time the implementations
interleaved (warm-up rounds, then A B A B ... per repeat) and count its FLOPs on meta copies;
then measure peak memory (CPU: one subprocess per implementation; CUDA: the allocator's peak);
then write the reports. Cases this device cannot run in reasonable time (fp16 at sd15 size on a
CPU without fp16 arithmetic) or at all (CUDA without a GPU) become rows with status "skipped"
and the reason, never silent gaps.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import cases as C

PRESET_DEFAULTS = {
    # tiny: whole run under a minute, every component and sweep exercised.
    "tiny": dict(warmup=1, repeats=5, sweep_warmup=1, sweep_repeats=3, pipeline_warmup=1, pipeline_repeats=5,
                 steps=4, resolutions="32,64,128", batch_sizes="1,2,4", batch_resolution=64, memory_scope="main",
                 memory_warmup=1, memory_components=",".join(C.COMPONENTS), min_time_s=0.2),
    # sd15: ~20 minutes on 2 CPU cores in fp32 + bf16 (README, "Measured here": 1168 s).
    # The pipeline's stages run at the main cases' shapes, which warmed them up already.
    "sd15": dict(warmup=1, repeats=3, sweep_warmup=0, sweep_repeats=2, pipeline_warmup=0, pipeline_repeats=2,
                 steps=2, resolutions="256,384,512", batch_sizes="1,2,4", batch_resolution=256, memory_scope="main",
                 memory_warmup=0, memory_components="text_encoder,unet,vae_decode,vae_encode,scheduler_step",
                 min_time_s=5.0),  # the text encoder (~0.15 s a call) then gets ~15 rounds, not 3
}
DTYPE_ORDER = list(C.DTYPES)  # fp32, bf16, fp16: the in-place conversions stay exact in this order


_T0 = time.perf_counter()


def _progress(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- arguments
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time and measure every component, scratch vs diffusers",
                              description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESET_DEFAULTS), default="tiny")
    p.add_argument("--model", default=None, help="a local diffusers folder or single file (sizes as sd15)")
    p.add_argument("--components", default=",".join(C.COMPONENTS), help=f"comma list of {', '.join(C.COMPONENTS)}")
    p.add_argument("--impls", default="scratch,diffusers", help=f"comma list of {', '.join(C.IMPLS)}")
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--resolution", type=int, default=None, help="pixels per side of the main cases (preset's size)")
    p.add_argument("--images", type=int, default=1, help="images per call in the main cases (CFG doubles unet/text)")
    p.add_argument("--resolutions", default=None, help="resolution sweep, pixels per side (comma list)")
    p.add_argument("--batch-sizes", default=None, help="batch sweep, images per call (comma list)")
    p.add_argument("--batch-resolution", type=int, default=None, help="resolution of the batch sweep")
    p.add_argument("--sweep-components", default="unet", help="components the sweeps run on (comma list)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--min-time-s", type=float, default=None,
                   help="more rounds than --repeats (up to 1000, timing.MAX_REPEATS) until a case's timed "
                        "calls add up to this many seconds (tiny 0.2, sd15 5; 0: exactly --repeats)")
    p.add_argument("--sweep-warmup", type=int, default=None)
    p.add_argument("--sweep-repeats", type=int, default=None)
    p.add_argument("--pipeline-warmup", type=int, default=None)
    p.add_argument("--pipeline-repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps of pipeline and scheduler_step")
    p.add_argument("--scheduler", default="ddim", help="scheduler of pipeline and scheduler_step")
    p.add_argument("--memory", choices=("subprocess", "none"), default="subprocess",
                   help="CPU peak memory: one subprocess per impl (see --help text of benchmarks.memory), or none")
    p.add_argument("--memory-warmup", type=int, default=None, help="calls of a case before its memory is measured")
    p.add_argument("--memory-components", default=None, help="components whose memory is measured (comma list)")
    p.add_argument("--memory-scope", choices=("main", "all"), default=None, help="cases whose memory is measured")
    p.add_argument("--max-call-s", type=float, default=30.0,
                   help="for a dtype without fast arithmetic here (matmul peak < 1/10 of the best dtype's, e.g. fp16 "
                        "on a CPU): skip a case whose estimated time per call (GFLOP / that peak) exceeds this")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default reports/bench-RUN_ID)")
    p.set_defaults(func=run)
    return p


def _usage(msg: str):
    from parity.cli import UsageError

    return UsageError(msg)


def _names(text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise _usage(f"--{what} is empty")
    bad = [n for n in names if n not in known]
    if bad:
        raise _usage(f"unknown {what.rstrip('s')} {bad[0]!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(names))


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise _usage(f"--{what} must be a comma list of integers, got {text!r}") from None
    if not values:
        raise _usage(f"--{what} is empty")
    return values


def _check_resolution(r: int, what: str) -> int:
    if r <= 0 or r % 8:
        raise _usage(f"{what} {r} is not a positive multiple of 8")
    return r


def _check_positive(v: int, what: str, zero_ok: bool = False) -> int:
    if v < 0 or (v == 0 and not zero_ok):
        raise _usage(f"{what} must be {'>= 0' if zero_ok else '>= 1'}, got {v}")
    return v


def resolve(args) -> argparse.Namespace:
    """Validated settings (preset defaults filled in); UsageError (exit 2) on bad input."""
    from scratch_sd.config import preset

    d = PRESET_DEFAULTS["sd15" if args.model is not None else args.preset]  # a local model: SD 1.x sizes
    s = argparse.Namespace(**vars(args))
    s.components = _names(args.components, C.COMPONENTS, "components")
    s.impls = _names(args.impls, C.IMPLS, "impls")
    s.dtypes = sorted(_names(args.dtypes, list(C.DTYPES), "dtypes"), key=DTYPE_ORDER.index)
    s.sweep_components = _names(args.sweep_components, C.COMPONENTS, "sweep-components")
    s.cfg = preset(args.preset) if args.model is None else None
    default_res = s.cfg.image_size if s.cfg is not None else 512
    s.resolution = _check_resolution(default_res if args.resolution is None else args.resolution, "--resolution")
    s.resolutions = [_check_resolution(r, "--resolutions value") for r in _ints(args.resolutions or d["resolutions"], "resolutions")]
    s.batch_sizes = [_check_positive(b, "--batch-sizes value") for b in _ints(args.batch_sizes or d["batch_sizes"], "batch-sizes")]
    s.batch_resolution = _check_resolution(d["batch_resolution"] if args.batch_resolution is None
                                           else args.batch_resolution, "--batch-resolution")
    s.images = _check_positive(args.images, "--images")
    for name in ("warmup", "repeats", "sweep_warmup", "sweep_repeats", "pipeline_warmup", "pipeline_repeats", "steps",
                 "memory_warmup"):
        value = getattr(args, name)
        setattr(s, name, d[name] if value is None else value)
        _check_positive(getattr(s, name), f"--{name.replace('_', '-')}", zero_ok=name.endswith("warmup"))
    s.min_time_s = d["min_time_s"] if args.min_time_s is None else args.min_time_s
    if not s.min_time_s >= 0 or s.min_time_s == float("inf"):
        raise _usage(f"--min-time-s must be a finite number >= 0, got {args.min_time_s}")
    s.memory_scope = args.memory_scope or d["memory_scope"]
    s.memory_components = _names(args.memory_components or d["memory_components"], C.COMPONENTS, "memory-components")
    if args.threads is not None:
        _check_positive(args.threads, "--threads")
    if args.scheduler not in _pipeline_schedulers():
        raise _usage(f"unknown scheduler {args.scheduler!r}; known: {', '.join(_pipeline_schedulers())}")
    if args.model is not None and not Path(args.model).exists():
        raise FileNotFoundError(2, "No such model", args.model)
    return s


def _pipeline_schedulers():
    from scratch_sd.pipeline import PIPELINE_SCHEDULERS

    return PIPELINE_SCHEDULERS


def plan_cases(s) -> list[C.Case]:
    """Main cases (every component at the main size) plus the sweeps, one Case per distinct size."""
    cases: dict[tuple, C.Case] = {}

    def add(component, dtype, images, res, tag):
        res = 0 if component == "text_encoder" else res  # no image size: one case per batch
        case = C.Case(component, dtype, images, res, (tag,))
        if case.key in cases:
            old = cases[case.key]
            case = C.Case(component, dtype, images, res, tuple(dict.fromkeys(old.sweeps + (tag,))))
        cases[case.key] = case

    for dtype in s.dtypes:
        for comp in s.components:
            add(comp, dtype, s.images, s.resolution, "main")
        for comp in (c for c in s.sweep_components if c in s.components):
            if comp == "text_encoder":
                continue  # no resolution; its batch sweep below still applies
            for res in s.resolutions:
                add(comp, dtype, s.images, res, "resolution")
        for comp in (c for c in s.sweep_components if c in s.components):
            for b in s.batch_sizes:
                add(comp, dtype, b, s.batch_resolution, "batch")
    return list(cases.values())


# --------------------------------------------------------------------------- environment
def _git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "uncommitted") + ("-dirty" if dirty else "")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (no CUDA device)"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the run
def run(args) -> int:
    s = resolve(args)
    threads_before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run(s)
    finally:
        torch.set_num_threads(threads_before)  # leave the caller's process as it was


def _run(s) -> int:
    global _T0
    started, t0 = _now(), time.perf_counter()
    _T0 = t0
    import diffusers

    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{s.preset if s.model is None else 'model'}-{s.device}"
    out = Path(s.out or Path("reports") / f"bench-{run_id}")
    out.mkdir(parents=True, exist_ok=True)
    common = dict(run_id=run_id, device=s.device, device_name=_device_name(s.device), torch_version=torch.__version__,
                  diffusers_version=diffusers.__version__, threads=torch.get_num_threads(), git_sha=_git_sha(),
                  preset=s.preset if s.model is None else f"model:{s.model}", steps=s.steps, scheduler=s.scheduler)
    meta = dict(common, impls=s.impls, started=started, load_start=_load(), warmup=s.warmup, repeats=s.repeats,
                sweep_warmup=s.sweep_warmup, sweep_repeats=s.sweep_repeats, pipeline_warmup=s.pipeline_warmup,
                pipeline_repeats=s.pipeline_repeats, min_time_s=s.min_time_s, guidance=C.GUIDANCE_SCALE,
                matmul_peak={}, mem_method="", mem_note="")
    cases = plan_cases(s)
    _progress(f"{len(cases)} cases x {len(s.impls)} impls on {s.device} ({common['device_name']}), "
              f"{common['threads']} threads -> {out}")
    if s.device == "cuda" and not torch.cuda.is_available():
        reason = "CUDA is not available on this machine (torch.cuda.is_available() is False)"
        rows = [_row(common, s, c, i, status="skipped", reason=reason) for c in cases for i in s.impls]
        meta["mem_note"] = meta["mem_method"] = "none (nothing ran)"
    else:
        rows = _run_cases(s, cases, common, meta, out)
    meta.update(elapsed_s=time.perf_counter() - t0, load_end=_load())
    from benchmarks import report

    report.write_csv(rows, out / "bench.csv")
    report.write_summary(rows, meta, out / "summary.md")
    report.write_plots(rows, out)
    errors = [r for r in rows if r["status"] == "error"]
    _progress(f"done in {meta['elapsed_s']:.0f} s: {sum(r['status'] == 'ok' for r in rows)} ok, "
              f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {len(errors)} failed -> {out}")
    return 1 if errors else 0


def _row(common: dict, s, case: C.Case, impl: str, **values) -> dict:
    warmup, repeats = _settings(s, case)
    row = dict(common, component=case.component, impl=impl, dtype=case.dtype, batch_size=case.batch_size,
               images=case.images, resolution="" if case.component == "text_encoder" else case.resolution,
               sweeps=";".join(case.sweeps), warmup=warmup, repeats=repeats,
               per="step" if case.component == "scheduler_step" else "call", timestamp=_now(),
               load_avg_1m=_load(), _case=case)
    row.update(values)
    return row


def _settings(s, case: C.Case) -> tuple[int, int]:
    """(warmup, repeats) of a case: pipeline, main, or sweep-only settings."""
    if case.component == "pipeline":
        return s.pipeline_warmup, s.pipeline_repeats
    if "main" in case.sweeps:
        return s.warmup, s.repeats
    return s.sweep_warmup, s.sweep_repeats


def _run_cases(s, cases: list[C.Case], common: dict, meta: dict, out: Path) -> list[dict]:
    from benchmarks.flops import measure_matmul_peak
    from benchmarks.timing import clock_for
    from benchmarks.workload import Workload
    from parity.models import build_models, quiet_libraries

    quiet_libraries()
    clock = clock_for(s.device)
    networks = sorted({n for c in s.components for n in C.NETWORKS_OF[c]})
    memory = MemoryPhase(s, networks, meta)
    try:
        if memory.preload:  # tiny: the children import and build while we do; they idle while we time
            memory.start_all()
        t = time.perf_counter()
        models = build_models(s.preset, s.model, components=tuple(networks), seed=s.seed)
        _progress(f"built {', '.join(networks) or 'no networks'} (both impls) in {time.perf_counter() - t:.1f} s")
        memory.wait_ready()
        for dtype in sorted({"fp32", *s.dtypes}, key=DTYPE_ORDER.index):  # fp32: the yardstick of the others
            meta["matmul_peak"][dtype] = measure_matmul_peak(C.DTYPES[dtype], s.device, clock)
            _progress(f"matmul peak {dtype}: {meta['matmul_peak'][dtype]['peak_gflops']:.4g} GFLOP/s")
        work = Workload(models, s.device, s.scheduler, s.steps, clock)
        rows: list[dict] = []
        for i, case in enumerate(sorted(cases, key=lambda c: DTYPE_ORDER.index(c.dtype))):
            if work.dtype != case.dtype:
                work.to(case.dtype)
            rows += _run_case(s, work, case, common, meta, clock, f"{i + 1}/{len(cases)}")
        del work, models
        gc.collect()
        memory.measure(rows)
    finally:
        memory.stop()
    return rows


def _run_case(s, work, case: C.Case, common: dict, meta: dict, clock, counter: str) -> list[dict]:
    """Time one case for every impl, interleaved; one row per impl."""
    from benchmarks import memory
    from benchmarks.timing import interleaved, summarize
    from benchmarks.workload import unsupported

    warmup, repeats = _settings(s, case)
    peak = meta["matmul_peak"][case.dtype]["peak_gflops"]
    rows, calls, gflops = {}, {}, {}
    for impl in s.impls:
        base = dict(matmul_peak_gflops=peak, clock=clock.name)
        why = unsupported(case, impl, s.device)
        if why is None:
            try:
                gflops[impl] = work.gflop(case, impl)
            except Exception as exc:  # noqa: BLE001 - counting is best effort; timing still runs
                gflops[impl] = None
                _progress(f"  flop count failed for {impl} {case.label()}: {type(exc).__name__}: {exc}")
            why = _too_slow(s, case, gflops[impl], meta["matmul_peak"])
        if why is not None:
            rows[impl] = _row(common, s, case, impl, status="skipped", reason=why, gflop=gflops.get(impl), **base)
            continue
        try:
            calls[impl] = work.call(case, impl)
        except Exception as exc:  # noqa: BLE001 - recorded in the row
            rows[impl] = _row(common, s, case, impl, status="error", reason=_one_line(exc), **base)
            continue
        rows[impl] = _row(common, s, case, impl, status="ok", gflop=gflops[impl],
                          weights_mb=work.weights_mb(case, impl) if case.component != "scheduler_step" else None,
                          **base)
    if calls:
        start = time.perf_counter()
        try:
            first = _first_calls(calls, clock) if warmup or any(i in calls for i in C.ACCELERATED) else {}
            with torch.inference_mode():
                times = interleaved({i: c.fn for i, c in calls.items()}, max(warmup - 1, 0), repeats, clock,
                                    min_total_ms=s.min_time_s * 1e3)
        except Exception as exc:  # noqa: BLE001 - one failing case must not end the run
            for impl in calls:
                rows[impl].update(status="error", reason=_one_line(exc))
            _progress(f"[{counter}] {case.label()}: failed: {_one_line(exc)}")
            return list(rows.values())
        for impl, call in calls.items():
            ms = [t / call.units for t in times[impl]]
            row = rows[impl]
            row.update(summarize(ms), repeats=len(ms), min_ms=min(ms), max_ms=max(ms),
                       first_call_ms=first.get(impl, 0) / call.units if impl in first else None)
            if row.get("gflop"):
                row["achieved_gflops"] = row["gflop"] / (row["median_ms"] / 1e3)
                row["peak_fraction"] = row["achieved_gflops"] / peak
            if call.stage_timers:
                row["stages"] = _stage_summary(call, times[impl], len(ms))
            if s.device == "cuda" and impl == "scratch_cudagraph":
                row.update(mem_method="not measured: a replay allocates only its output copy; the graph's "
                                      "memory pool, allocated at capture, is already resident before the call")
            elif s.device == "cuda":
                with torch.inference_mode():
                    row.update(peak_mem_mb=memory.cuda_peak_mb(call.fn), mem_method=memory.METHOD_CUDA)
            row["_ms"] = ms
        _add_ratios(rows)
        _progress(f"[{counter}] {case.label()}: " + ", ".join(
            f"{i} {rows[i]['median_ms']:.4g} ms" for i in calls if "median_ms" in rows[i]) +
            (f", ratio {rows['scratch']['ratio_vs_diffusers']:.3f}" if rows.get("scratch", {}).get("ratio_vs_diffusers") else "")
            + f" ({time.perf_counter() - start:.1f} s)")
    else:
        _progress(f"[{counter}] {case.label()}: skipped")
    for row in rows.values():
        row.pop("_ms", None)
    return list(rows.values())


def _first_calls(calls: dict, clock) -> dict[str, float]:
    """The first (cold) call of each impl, untimed by the statistics: the first warm-up round."""
    with torch.inference_mode():
        return {impl: clock.time_ms(call.fn) for impl, call in calls.items()}


def _too_slow(s, case: C.Case, gflop: float | None, peaks: dict) -> str | None:
    """Why a case is skipped as too slow, or None. Only a dtype this device has no fast arithmetic
    for -- its measured matmul peak under 1/10 of the best dtype's (fp16 on this CPU) -- is
    skipped, and only when the call's estimated time (gflop / that peak) exceeds --max-call-s."""
    peak = peaks[case.dtype]["peak_gflops"]
    best_dtype = max(peaks, key=lambda d: peaks[d]["peak_gflops"])
    best = peaks[best_dtype]["peak_gflops"]
    if not gflop or peak <= 0 or peak * 10 >= best:
        return None
    est = gflop / peak
    if est <= s.max_call_s:
        return None
    return (f"no fast {case.dtype} arithmetic on this device (measured {case.dtype} matmul peak {peak:.3g} GFLOP/s, "
            f"1/{best / peak:.0f} of {best_dtype}'s): estimated {est:,.0f} s per call ({gflop:,.0f} GFLOP) "
            f"exceeds --max-call-s {s.max_call_s:g}; a GPU case")


def _add_ratios(rows: dict) -> None:
    """ratio_vs_diffusers: median over repeats of impl[r] / diffusers[r] (pairs from the same round)."""
    from benchmarks.timing import paired_ratio

    ref = rows.get("diffusers")
    if ref is None or "_ms" not in ref:
        return
    for impl, row in rows.items():
        if "_ms" not in row:
            continue
        row["ratio_vs_diffusers"] = paired_ratio(row["_ms"], ref["_ms"])
        pairs = sorted(a / b for a, b in zip(row["_ms"], ref["_ms"]))
        row["ratio_p10"], row["ratio_p90"] = (float(v) for v in np.percentile(pairs, [10, 90]))


def _stage_summary(call, times: list[float], repeats: int) -> str:
    """'text_encoder=..;unet xN=..;vae_decode=..;other=..' in ms, medians over the timed repeats."""
    import statistics

    timed = call.stage_timers[-repeats:]
    totals = [t.totals() for t in timed]
    parts, per_repeat_sum = [], [0.0] * len(totals)
    for stage in ("text_encoder", "unet", "vae_decode"):
        values = [tot.get(stage, (0.0, 0))[0] for tot in totals]
        n = totals[0].get(stage, (0.0, 0))[1] if totals else 0
        name = f"unet x{n}" if stage == "unet" else stage
        parts.append(f"{name}={statistics.median(values):.4g}")
        per_repeat_sum = [a + b for a, b in zip(per_repeat_sum, values)]
    other = [t - s for t, s in zip(times, per_repeat_sum)]
    parts.append(f"other (scheduler, tokenizer, glue)={statistics.median(other):.4g}")
    return ";".join(parts)


class MemoryPhase:
    """Peak memory of the cases that ran (see benchmarks/memory.py for the method).

    CPU: one child process per impl. For the tiny preset the children start at once, so that their
    imports and model builds overlap ours, and wait idle (blocked on a pipe) until the timing is
    over; for bigger models they start after the timing, once this process has freed its models,
    side by side if the cores allow it, else one after the other. CUDA: measured in process by
    `_run_case`, nothing to do here.
    """

    def __init__(self, s, networks: list[str], meta: dict):
        from benchmarks import memory

        self.s, self.meta, self.workers = s, meta, {}
        self.enabled = s.device == "cpu" and s.memory == "subprocess"
        self.preload = self.enabled and s.model is None and s.preset == "tiny"
        impls = [i for i in s.impls if i not in C.ACCELERATED]  # CPU memory: the eager networks' working set
        self.specs = [dict(preset=s.preset, model=s.model, seed=s.seed, impl=i, networks=networks,
                           scheduler=s.scheduler, steps=s.steps, threads=torch.get_num_threads(),
                           warmup=s.memory_warmup) for i in impls]
        if s.device == "cuda":
            meta["mem_method"] = memory.METHOD_CUDA
            meta["mem_note"] = ("CUDA allocator peak (max_memory_allocated after reset_peak_memory_stats) above the "
                                "memory allocated before the call, one extra call after the timing")
        elif not self.enabled:
            meta["mem_method"] = meta["mem_note"] = "none (--memory none)"
        else:
            meta["mem_method"] = memory.METHOD_CPU
            meta["mem_note"] = ("one subprocess per impl: VmHWM (reset via /proc/self/clear_refs just before the "
                                "call) minus VmRSS before the call, glibc mmap threshold 64 KiB in that process, "
                                f"{s.memory_warmup} warm-up call(s) then one measured call per case "
                                f"(benchmarks/memory.py); cases measured: {s.memory_scope} cases of "
                                f"{', '.join(s.memory_components)}")

    def start_all(self) -> None:
        from benchmarks.memory import MemoryWorker

        for spec in self.specs:
            self.workers[spec["impl"]] = MemoryWorker(spec)

    def wait_ready(self) -> None:
        for w in self.workers.values():
            w.wait_ready()

    def measure(self, rows: list[dict]) -> None:
        from benchmarks import memory

        if not self.enabled:
            for r in rows:
                r.setdefault("mem_method", "none" if self.s.device == "cpu" else memory.METHOD_CUDA)
            return
        todo = {}
        for spec in self.specs:
            mine = [r for r in rows if r["impl"] == spec["impl"] and r["status"] == "ok"
                    and r["component"] in self.s.memory_components
                    and (self.s.memory_scope == "all" or "main" in r["sweeps"].split(";"))]
            if mine:
                todo[spec["impl"]] = (spec, mine)
        for r in rows:
            r.setdefault("mem_method", "not measured (--memory-scope / --memory-components)")
        if not todo:
            return
        t = time.perf_counter()
        _progress(f"memory: one subprocess per impl ({', '.join(todo)}), {sum(len(m) for _, m in todo.values())} cases")
        parallel = self.preload or len(todo) * torch.get_num_threads() <= (os.cpu_count() or 1)
        results = {}
        for batch in ([list(todo)] if parallel else [[i] for i in todo]):
            for impl in batch:
                if impl not in self.workers:
                    self.workers[impl] = memory.MemoryWorker(todo[impl][0])
            for impl in batch:
                results[impl] = self.workers[impl].wait_ready()
            for impl in batch:
                results[impl] = results[impl] or self.workers[impl].measure([_case_dict(r) for r in todo[impl][1]])
        for impl, (_, mine) in todo.items():
            peaks = results[impl]
            if isinstance(peaks, str):
                _progress(f"memory: {peaks}")
                for r in mine:
                    r["mem_method"] = f"failed: {peaks}"
                continue
            for r in mine:
                if r["_case"].key in peaks:
                    r.update(peak_mem_mb=peaks[r["_case"].key], mem_method=memory.METHOD_CPU)
        _progress(f"memory: done in {time.perf_counter() - t:.1f} s")

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()


def _case_dict(row: dict) -> dict:
    c = row["_case"]
    return dict(component=c.component, dtype=c.dtype, images=c.images, resolution=c.resolution)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join((str(exc) or "").split())[:300]
