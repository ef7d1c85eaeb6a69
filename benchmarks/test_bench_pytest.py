"""pytest-benchmark view of the same cases as `sdparity bench`, at the tiny preset.

    pytest benchmarks/ --benchmark-only                         # every component x impl x dtype
    pytest benchmarks/ --benchmark-only -k unet --benchmark-compare

Each case is the call `sdparity bench` times (benchmarks/workload.py), on the same seeded
weights for both implementations; pytest-benchmark groups scratch and diffusers side by side.
The CLI remains the tool for reports (interleaved repeats, paired ratios, memory, FLOPs).
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import cases as C

DTYPES = ("fp32", "bf16")  # fp16 has no CPU arithmetic here: see `sdparity bench` (skipped rows)
IMPLS = ("scratch", "diffusers")


@pytest.fixture(scope="module")
def workload():
    from benchmarks.workload import Workload
    from parity.references import build_references, quiet_libraries

    quiet_libraries()
    work = Workload(build_references("tiny"), IMPLS, "cpu", scheduler="ddim", steps=4, dtypes=DTYPES)
    work.to("fp32")
    return work


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("component", C.CASE_COMPONENTS)
@pytest.mark.parametrize("impl", IMPLS)
def test_component(benchmark, workload, component, dtype, impl):
    if workload.dtype != dtype:
        workload.to(dtype)
    case = C.Case(component, dtype, images=1, resolution=workload.cfg.image_size)
    call = workload.call(case, impl)
    benchmark.group = f"{component} {dtype}"
    benchmark.extra_info.update(impl=impl, batch_size=case.batch_size, resolution=case.resolution,
                                per="step" if component == "scheduler_step" else "call", steps=workload.steps)
    with torch.inference_mode():
        out = benchmark(call.fn)
    if isinstance(out, torch.Tensor):
        assert torch.isfinite(out.float()).all(), f"{impl} {component} {dtype} produced non-finite values"
