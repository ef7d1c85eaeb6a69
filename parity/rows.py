"""One parity.csv row: the one definition of its columns (reports/README.md explains each).

The first block is the contract other tools read (design.md: never renamed); the rest are added
columns. `Row.from_dict` takes the plain dicts the scheduler, training and tokenizer checks make.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, fields

Number = float | int | str  # "" where a value does not apply


@dataclass
class Row:
    # --- the contract (design.md)
    run_id: str = ""
    preset: str = ""
    component: str = ""  # what was swapped / checked: text_encoder, vae, unet, scheduler, all_swapped, pipeline, ...
    dtype: str = ""
    device: str = ""
    scheduler: str = ""
    step: Number = ""  # empty when not per step
    tensor: str = ""  # text_embeddings, noise_pred, latents, image, ...
    shape: str = ""
    max_abs: Number = ""
    mean_abs: Number = ""
    rel_l2: Number = ""
    cosine_distance: Number = ""
    psnr_db: Number = ""
    atol: Number = ""
    rtol: Number = ""
    min_psnr_db: Number = ""
    passed: bool = True
    # --- added columns
    mode: str = ""  # direct, txt2img, img2img, loop, train
    case: str = ""  # seed=..., t=..., the scheduler variant, ...
    max_rel_l2: Number = ""
    candidate_rel_l2_vs_fp32: Number = ""  # low precision: the candidate@dtype against the reference@fp32
    reference_rel_l2_vs_fp32: Number = ""  # ... and the reference@dtype against the reference@fp32
    error_ratio: Number = ""  # the first over the second
    max_error_ratio: Number = ""
    max_cosine_distance: Number = ""  # lossy profiles (tolerances.toml [profiles.*])
    status: str = "compared"  # compared | skipped
    reason: str = ""  # why it failed or was skipped
    net_mode: str = ""  # scratch networks: fast | exact; empty for other candidates
    candidate: str = ""  # which implementation was gated (scratch, scratch-exact, onnxruntime, ...)
    profile: str = ""  # the tolerance profile that judged the row (exact, int8, ...)
    reference: str = "live"  # live, or record:<id>
    gating: bool = True  # False: an --informational candidate (reported, never fails the run)
    # error / the bar that judged the row, the largest (binding) of its rules' ratios (`margin` below): <= 1 passes,
    # > 1 fails; "" for skipped rows, rows with no bar and rows whose error was never measured. Derived: computed
    # when the row is made (Verdict.fields gives it where the rule needs the tensors: allclose, the ratio floor).
    margin: Number = ""

    def __post_init__(self):
        if self.margin == "":
            self.margin = margin(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        names = {f.name for f in fields(cls)}
        return cls(**{k: ("" if v is None else v) for k, v in d.items() if k in names})

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def compared(self) -> bool:
        return self.status == "compared"

    @property
    def failed(self) -> bool:
        return self.compared and not self.passed


COLUMNS = [f.name for f in fields(Row)]

# ----------------------------------------------------------------------------------------------- margin
# One ratio per rule the gate applies; a row's margin is the largest that applies (the binding rule).
# Every ratio is error / bar, so > 1 is exactly "this rule fails":
#   allclose   fp32, exact profile: max over elements of |cand - ref| / (atol + rtol |ref|) (judge passes it in,
#              it needs the tensors); from a row alone max_abs / atol (exact when rtol is 0, as for the scheduler
#              and tokenizer rows; otherwise an upper bound)
#   psnr       10 ** ((min_psnr_db - psnr_db) / 20): the rmse over the rmse the PSNR bar allows (same peak),
#              > 1 iff psnr_db < min_psnr_db; 0 for identical tensors (psnr inf)
#   rel_l2     rel_l2 / max_rel_l2
#   cosine     cosine_distance / max_cosine_distance (lossy profiles)
#   error_ratio  fp16/bf16, exact profile: candidate_rel_l2_vs_fp32 / (max_error_ratio x reference_rel_l2_vs_fp32
#              + ratio_floor), the rule judge applies (judge passes the floor in); from a row alone (the pooled
#              rms_ratio rows) error_ratio / max_error_ratio
# A bar of 0 (timesteps, sigmas, token ids: bit-equality) gives 0 when the error is 0 and inf otherwise. A row
# whose comparison met non-finite values (metrics nan) has margin inf. Exceptions, judged by rules no number in
# the row carries: scheduler rows where both libraries give the same non-finite elements pass (margin inf), and
# scheduler rows whose dtypes differ fail (margin from the values alone); see reports/README.md.
MARGIN_TERMS = ("allclose", "psnr", "rel_l2", "cosine", "error_ratio")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _ratio(err, bar) -> float:
    if math.isnan(err):
        return math.inf
    if bar == 0:
        return 0.0 if err == 0 else math.inf
    return max(0.0, err / bar)


def margin_terms(row, allclose_ratio: float | None = None, ratio_floor: float | None = None) -> dict[str, float]:
    """Each applicable rule's error / bar for a Row or a row dict (see above); {} when none applies."""
    get = row.get if isinstance(row, dict) else (lambda k, d="": getattr(row, k, d))
    if get("status", "compared") != "compared":
        return {}
    v = {k: get(k, "") for k in ("max_abs", "rel_l2", "cosine_distance", "psnr_db", "atol", "rtol", "min_psnr_db",
                                  "max_rel_l2", "max_cosine_distance", "error_ratio", "max_error_ratio",
                                  "candidate_rel_l2_vs_fp32", "reference_rel_l2_vs_fp32")}
    v = {k: (x if _num(x) else None) for k, x in v.items()}
    terms: dict[str, float] = {}
    if v["atol"] is not None and v["max_abs"] is not None:
        terms["allclose"] = max(0.0, allclose_ratio) if allclose_ratio is not None else _ratio(v["max_abs"], v["atol"])
    if v["min_psnr_db"] is not None and v["psnr_db"] is not None:
        p = v["psnr_db"]
        terms["psnr"] = (math.inf if math.isnan(p) else 0.0 if p == math.inf
                         else 10.0 ** min(300.0, (v["min_psnr_db"] - p) / 20.0))
    for name, err, bar in (("rel_l2", "rel_l2", "max_rel_l2"), ("cosine", "cosine_distance", "max_cosine_distance")):
        if v[bar] is not None and v[err] is not None:
            terms[name] = _ratio(v[err], v[bar])
    if v["max_error_ratio"] is not None:
        ours, theirs = v["candidate_rel_l2_vs_fp32"], v["reference_rel_l2_vs_fp32"]
        if ratio_floor is not None and ours is not None and theirs is not None:
            terms["error_ratio"] = _ratio(ours, v["max_error_ratio"] * theirs + ratio_floor)
        elif v["error_ratio"] is not None:
            terms["error_ratio"] = _ratio(v["error_ratio"], v["max_error_ratio"])
    nonfinite = any(v[k] is not None and math.isnan(v[k]) for k in ("max_abs", "rel_l2"))
    if nonfinite and (terms or v["max_error_ratio"] is not None):
        terms = {k: math.inf for k in terms} or {"error_ratio": math.inf}
    return terms


def margin(row, allclose_ratio: float | None = None, ratio_floor: float | None = None) -> float | str:
    """The row's margin: its largest error / bar (> 1 fails); "" where no bar applies or the row was skipped."""
    terms = margin_terms(row, allclose_ratio, ratio_floor)
    return max(terms.values()) if terms else ""


def binding(row) -> str:
    """The rule that sets a row's margin (its name in MARGIN_TERMS); "" when it has none."""
    if not _num(row.margin):
        return ""
    terms = margin_terms(row)
    for name, t in terms.items():
        if name != "allclose" and (t == row.margin or math.isclose(t, row.margin, rel_tol=1e-5)):
            return name
    return "allclose" if "allclose" in terms else (next(iter(terms)) if terms else "")


def fmt(x) -> str:
    if isinstance(x, bool) or x == "" or x is None:
        return str(x)
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.6g}"
    return str(x)


def to_csv(rows, columns=COLUMNS) -> str:
    """Rows (Row objects or dicts) as CSV text, floats to 6 significant digits."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = r.as_dict() if isinstance(r, Row) else r
        w.writerow({c: fmt(d.get(c, "")) for c in columns})
    return buf.getvalue()
