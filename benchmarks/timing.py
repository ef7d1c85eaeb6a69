"""Clocks and statistics: wall clock on the CPU, CUDA events on the GPU, impls interleaved.

`interleaved(calls, warmup, repeats, clock)` runs the implementations A B A B ... so that
machine drift (thermal state, a background process, the page cache) hits every impl alike,
and the scratch/diffusers ratio can be taken pair by pair: repeat r of A against repeat r of B.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch


class CpuClock:
    """Wall clock around a call (perf_counter, ns resolution)."""

    name = "wall_clock"

    def time_ms(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - start) / 1e6

    def sync(self) -> None:
        pass

    def stage_timer(self) -> "StageTimer":
        return StageTimer(self)


class CudaClock:
    """CUDA events around a call: synchronize first (nothing queued counts), record, synchronize."""

    name = "cuda_events"

    def time_ms(self, fn: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    def sync(self) -> None:
        torch.cuda.synchronize()

    def stage_timer(self) -> "StageTimer":
        return StageTimer(self)


def clock_for(device: str):
    return CudaClock() if str(device).startswith("cuda") else CpuClock()


class StageTimer:
    """Accumulates time per named stage inside one larger call (text_encoder, unet, vae_decode).

    On the CPU each stage is wall clock between `start` and `stop`; on CUDA it records a pair of
    events per stage call and resolves them after the call (`totals()` synchronizes), so the
    stages add no synchronisation of their own inside the timed call.
    """

    def __init__(self, clock):
        self.cuda = isinstance(clock, CudaClock)
        self.open: dict[str, object] = {}
        self.spans: dict[str, list] = {}

    def start(self, stage: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.open[stage] = event
        else:
            self.open[stage] = time.perf_counter_ns()

    def stop(self, stage: str) -> None:
        began = self.open.pop(stage)
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.setdefault(stage, []).append((began, end))
        else:
            self.spans.setdefault(stage, []).append((time.perf_counter_ns() - began) / 1e6)

    def totals(self) -> dict[str, tuple[float, int]]:
        """stage -> (total ms, number of calls)."""
        if self.cuda:
            torch.cuda.synchronize()
            return {k: (sum(float(a.elapsed_time(b)) for a, b in v), len(v)) for k, v in self.spans.items()}
        return {k: (sum(v), len(v)) for k, v in self.spans.items()}


MAX_REPEATS = 1000  # the rounds a minimum time may add up to (a microsecond call would otherwise spin for long)


def interleaved(calls: dict[str, Callable[[], object]], warmup: int, repeats: int, clock,
                on_repeat: Callable[[int], None] | None = None, min_total_ms: float = 0.0,
                max_repeats: int = MAX_REPEATS) -> dict[str, list[float]]:
    """Time each impl's call `repeats` times, A B A B ..., after `warmup` interleaved untimed rounds.

    With `min_total_ms`, rounds go on past `repeats` until the timed calls add up to at least that
    (at most `max_repeats` rounds): a 100 ms call then gets tens of rounds, where three rounds
    leave its median ratio at the mercy of one noisy round (timeit's and pytest-benchmark's rule).
    Returns impl -> list of ms (index r is repeat r for every impl, so pairs line up).
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    clock.sync()
    times: dict[str, list[float]] = {name: [] for name in calls}
    r, spent = 0, 0.0
    while r < repeats or (spent < min_total_ms and r < max_repeats):
        for name, fn in calls.items():
            times[name].append(clock.time_ms(fn))
            spent += times[name][-1]
        if on_repeat:
            on_repeat(r)
        r += 1
    return times


def summarize(ms: list[float]) -> dict[str, float]:
    """median, p10, p90 (linear interpolation, numpy's default) of a list of times in ms."""
    a = np.asarray(ms, dtype=float)
    return {"median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
            "p90_ms": float(np.percentile(a, 90))}


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """Median over repeats of ours[r] / theirs[r] (both timed in the same round r)."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired ratio needs equal, non-empty lists (got {len(ours)} and {len(theirs)})")
    return float(statistics.median(a / b for a, b in zip(ours, theirs)))


def fit_growth_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): y ~ x^k. None with fewer than 2 distinct x."""
    pts = [(x, y) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len({x for x, _ in pts}) < 2:
        return None
    lx = np.log([x for x, _ in pts])
    ly = np.log([y for _, y in pts])
    slope, _ = np.polyfit(lx, ly, 1)
    return float(slope)
