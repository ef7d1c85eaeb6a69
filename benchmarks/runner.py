"""`sdparity bench`: every component, each implementation against diffusers in the same run, into
bench.csv, summary.md and plots.

    settings = BenchSettings.make(preset="tiny", impls="scratch,diffusers")   # benchmarks.settings
    run(settings, progress=print)                                             # -> exit code

One run: measure this device's matmul peak per dtype; build every implementation on the same
weights (scratch, its accelerated wrappers, and any candidate of parity.candidates); for each case
(component x dtype x batch x resolution) time the implementations interleaved (warm-up rounds,
then A B A B ... per repeat) and count its FLOPs on meta copies; then measure peak memory (CPU:
one subprocess per implementation; CUDA: the allocator's peak); then write the reports. Cases
this device cannot run in reasonable time (fp16 at sd15 size on a CPU without fp16 arithmetic) or
at all (CUDA without a GPU) become rows with status "skipped" and the reason, never silent gaps.
"""
from __future__ import annotations

import datetime as dt
import gc
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks import cases as C
from benchmarks.settings import BenchSettings, plan_cases


class Progress:
    """`[bench  12.3s] msg` lines through `say`, timed from construction."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.say, self.t0 = say, time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.say is not None:
            self.say(f"[bench {time.perf_counter() - self.t0:6.1f}s] {msg}")


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
def run(s: BenchSettings, progress: Callable[[str], None] | None = None, force: bool = False) -> int:
    """Run the benchmark; 1 when a case failed, else 0. The reports appear in s.out (default
    reports/bench-RUN_ID) only when complete; `force` replaces an existing folder."""
    threads_before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        return _run(s, Progress(progress), force)
    finally:
        torch.set_num_threads(threads_before)  # leave the caller's process as it was


def _run(s: BenchSettings, say: Progress, force: bool) -> int:
    started, t0 = _now(), time.perf_counter()
    import diffusers

    run_id = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{s.preset if s.model is None else 'model'}-{s.device}"
    out = Path(s.out or Path("reports") / f"bench-{run_id}")
    common = dict(run_id=run_id, device=s.device, device_name=_device_name(s.device), torch_version=torch.__version__,
                  diffusers_version=diffusers.__version__, threads=torch.get_num_threads(), git_sha=_git_sha(),
                  preset=s.preset if s.model is None else f"model:{s.model}", steps=s.steps, scheduler=s.scheduler)
    meta = dict(common, impls=s.impls, started=started, load_start=_load(), warmup=s.warmup, repeats=s.repeats,
                sweep_warmup=s.sweep_warmup, sweep_repeats=s.sweep_repeats, pipeline_warmup=s.pipeline_warmup,
                pipeline_repeats=s.pipeline_repeats, min_time_s=s.min_time_s, guidance=C.GUIDANCE_SCALE,
                matmul_peak={}, mem_method="", mem_note="")
    cases = plan_cases(s)
    say(f"{len(cases)} cases x {len(s.impls)} impls on {s.device} ({common['device_name']}), "
        f"{common['threads']} threads -> {out}")
    if s.device == "cuda" and not torch.cuda.is_available():
        reason = "CUDA is not available on this machine (torch.cuda.is_available() is False)"
        rows = [_row(common, s, c, i, status="skipped", reason=reason) for c in cases for i in s.impls]
        meta["mem_note"] = meta["mem_method"] = "none (nothing ran)"
    else:
        rows = _run_cases(s, cases, common, meta, say)
    meta.update(elapsed_s=time.perf_counter() - t0, load_end=_load())
    from benchmarks import report
    from parity.outputs import writing_dir

    with writing_dir(out, force) as tmp:
        report.write_csv(rows, tmp / "bench.csv")
        report.write_summary(rows, meta, tmp / "summary.md")
        report.write_plots(rows, tmp)
    errors = [r for r in rows if r["status"] == "error"]
    say(f"done in {meta['elapsed_s']:.0f} s: {sum(r['status'] == 'ok' for r in rows)} ok, "
        f"{sum(r['status'] == 'skipped' for r in rows)} skipped, {len(errors)} failed -> {out}")
    return 1 if errors else 0


def _row(common: dict, s: BenchSettings, case: C.Case, impl: str, **values) -> dict:
    warmup, repeats = _settings(s, case)
    row = dict(common, component=case.component, impl=impl, dtype=case.dtype, batch_size=case.batch_size,
               images=case.images, resolution="" if case.component == "text_encoder" else case.resolution,
               sweeps=";".join(case.sweeps), warmup=warmup, repeats=repeats,
               per="step" if case.component == "scheduler_step" else "call", timestamp=_now(),
               load_avg_1m=_load(), _case=case)
    row.update(values)
    return row


def _settings(s: BenchSettings, case: C.Case) -> tuple[int, int]:
    """(warmup, repeats) of a case: pipeline, main, or sweep-only settings."""
    if case.component == "pipeline":
        return s.pipeline_warmup, s.pipeline_repeats
    if "main" in case.sweeps:
        return s.warmup, s.repeats
    return s.sweep_warmup, s.sweep_repeats


def _run_cases(s: BenchSettings, cases: list[C.Case], common: dict, meta: dict, say: Progress) -> list[dict]:
    from benchmarks.flops import measure_matmul_peak
    from benchmarks.memory_phase import MemoryPhase
    from benchmarks.timing import clock_for
    from benchmarks.workload import Workload
    from parity.references import build_references, quiet_libraries

    quiet_libraries()
    clock = clock_for(s.device)
    networks = sorted({n for c in s.components for n in C.NETWORKS_OF[c]})
    memory = MemoryPhase(s, networks, meta, say)
    try:
        if memory.preload:  # tiny: the children import and build while we do; they idle while we time
            memory.start_all()
        t = time.perf_counter()
        refs = build_references(s.preset, s.model, tuple(networks), seed=s.seed)
        work = Workload(refs, s.impls, s.device, s.scheduler, s.steps, clock, dtypes=s.dtypes)
        say(f"built {', '.join(networks) or 'no networks'} ({', '.join(s.impls)}) in {time.perf_counter() - t:.1f} s")
        memory.wait_ready()
        for dtype in sorted({"fp32", *s.dtypes}, key=C.DTYPE_ORDER.index):  # fp32: the yardstick of the others
            meta["matmul_peak"][dtype] = measure_matmul_peak(C.DTYPES[dtype], s.device, clock)
            say(f"matmul peak {dtype}: {meta['matmul_peak'][dtype]['peak_gflops']:.4g} GFLOP/s")
        rows: list[dict] = []
        for i, case in enumerate(sorted(cases, key=lambda c: C.DTYPE_ORDER.index(c.dtype))):
            if work.dtype != case.dtype:
                work.to(case.dtype)
            rows += _run_case(s, work, case, common, meta, clock, f"{i + 1}/{len(cases)}", say)
        del work, refs
        gc.collect()
        memory.measure(rows)
    finally:
        memory.stop()
    return rows


def _run_case(s: BenchSettings, work, case: C.Case, common: dict, meta: dict, clock, counter: str,
              say: Progress) -> list[dict]:
    """Time one case for every impl, interleaved; one row per impl."""
    from benchmarks import memory
    from benchmarks.timing import interleaved, summarize
    from benchmarks.workload import unsupported

    warmup, repeats = _settings(s, case)
    peak = meta["matmul_peak"][case.dtype]["peak_gflops"]
    rows, calls, gflops = {}, {}, {}
    for impl in s.impls:
        base = dict(matmul_peak_gflops=peak, clock=clock.name)
        why = unsupported(case, impl, s.device, work.candidates.get(impl))
        if why is None:
            try:
                gflops[impl] = work.gflop(case, impl)
            except Exception as exc:  # noqa: BLE001 - counting is best effort; timing still runs
                gflops[impl] = None
                say(f"  flop count failed for {impl} {case.label()}: {type(exc).__name__}: {exc}")
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
            say(f"[{counter}] {case.label()}: failed: {_one_line(exc)}")
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
        say(f"[{counter}] {case.label()}: " + ", ".join(
            f"{i} {rows[i]['median_ms']:.4g} ms" for i in calls if "median_ms" in rows[i]) +
            "".join(f", {i}/diffusers {r['ratio_vs_diffusers']:.3f}" for i, r in rows.items()
                    if i != "diffusers" and r.get("ratio_vs_diffusers")) + f" ({time.perf_counter() - start:.1f} s)")
    else:
        say(f"[{counter}] {case.label()}: skipped")
    for row in rows.values():
        row.pop("_ms", None)
    return list(rows.values())


def _first_calls(calls: dict, clock) -> dict[str, float]:
    """The first (cold) call of each impl, untimed by the statistics: the first warm-up round."""
    with torch.inference_mode():
        return {impl: clock.time_ms(call.fn) for impl, call in calls.items()}


def _too_slow(s: BenchSettings, case: C.Case, gflop: float | None, peaks: dict) -> str | None:
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


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join((str(exc) or "").split())[:300]
