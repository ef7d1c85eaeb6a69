"""The low-precision statistic (issue 21, docs/lowp.md): a pooled RMS error ratio with a bootstrap bound.

The per-row rule (parity.tolerances.judge) asks, tensor by tensor and seed by seed, that the
candidate@dtype is at most 1.5x as far from diffusers@fp32 as diffusers@dtype is. One tensor at one
seed is a noisy sample of that ratio, so a precision-handling bug that moves it by ~1.3x passes or
fails by the seed. This module pools instead: for every (candidate, component, dtype, tensor kind)
it sums the squared errors against fp32 over ALL elements of ALL rows of the direct network checks
(every input seed, and the UNet's timesteps: the rows the bars were calibrated on; the gate's
Recorder pools nothing else), candidate and reference, and judges

    rms_ratio = sqrt(sum (cand@dtype - ref@fp32)^2 / sum (ref@dtype - ref@fp32)^2)

by its one-sided upper confidence bound: the rows are resampled with replacement (a bootstrap over
the compared tensors, `resamples` draws from a fixed generator) and the `confidence` quantile of
the resampled ratios must be <= max_rms_ratio ([lowp] in tolerances.toml). Each group becomes one
parity.csv row: tensor "<kind>:rms_ratio", mode "stat", error_ratio = the bound that is judged,
max_error_ratio = the bar, candidate/reference_rel_l2_vs_fp32 = the pooled relative RMS errors,
case = the point estimate and how many tensors were pooled.

Only candidates judged by the exact bars are pooled (a lossy profile has its own rule); fp32 rows
and non-finite tensors (which fail their own row) are never pooled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

SUFFIX = ":rms_ratio"
MODE = "stat"


@dataclass(frozen=True)
class LowpBars:
    max_rms_ratio: float  # the bar on the upper bound
    confidence: float = 0.95  # the bound is this quantile of the bootstrap distribution
    resamples: int = 2000  # bootstrap draws (a vectorised matmul: milliseconds)
    min_tensors: int = 2  # fewer pooled tensors give no bound: the row is skipped, saying so


def bars(table, component: str, tensor: str, dtype: str) -> LowpBars | None:
    """[lowp.<component>.<tensor>.<dtype>], [lowp.<component>.<dtype>], [lowp.<tensor>.<dtype>],
    [lowp.<dtype>]: the first that sets a key wins; None when the file has no [lowp] for `dtype`."""
    merged: dict = {}
    for keys in ((component, tensor, dtype), (component, dtype), (tensor, dtype), (dtype,)):
        node = table.data.get("lowp", {})
        for k in keys:
            node = node.get(k, {}) if isinstance(node, dict) else {}
        for k, v in node.items():
            if not isinstance(v, dict):
                merged.setdefault(k, v)
    if "max_rms_ratio" not in merged:
        return None
    return LowpBars(float(merged["max_rms_ratio"]), float(merged.get("confidence", 0.95)),
                    int(merged.get("resamples", 2000)), int(merged.get("min_tensors", 2)))


def squared_errors(out: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """(sum (out - truth)^2, sum (ref - truth)^2, sum truth^2), in float64."""
    t = truth.detach().to("cpu", torch.float64)
    o = out.detach().to("cpu", torch.float64)
    r = ref.detach().to("cpu", torch.float64)
    return float(((o - t) ** 2).sum()), float(((r - t) ** 2).sum()), float((t ** 2).sum())


def bootstrap_bound(cand_sq: np.ndarray, ref_sq: np.ndarray, b: LowpBars, seed: int = 0) -> tuple[float, float]:
    """(point rms ratio, its upper `confidence` bound) over rows resampled with replacement."""
    point = float(np.sqrt(cand_sq.sum() / ref_sq.sum()))
    rng = np.random.default_rng(seed)  # fixed: the same rows give the same bound
    counts = rng.multinomial(len(cand_sq), np.full(len(cand_sq), 1.0 / len(cand_sq)), size=b.resamples)
    num, den = counts @ cand_sq, counts @ ref_sq
    ratios = np.sqrt(num / np.where(den > 0, den, np.nan))
    ratios = ratios[np.isfinite(ratios)]
    return point, float(np.quantile(ratios, b.confidence)) if len(ratios) else np.inf


@dataclass
class Pool:
    """Squared errors of every low-precision exact-profile row, grouped for the statistic."""

    groups: dict = field(default_factory=dict)  # (candidate, component, dtype, tensor) -> [(c, r, t), ...]
    identities: dict = field(default_factory=dict)  # the same key -> the Gated candidate

    def add(self, cand, component: str, dtype: str, tensor: str, ref, out, truth) -> None:
        if dtype == "fp32" or truth is None or not (torch.isfinite(out).all() and torch.isfinite(ref).all()):
            return
        key = (cand.name, component, dtype, tensor)
        self.groups.setdefault(key, []).append(squared_errors(out, ref, truth))
        self.identities[key] = cand

    def rows(self, rec, dtype: str) -> list:
        """The statistic's rows for `dtype` (appended to the recorder's rows), then forgets them."""
        from parity.rows import Row

        out = []
        for key in [k for k in self.groups if k[2] == dtype]:
            name, component, _, tensor = key
            sq = np.array(self.groups.pop(key), dtype=np.float64)
            cand = self.identities.pop(key)
            b = bars(rec.table, component, tensor, dtype)
            ident = rec._identity(cand, component, dtype, tensor=tensor + SUFFIX, mode=MODE, shape=f"{len(sq)} tensors")
            if b is None:
                out.append(Row(**ident, status="skipped", passed=True, reason=f"{rec.table.source} has no [lowp.{dtype}]"))
                continue
            if len(sq) < b.min_tensors or sq[:, 1].sum() == 0:
                why = (f"{len(sq)} tensor(s) pooled, fewer than {b.min_tensors}" if len(sq) < b.min_tensors
                       else "the reference is exact at this dtype")
                out.append(Row(**ident, status="skipped", passed=True, reason=f"rms_ratio: {why}"))
                continue
            point, bound = bootstrap_bound(sq[:, 0], sq[:, 1], b)
            passed = bound <= b.max_rms_ratio
            reason = "" if passed else (f"rms_ratio {point:.3g} (upper {b.confidence:.0%} bound {bound:.3g} over "
                                        f"{len(sq)} tensors) > {b.max_rms_ratio:g}: the candidate is consistently "
                                        "less accurate than diffusers at this precision")
            out.append(Row(**ident, status="compared", passed=passed, reason=reason, error_ratio=bound,
                           max_error_ratio=b.max_rms_ratio, case=f"rms_ratio={point:.4g} tensors={len(sq)}",
                           candidate_rel_l2_vs_fp32=float(np.sqrt(sq[:, 0].sum() / sq[:, 2].sum())),
                           reference_rel_l2_vs_fp32=float(np.sqrt(sq[:, 1].sum() / sq[:, 2].sum()))))
        return out
