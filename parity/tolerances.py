"""The tolerance table (tolerances.toml) and the judgement of one compared tensor."""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from parity.metrics import Errors, compare
from parity.rows import margin
from scratch_sd.names import DTYPES

DEFAULT_FILE = Path(__file__).with_name("tolerances.toml")
FP32_KEYS = ("atol", "rtol", "min_psnr_db", "max_rel_l2")
LOW_KEYS = ("max_error_ratio", "ratio_floor")
PROFILE_KEYS = ("min_psnr_db", "max_cosine_distance", "max_rel_l2")  # a lossy profile's bars
PROFILE_REQUIRED = ("min_psnr_db", "max_cosine_distance")


class ToleranceError(ValueError):
    """The tolerance file is unreadable or incomplete."""


@dataclass(frozen=True)
class Tolerance:
    atol: float | None = None
    rtol: float | None = None
    min_psnr_db: float | None = None
    max_rel_l2: float | None = None
    max_error_ratio: float | None = None
    ratio_floor: float | None = None


class Table:
    def __init__(self, data: dict, source: str):
        self.data, self.source = data, source
        for dtype in DTYPES:
            need = FP32_KEYS if dtype == "fp32" else LOW_KEYS
            have = data.get("default", {}).get(dtype, {})
            missing = [k for k in need if k not in have]
            if missing:
                raise ToleranceError(f"{source}: [default.{dtype}] lacks {', '.join(missing)}")
        for dtype in DTYPES:
            if dtype not in data.get("localize", {}):
                raise ToleranceError(f"{source}: [localize] lacks {dtype}")
        for name, prof in data.get("profiles", {}).items():
            missing = [k for k in PROFILE_REQUIRED if k not in prof.get("default", {})]
            if missing:
                raise ToleranceError(f"{source}: [profiles.{name}.default] lacks {', '.join(missing)}")
            for section, values in prof.items():
                unknown = [k for k in (values if isinstance(values, dict) else {}) if k not in PROFILE_KEYS
                           and not isinstance(values[k], dict)]
                if unknown:
                    raise ToleranceError(f"{source}: [profiles.{name}.{section}] has unknown key {unknown[0]!r} "
                                         f"(known: {', '.join(PROFILE_KEYS)})")

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Table":
        path = Path(path) if path else DEFAULT_FILE
        if not path.is_file():
            raise FileNotFoundError(2, "No such tolerance file", str(path))
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ToleranceError(f"{path}: not valid TOML ({exc})") from None
        return cls(data, str(path))

    def _table(self, *keys: str) -> dict:
        node = self.data
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                return {}
        return {k: v for k, v in node.items() if not isinstance(v, dict)}

    def lookup(self, component: str, tensor: str, dtype: str) -> Tolerance:
        merged: dict = {}
        for keys in ((component, tensor, dtype), (component, dtype), (tensor, dtype), ("default", dtype)):
            for k, v in self._table(*keys).items():
                merged.setdefault(k, float(v))
        return Tolerance(**{k: merged.get(k) for k in Tolerance.__dataclass_fields__})

    @property
    def profiles(self) -> tuple[str, ...]:
        """The lossy profiles: "exact" (the default bars above) is always there besides these."""
        return tuple(self.data.get("profiles", {}))

    def profile_bars(self, profile: str, component: str, tensor: str) -> dict[str, float]:
        """A lossy profile's bars for one tensor: [profiles.P.component.tensor], [profiles.P.component],
        [profiles.P.tensor], [profiles.P.default], the first that sets a key wins."""
        if profile not in self.profiles:
            known = ", ".join(("exact",) + self.profiles)
            raise ToleranceError(f"{self.source}: no tolerance profile {profile!r} (known: {known})")
        merged: dict = {}
        for keys in ((component, tensor), (component,), (tensor,), ("default",)):
            for k, v in self._table("profiles", profile, *keys).items():
                if k in PROFILE_KEYS:
                    merged.setdefault(k, float(v))
        return merged

    def judge_profile(self, profile: str, component: str, tensor: str, ref: torch.Tensor,
                      out: torch.Tensor) -> dict:
        """A lossy candidate's row fields: its output against the reference's at the same dtype,
        judged by the profile's PSNR, cosine-distance and (optional) rel_l2 bars."""
        bars = self.profile_bars(profile, component, tensor)
        e = compare(ref, out)
        reasons = []
        if not e.finite:
            reasons.append("non-finite values (" + ("candidate" if torch.isfinite(ref).all() else "reference") + ")")
        else:
            if e.psnr_db < bars["min_psnr_db"]:
                reasons.append(f"psnr {e.psnr_db:.1f} dB < {bars['min_psnr_db']:g}")
            if e.cosine_distance > bars["max_cosine_distance"]:
                reasons.append(f"cosine distance {e.cosine_distance:.3g} > {bars['max_cosine_distance']:g}")
            if "max_rel_l2" in bars and e.rel_l2 > bars["max_rel_l2"]:
                reasons.append(f"rel_l2 {e.rel_l2:.3g} > {bars['max_rel_l2']:g}")
        return dict(max_abs=e.max_abs, mean_abs=e.mean_abs, rel_l2=e.rel_l2, cosine_distance=e.cosine_distance,
                    psnr_db=e.psnr_db, min_psnr_db=bars["min_psnr_db"], max_rel_l2=_blank(bars.get("max_rel_l2")),
                    max_cosine_distance=bars["max_cosine_distance"], passed=not reasons, reason="; ".join(reasons))

    def localize_threshold(self, dtype: str) -> float:
        return float(self.data["localize"][dtype])

    def localize_max_ratio(self, dtype: str) -> float:
        """bf16/fp16: how many times the reference's own error vs fp32 a layer may reach before localize
        names it ([localize.max_ratio]; a file without it: [default.<dtype>] max_error_ratio). fp32: inf."""
        if dtype == "fp32":
            return math.inf
        given = self.data["localize"].get("max_ratio", {}).get(dtype)
        return float(given if given is not None else self.data["default"][dtype]["max_error_ratio"])


def allclose_excess(ref: torch.Tensor, out: torch.Tensor, atol: float, rtol: float) -> float:
    """max(|out - ref| - (atol + rtol |ref|)): <= 0 means every element is within tolerance."""
    r = ref.detach().to("cpu", torch.float64)
    o = out.detach().to("cpu", torch.float64)
    if r.numel() == 0:
        return -math.inf
    return float(((o - r).abs() - (atol + rtol * r.abs())).max())


def allclose_ratio(ref: torch.Tensor, out: torch.Tensor, atol: float, rtol: float) -> float:
    """max(|out - ref| / (atol + rtol |ref|)): the allclose rule's margin, <= 1 iff allclose_excess <= 0
    (an element with a zero allowance: 0 when equal, inf when not)."""
    r = ref.detach().to("cpu", torch.float64)
    o = out.detach().to("cpu", torch.float64)
    if r.numel() == 0:
        return 0.0
    d = (o - r).abs()
    allowed = atol + rtol * r.abs()
    ratio = torch.where(d == 0, torch.zeros_like(d), d / allowed)  # d / 0 = inf
    return float(ratio.max())


@dataclass
class Verdict:
    errors: Errors  # candidate vs reference at the same dtype
    tol: Tolerance
    passed: bool
    reason: str  # empty when passed
    err_candidate_vs_fp32: float | None = None  # rel_l2, low precision only
    err_reference_vs_fp32: float | None = None
    error_ratio: float | None = None
    allclose_ratio: float | None = None  # fp32: the allclose rule's error / bar (it needs the tensors)

    def fields(self, dtype: str) -> dict:
        """The parity.csv columns of this judgement (parity.rows.Row field names)."""
        e, tol, fp32 = self.errors, self.tol, dtype == "fp32"
        d = dict(max_abs=e.max_abs, mean_abs=e.mean_abs, rel_l2=e.rel_l2, cosine_distance=e.cosine_distance,
                 psnr_db=e.psnr_db, atol=_blank(tol.atol if fp32 else None),
                 rtol=_blank(tol.rtol if fp32 else None), min_psnr_db=_blank(tol.min_psnr_db if fp32 else None),
                 max_rel_l2=_blank(tol.max_rel_l2 if fp32 else None), passed=self.passed, reason=self.reason,
                 candidate_rel_l2_vs_fp32=_blank(self.err_candidate_vs_fp32),
                 reference_rel_l2_vs_fp32=_blank(self.err_reference_vs_fp32), error_ratio=_blank(self.error_ratio),
                 max_error_ratio=_blank(tol.max_error_ratio if not fp32 else None))
        # the margin of the rule as judge applied it: the exact allclose ratio, and the ratio floor (parity.rows)
        d["margin"] = margin(d, allclose_ratio=self.allclose_ratio if fp32 else None,
                             ratio_floor=None if fp32 else tol.ratio_floor)
        return d


def _blank(x):
    return "" if x is None else x


def judge(ref: torch.Tensor, out: torch.Tensor, tol: Tolerance, dtype: str,
          fp32_truth: torch.Tensor | None = None) -> Verdict:
    """Judge candidate output `out` against reference output `ref` (same dtype).

    For fp16/bf16, `fp32_truth` (the reference's fp32 output) is required: the rule is relative
    to the reference's own error at that precision.
    """
    e = compare(ref, out)
    if not e.finite:
        bad = "candidate" if torch.isfinite(ref).all() else ("reference" if torch.isfinite(out).all() else "both")
        return Verdict(e, tol, False, f"non-finite values ({bad})")
    if dtype == "fp32":
        reasons = []
        excess = allclose_excess(ref, out, tol.atol, tol.rtol)
        if excess > 0:
            reasons.append(f"max_abs {e.max_abs:.3g} exceeds atol {tol.atol:g} + rtol {tol.rtol:g}*|ref| by {excess:.3g}")
        if e.psnr_db < tol.min_psnr_db:
            reasons.append(f"psnr {e.psnr_db:.1f} dB < {tol.min_psnr_db:g}")
        if e.rel_l2 > tol.max_rel_l2:
            reasons.append(f"rel_l2 {e.rel_l2:.3g} > {tol.max_rel_l2:g}")
        return Verdict(e, tol, not reasons, "; ".join(reasons),
                       allclose_ratio=allclose_ratio(ref, out, tol.atol, tol.rtol))
    if fp32_truth is None:
        raise ValueError(f"{dtype} comparisons need the fp32 reference output")
    ours = compare(fp32_truth, out.float())
    theirs = compare(fp32_truth, ref.float())
    allowed = tol.max_error_ratio * theirs.rel_l2 + tol.ratio_floor
    ratio = ours.rel_l2 / theirs.rel_l2 if theirs.rel_l2 > 0 else (math.inf if ours.rel_l2 > 0 else 1.0)
    passed = ours.rel_l2 <= allowed
    reason = "" if passed else (f"candidate rel_l2 vs fp32 {ours.rel_l2:.3g} > {tol.max_error_ratio:g} x diffusers' "
                                f"{theirs.rel_l2:.3g} + {tol.ratio_floor:g}")
    return Verdict(e, tol, passed, reason, ours.rel_l2, theirs.rel_l2, ratio)
