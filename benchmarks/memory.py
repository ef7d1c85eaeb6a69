"""Peak memory of one call, above what was resident before it.

CUDA (in process): `torch.cuda.reset_peak_memory_stats()`, run, `max_memory_allocated()` minus
`memory_allocated()` before the call: the call's working memory (activations, workspaces), the
weights and inputs excluded. Exact for PyTorch's caching allocator.

CPU (one subprocess per implementation, `python -m benchmarks.memory SPEC_JSON`): the child builds
that implementation's networks alone, waits (idle) until the parent has finished timing and sends
the cases, then for each case: collect garbage, read VmRSS (the
baseline: weights, inputs, interpreter, after `--memory-warmup` untimed calls of the case so that
one-time costs -- library code paged in, oneDNN's per-shape kernel cache -- are not counted), reset
the kernel's high-water mark (write "5" to /proc/self/clear_refs), run the call once, read VmHWM. peak = VmHWM - baseline. The child runs
with glibc's mmap threshold fixed at 64 KiB and trim threshold 0 (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_), so every tensor buffer is its own mapping, returned to the OS when
freed: memory freed by one case is not silently reused by the next, and resident pages track
live tensors. Timing never runs in that process (the fixed threshold slows allocation down).
"""
from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

CLEAR_REFS = "/proc/self/clear_refs"
METHOD_CPU = "subprocess_vmhwm"  # see the module docstring
METHOD_CUDA = "cuda_max_memory_allocated"
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


# --------------------------------------------------------------------------- CUDA
def cuda_peak_mb(fn: Callable[[], object]) -> float:
    """MiB allocated at the peak of one call of `fn`, above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# --------------------------------------------------------------------------- CPU, in the child
def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def hwm_reset_available() -> bool:
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_peak_mb(fn: Callable[[], object]) -> float:
    """MiB resident at the peak of one call of `fn`, above the resident set just before it."""
    gc.collect()
    base = _status_kb("VmRSS")
    with open(CLEAR_REFS, "w") as f:
        f.write("5")  # VmHWM := VmRSS now
    fn()
    return max(_status_kb("VmHWM") - base, 0) / 1024


def _build_side(spec: dict):
    """The Workload of one implementation only. The scratch side converts one network at a time and
    drops its reference, so the child never holds both sides of more than one network; a
    candidate's side keeps the references (its pipeline runs diffusers' with its networks in)."""
    from benchmarks.workload import Workload
    from parity.candidates.scratch import network_from_reference
    from parity.references import build_references

    refs = build_references(spec["preset"], spec.get("model"), tuple(spec["networks"]), seed=spec["seed"])
    impl = spec["impl"]
    scratch = None
    if impl == "scratch":
        scratch = {}
        for name in list(refs.networks):
            scratch[name] = network_from_reference(name, refs.networks[name], refs.cfg)
            del refs.networks[name]
            gc.collect()
    return Workload(refs, (impl,), "cpu", spec["scheduler"], spec["steps"], dtypes=tuple(spec["dtypes"]),
                    scratch=scratch)


PREFIX = "SDPARITY-MEM "  # protocol lines on the child's stdout (anything else there is ignored)


def child_main(spec_json: str) -> int:
    """Build one implementation's networks, say "ready", wait for the case list on stdin, measure."""
    from benchmarks import cases as C
    from parity.references import quiet_libraries

    quiet_libraries()
    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    if not hwm_reset_available():
        raise OSError(f"{CLEAR_REFS} is not writable: cannot reset the peak-RSS mark")
    work = _build_side(spec)
    gc.collect()
    gc.freeze()  # the long-lived objects: the per-case collections below then take microseconds, not 0.5 s
    print(PREFIX + "ready", flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the parent gave up
    todo = [C.Case(**c) for c in json.loads(line)]
    results = []
    for dtype in C.DTYPE_ORDER:  # exact in-place conversions in this order
        mine = [c for c in todo if c.dtype == dtype]
        if not mine:
            continue
        work.to(dtype)
        for case in mine:
            start = time.perf_counter()
            call = work.call(case, spec["impl"])
            with torch.inference_mode():
                for _ in range(spec.get("warmup", 1)):  # lazy init, kernel code paged in, oneDNN caches
                    call.fn()
                peak = measure_peak_mb(call.fn)
            del call
            results.append({"key": list(case.key), "peak_mem_mb": peak})
            print(f"  memory {spec['impl']} {case.label()}: {peak:.1f} MiB ({time.perf_counter() - start:.1f} s)",
                  file=sys.stderr, flush=True)
    print(PREFIX + json.dumps(results), flush=True)
    return 0


# --------------------------------------------------------------------------- CPU, in the parent
class MemoryWorker:
    """The parent's handle on one child: start it (it builds its networks meanwhile), wait until it
    is ready (idle, blocked on stdin), then send the cases and collect the peaks."""

    def __init__(self, spec: dict):
        self.impl = spec["impl"]
        env = {**os.environ, **CHILD_ENV}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.memory", json.dumps(spec)], env=env, cwd=root,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True)

    def _message(self) -> str | None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return line[len(PREFIX):].strip()
        return None

    def wait_ready(self) -> str | None:
        """None when ready, else why not (waits once; later calls repeat the answer)."""
        if not hasattr(self, "_ready"):
            ok = self._message() == "ready"
            self._ready = None if ok else f"memory subprocess for {self.impl} exited with {self.proc.wait()} before it was ready"
        return self._ready

    def measure(self, cases: list[dict]) -> dict[tuple, float] | str:
        """case key -> peak MiB, or the reason it failed."""
        try:
            self.proc.stdin.write(json.dumps(cases) + "\n")
            self.proc.stdin.close()
        except OSError as exc:
            return f"memory subprocess for {self.impl}: {exc}"
        message = self._message()
        rc = self.proc.wait()
        if rc != 0 or message is None:
            return f"memory subprocess for {self.impl} exited with {rc}"
        return {tuple(r["key"]): r["peak_mem_mb"] for r in json.loads(message)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
