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
