"""Work per case (FLOPs) and this device's measured matmul peak.

FLOPs come from torch's `FlopCounterMode` run on META copies of the modules (same structure,
no data, no compute), so counting an sd15 UNet step costs about a second instead of a real
forward. Attention is counted under `sdpa_kernel(SDPBackend.MATH)`: the counter has no
formula for the CPU flash kernel and would silently drop attention (design.md).
The counter counts matmuls and convolutions (a multiply-add = 2 FLOPs); elementwise ops,
norms and softmax are not counted, as in every published FLOP figure for these models.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def meta_clone(module: nn.Module) -> nn.Module:
    """A structural copy of `module` whose parameters and buffers live on the meta device."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def count_gflop(fn: Callable[[], object]) -> float:
    """GFLOP of one call of `fn` (attention through the math kernel so that it is counted)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 1e9


def _square_matmul_gflops(n: int, dtype: torch.dtype, device: str, clock, repeats: int) -> tuple[float, float]:
    """(best GFLOP/s, best seconds) of an n x n x n matmul."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up (kernel selection, page faults)
    best = min(clock.time_ms(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e3
    return 2 * n**3 / best / 1e9, best


def measure_matmul_peak(dtype: torch.dtype, device: str, clock, budget_s: float = 1.0,
                        max_n: int | None = None) -> dict[str, float]:
    """This device's achievable matmul rate for `dtype`: square matmuls of growing size (256, 512,
    ...) until one call takes over `budget_s`/10 or the size reaches `max_n` (2048 on the CPU,
    8192 on CUDA); the best rate seen, over 3 timed calls per size, is the peak."""
    max_n = max_n or (8192 if str(device).startswith("cuda") else 2048)
    best_rate, n, best_n = 0.0, 256, 256
    while n <= max_n:
        rate, seconds = _square_matmul_gflops(n, dtype, device, clock, repeats=3)
        if rate > best_rate:
            best_rate, best_n = rate, n
        if seconds > budget_s / 10:
            break
        n *= 2
    return {"peak_gflops": best_rate, "peak_n": best_n}
