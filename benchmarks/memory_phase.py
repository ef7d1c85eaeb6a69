"""The memory phase of a bench run: peak memory of the cases that ran (the method is in
benchmarks/memory.py)."""
from __future__ import annotations

import os
import time

import torch

from benchmarks import cases as C
from scratch_sd.config import TINY_PRESETS


class MemoryPhase:
    """Peak memory of the cases that ran (see benchmarks/memory.py for the method).

    CPU: one child process per impl. For the tiny preset the children start at once, so that their
    imports and model builds overlap ours, and wait idle (blocked on a pipe) until the timing is
    over; for bigger models they start after the timing, once this process has freed its models,
    side by side if the cores allow it, else one after the other. CUDA: measured in process by
    `runner._run_case`, nothing to do here.
    """

    def __init__(self, s, networks: list[str], meta: dict, say):
        from benchmarks import memory

        self.s, self.meta, self.say, self.workers = s, meta, say, {}
        self.enabled = s.device == "cpu" and s.memory == "subprocess"
        self.preload = self.enabled and s.model is None and s.preset in TINY_PRESETS
        impls = [i for i in s.impls if i not in C.ACCELERATED]  # CPU memory: the eager networks' working set
        self.specs = [dict(preset=s.preset, model=s.model, seed=s.seed, impl=i, networks=networks,
                           scheduler=s.scheduler, steps=s.steps, dtypes=list(s.dtypes), threads=torch.get_num_threads(),
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
        self.say(f"memory: one subprocess per impl ({', '.join(todo)}), {sum(len(m) for _, m in todo.values())} cases")
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
                self.say(f"memory: {peaks}")
                for r in mine:
                    r["mem_method"] = f"failed: {peaks}"
                continue
            for r in mine:
                if r["_case"].key in peaks:
                    r.update(peak_mem_mb=peaks[r["_case"].key], mem_method=memory.METHOD_CPU)
        self.say(f"memory: done in {time.perf_counter() - t:.1f} s")

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()


def _case_dict(row: dict) -> dict:
    c = row["_case"]
    return dict(component=c.component, dtype=c.dtype, images=c.images, resolution=c.resolution)
