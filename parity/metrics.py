"""Error metrics used by the parity gate.

Definitions follow the references named in design.md:
- PSNR as Apple's ml-stable-diffusion: 20*log10((max|ref| + 1e-5) / (rmse + 1e-10)).
- cosine distance as diffusers' tests: 1 - a.b / (|a| |b|).
All metrics are computed in float64 on CPU so that the metric itself adds no error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

import torch


def _pair(ref: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != out.shape:
        raise ValueError(f"shape mismatch: reference {tuple(ref.shape)} vs scratch {tuple(out.shape)}")
    return ref.detach().to("cpu", torch.float64).flatten(), out.detach().to("cpu", torch.float64).flatten()


def max_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = _pair(ref, out)
    return float((r - o).abs().max()) if r.numel() else 0.0


def mean_abs(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = _pair(ref, out)
    return float((r - o).abs().mean()) if r.numel() else 0.0


def rel_l2(ref: torch.Tensor, out: torch.Tensor) -> float:
    """|out - ref|_2 / |ref|_2 (0 when both are zero, inf when only ref is zero)."""
    r, o = _pair(ref, out)
    num = float(torch.linalg.vector_norm(o - r))
    den = float(torch.linalg.vector_norm(r))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def cosine_distance(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = _pair(ref, out)
    nr, no = float(torch.linalg.vector_norm(r)), float(torch.linalg.vector_norm(o))
    if nr == 0.0 and no == 0.0:
        return 0.0
    if nr == 0.0 or no == 0.0:
        return 1.0
    return 1.0 - float(torch.dot(r, o)) / (nr * no)


def psnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    r, o = _pair(ref, out)
    rmse = float(torch.sqrt(torch.mean((r - o) ** 2))) if r.numel() else 0.0
    peak = float(r.abs().max()) if r.numel() else 0.0
    return 20.0 * math.log10((peak + 1e-5) / (rmse + 1e-10))


@dataclass(frozen=True)
class Errors:
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine_distance: float
    psnr_db: float
    finite: bool  # both tensors free of inf/NaN

    def as_dict(self) -> dict:
        return asdict(self)


def compare(ref: torch.Tensor, out: torch.Tensor) -> Errors:
    """All metrics at once. Non-finite values make every metric nan and finite=False."""
    finite = bool(torch.isfinite(ref).all()) and bool(torch.isfinite(out).all())
    if not finite:
        nan = math.nan
        _pair(ref, out)  # still check the shapes
        return Errors(nan, nan, nan, nan, nan, False)
    return Errors(
        max_abs=max_abs(ref, out),
        mean_abs=mean_abs(ref, out),
        rel_l2=rel_l2(ref, out),
        cosine_distance=cosine_distance(ref, out),
        psnr_db=psnr_db(ref, out),
        finite=True,
    )
