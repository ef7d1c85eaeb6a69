"""The pooled low-precision statistic (parity/lowp.py, issue 21): its formula, its bound, its rows."""
import math
from dataclasses import dataclass

import pytest
import torch

from parity.gate import Recorder
from parity.lowp import MODE, SUFFIX, LowpBars, Pool, bars, bootstrap_bound
from parity.tolerances import Table


@dataclass
class _Cand:  # the parts of parity.gate.Gated the recorder reads
    name: str = "scratch"
    profile: str = "exact"
    net_mode: str = ""
    gating: bool = True


def _tensors(seed: int, cand_scale: float, n: int = 4):
    """(ref@dtype, cand@dtype, truth@fp32) triples: the reference's error has std 1e-2, the
    candidate's is `cand_scale` times as large (independent draws)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        truth = torch.randn(2, 64, generator=g)
        ref = truth + 1e-2 * torch.randn(2, 64, generator=g)
        cand = truth + cand_scale * 1e-2 * torch.randn(2, 64, generator=g)
        out.append((ref, cand, truth))
    return out


def _record(triples, dtype="bf16", table=None):
    rec = Recorder("t", "tiny", "cpu", table or Table.load(), lowp=Pool())
    for ref, cand, truth in triples:
        rec.compare(_Cand(), "unet", dtype, "noise_pred", ref, cand, truth, case="x")
    return rec, rec.lowp.rows(rec, dtype)


def _independent_ratio(triples) -> float:
    """The statistic by its definition, written out here (not parity.lowp's code)."""
    num = sum(float(((c.double() - t.double()) ** 2).sum()) for _, c, t in triples)
    den = sum(float(((r.double() - t.double()) ** 2).sum()) for r, _, t in triples)
    return math.sqrt(num / den)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_correct_candidate_passes_and_the_ratio_is_the_pooled_rms_ratio(seed):
    triples = _tensors(seed, 1.0)
    _, rows = _record(triples)
    (row,) = rows
    assert row.tensor == "noise_pred" + SUFFIX and row.mode == MODE and row.compared and row.passed, row.reason
    point = float(row.case.split()[0].split("=")[1])
    assert point == pytest.approx(_independent_ratio(triples), rel=1e-3)  # case carries 4 significant digits
    assert row.error_ratio >= point  # the judged bound is above the point estimate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_consistently_less_accurate_candidate_fails_by_its_statistic_row(seed):
    triples = _tensors(seed, 2.0)  # twice as far from fp32 as the reference, element by element
    _, rows = _record(triples)
    (row,) = rows
    assert not row.passed and row.tensor == "noise_pred:rms_ratio"
    assert "rms_ratio" in row.reason and "> 1.5" in row.reason
    assert _independent_ratio(triples) > 1.8


def test_the_bound_widens_with_spread_and_is_reproducible():
    import numpy as np

    b = LowpBars(max_rms_ratio=1.5, resamples=500)
    even = bootstrap_bound(np.array([1.0, 1.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0, 1.0]), b)
    spread = bootstrap_bound(np.array([0.2, 1.8, 0.2, 1.8]), np.array([1.0, 1.0, 1.0, 1.0]), b)
    assert even == (1.0, 1.0)
    assert spread[0] == pytest.approx(1.0) and spread[1] > 1.1
    assert bootstrap_bound(np.array([0.2, 1.8, 0.2, 1.8]), np.ones(4), b) == spread


def test_fp32_lossy_profiles_and_non_finite_tensors_are_not_pooled():
    rec = Recorder("t", "tiny", "cpu", Table.load(), lowp=Pool())
    ref, cand, truth = _tensors(0, 1.0, n=1)[0]
    rec.compare(_Cand(), "unet", "fp32", "noise_pred", ref, cand)
    rec.compare(_Cand(), "unet", "bf16", "image", ref, cand.clone().fill_(math.nan), truth)
    assert rec.lowp.rows(rec, "fp32") == [] and rec.lowp.rows(rec, "bf16") == []
    assert rec.lowp.groups == {}


def test_one_tensor_and_a_file_without_lowp_give_a_skipped_row(tmp_path):
    _, rows = _record(_tensors(0, 1.0, n=1))
    assert rows[0].status == "skipped" and "fewer than 2" in rows[0].reason
    text = Table.load().source
    body = open(text).read()
    no_lowp = body[:body.index("[lowp.bf16]")]
    f = tmp_path / "t.toml"
    f.write_text(no_lowp)
    _, rows = _record(_tensors(0, 1.0), table=Table.load(f))
    assert rows[0].status == "skipped" and "[lowp.bf16]" in rows[0].reason


def test_bars_come_from_the_shipped_table_per_dtype():
    t = Table.load()
    for dt in ("bf16", "fp16"):
        b = bars(t, "unet", "noise_pred", dt)
        assert b is not None and b.max_rms_ratio == t.data["lowp"][dt]["max_rms_ratio"]
    assert bars(t, "unet", "noise_pred", "fp32") is None
