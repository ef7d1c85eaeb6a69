"""parity.csv's `margin` (error / the bar that judged the row, > 1 fails; issue 21): the formula for each
rule the gate applies on hand-built rows (expected values worked out by hand here), its agreement with
`passed` on a real tiny run, and summary.md's "Tightest passing margins" section."""
from __future__ import annotations

import csv
import math

import pytest
import torch

from parity.rows import COLUMNS, Row, binding, margin, margin_terms
from parity.tolerances import Table, Tolerance, allclose_ratio, judge
from sdparity import main as cli

FAST = ["--steps", "2", "--num-seeds", "1", "--no-plots", "--quiet"]


# --------------------------------------------------------------------------- the formula, rule by rule
def test_margin_is_the_last_column_and_derived_on_construction():
    assert COLUMNS[-1] == "margin" and COLUMNS.count("margin") == 1
    assert Row(max_abs=3e-7, atol=1e-6, rtol=0.0).margin == pytest.approx(0.3)
    assert Row(max_abs=3e-7, atol=1e-6, rtol=0.0, margin=0.9).margin == 0.9  # given (judge, a CSV): kept


def test_skipped_and_barless_rows_have_no_margin():
    assert Row(status="skipped", max_abs=1.0, atol=1e-4, reason="x").margin == ""
    assert Row(max_abs=1.0, rel_l2=0.5).margin == ""  # no bar
    assert Row(atol=1e-4).margin == ""  # never measured (a shape mismatch, an exception row)


def test_fp32_allclose_uses_the_elementwise_rule_not_max_abs_over_atol():
    ref = torch.tensor([1.0, 0.0], dtype=torch.float64)
    out = torch.tensor([1.0 + 1.5e-4, 8e-5], dtype=torch.float64)
    # element 0: 1.5e-4 / (1e-4 + 1e-4 * 1) = 0.75; element 1: 8e-5 / (1e-4 + 0) = 0.8
    assert allclose_ratio(ref, out, 1e-4, 1e-4) == pytest.approx(0.8, rel=1e-6)
    v = judge(ref, out, Tolerance(atol=1e-4, rtol=1e-4, min_psnr_db=0.0, max_rel_l2=1.0), "fp32")
    f = v.fields("fp32")
    assert v.passed and f["max_abs"] / f["atol"] == pytest.approx(1.5)  # max_abs/atol would say "fails"
    assert f["margin"] == pytest.approx(0.8, rel=1e-6)
    assert binding(Row(**f)) == "allclose"
    out[1] = 1.2e-4  # now 1.2e-4 / 1e-4 = 1.2: fails, and the margin says so
    v = judge(ref, out, Tolerance(atol=1e-4, rtol=1e-4, min_psnr_db=0.0, max_rel_l2=1.0), "fp32")
    assert not v.passed and v.fields("fp32")["margin"] == pytest.approx(1.2, rel=1e-6)


def test_psnr_margin_is_the_rmse_over_the_rmse_the_bar_allows():
    # 10 ** ((min - psnr) / 20): 10 dB short of the bar is sqrt(10) times the allowed rmse
    assert Row(psnr_db=80.0, min_psnr_db=90.0).margin == pytest.approx(3.16227766)
    assert Row(psnr_db=110.0, min_psnr_db=90.0).margin == pytest.approx(0.1)
    assert Row(psnr_db=90.0, min_psnr_db=90.0).margin == pytest.approx(1.0)
    assert Row(psnr_db=-20.0, min_psnr_db=0.0).margin == pytest.approx(10.0)  # negative PSNR: still > 1
    assert Row(psnr_db=math.inf, min_psnr_db=90.0).margin == 0.0


def test_fp32_margin_is_the_binding_rule():
    r = Row(max_abs=1e-5, atol=1e-4, rtol=0.0, psnr_db=100.0, min_psnr_db=90.0, rel_l2=3e-6, max_rel_l2=1e-5)
    # allclose 0.1, psnr 10 ** (-10 / 20) = 0.316228, rel_l2 0.3: psnr binds
    assert margin_terms(r) == pytest.approx({"allclose": 0.1, "psnr": 0.316228, "rel_l2": 0.3}, rel=1e-5)
    assert r.margin == pytest.approx(0.316228, rel=1e-5) and binding(r) == "psnr"
    r = Row(max_abs=1e-5, atol=1e-4, rtol=0.0, psnr_db=100.0, min_psnr_db=90.0, rel_l2=2.5e-5, max_rel_l2=1e-5)
    assert r.margin == pytest.approx(2.5) and binding(r) == "rel_l2"


def test_lossy_profile_margin_psnr_cosine_rel_l2():
    # int8 noise_pred: psnr 30 vs 24 dB -> 10 ** (-6 / 20) = 0.501187; cosine 0.01 / 0.03 = 0.333
    r = Row(psnr_db=30.0, min_psnr_db=24.0, cosine_distance=0.01, max_cosine_distance=0.03, profile="int8")
    assert r.margin == pytest.approx(0.501187, rel=1e-5) and binding(r) == "psnr"
    r = Row(psnr_db=30.0, min_psnr_db=24.0, cosine_distance=0.036, max_cosine_distance=0.03, profile="int8")
    assert r.margin == pytest.approx(1.2) and binding(r) == "cosine"
    # cross profile adds rel_l2: 4e-3 / 3e-3
    r = Row(psnr_db=80.0, min_psnr_db=50.0, cosine_distance=0.0, max_cosine_distance=1e-5, rel_l2=4e-3,
            max_rel_l2=3e-3, profile="cross")
    assert r.margin == pytest.approx(4 / 3) and binding(r) == "rel_l2"


def test_low_precision_margin_is_the_ratio_rule_with_its_floor():
    d = dict(candidate_rel_l2_vs_fp32=0.02, reference_rel_l2_vs_fp32=0.01, error_ratio=2.0, max_error_ratio=1.5)
    # the rule: ours <= 1.5 x theirs + floor -> 0.02 / (0.015 + 0.001) = 1.25
    assert margin(d, ratio_floor=1e-3) == pytest.approx(1.25)
    # no floor known (the pooled rms_ratio rows: bound <= max_rms_ratio): error_ratio / max_error_ratio
    assert margin(d) == pytest.approx(2.0 / 1.5)
    # through judge: truth ones(4); diffusers' bf16 error 0.01 in one element, ours 0.02
    truth = torch.ones(4)
    ref = truth + torch.tensor([0.01, 0, 0, 0])
    out = truth + torch.tensor([0.02, 0, 0, 0])
    tol = Tolerance(max_error_ratio=1.5, ratio_floor=1e-3)
    v = judge(ref, out, tol, "bf16", truth)
    # rel_l2 vs fp32: ours 0.02 / 2 = 0.01, theirs 0.01 / 2 = 0.005; allowed 1.5 * 0.005 + 0.001 = 0.0085
    assert not v.passed and v.fields("bf16")["margin"] == pytest.approx(0.01 / 0.0085, rel=1e-4)
    ours = truth + torch.tensor([0.012, 0, 0, 0])  # 0.006 / 0.0085 = 0.70588
    v = judge(ref, ours, tol, "bf16", truth)
    assert v.passed and v.fields("bf16")["margin"] == pytest.approx(0.006 / 0.0085, rel=1e-4)
    assert binding(Row(**v.fields("bf16"))) == "error_ratio"


def test_zero_bars_are_bit_equality_and_non_finite_is_inf():
    # scheduler timesteps / tokenizer ids: atol 0, rtol 0
    assert Row(max_abs=0.0, atol=0.0, rtol=0.0).margin == 0.0
    assert Row(max_abs=1.0, atol=0, rtol=0).margin == math.inf
    assert Row(rel_l2=0.0, max_rel_l2=0.0).margin == 0.0
    nan = math.nan
    assert Row(max_abs=nan, rel_l2=nan, psnr_db=nan, atol=1e-4, rtol=1e-4, min_psnr_db=90.0,
               max_rel_l2=1e-5).margin == math.inf
    # bf16 with a non-finite comparison: judge leaves the ratio columns empty, the margin is still inf
    v = judge(torch.ones(3), torch.tensor([1.0, math.inf, 1.0]), Tolerance(max_error_ratio=1.5, ratio_floor=1e-3),
              "bf16", torch.ones(3))
    assert not v.passed and v.fields("bf16")["margin"] == math.inf


def test_dict_rows_get_a_margin_through_from_dict():
    # a scheduler_check row: max_abs <= atol, rtol 0
    sched = {"component": "scheduler", "tensor": "latents", "max_abs": 2.5e-7, "atol": 1e-6, "rtol": 0.0,
             "min_psnr_db": None, "psnr_db": None, "passed": True, "note": ""}
    assert Row.from_dict(sched).margin == pytest.approx(0.25)
    tok = dict(component="tokenizer", tensor="input_ids", max_abs=0.0, atol=0, rtol=0, passed=True)
    assert Row.from_dict(tok).margin == 0.0


def test_train_group_margin_includes_its_parameters():
    from parity.train_check import _grad_rows

    table = Table.load()
    # down_blocks.0.a: large and exact; down_blocks.0.b: one element off by 5e-5 -> its rel_l2 5e-5 > 1e-5 (5x),
    # while the group's rel_l2 is 5e-5 / 1e4 and its allclose ratio 5e-5 / 2e-4
    ref = {"down_blocks.0.a.weight": torch.full((100,), 1000.0),
           "down_blocks.0.b.bias": torch.ones(1, dtype=torch.float64)}
    ours = {"down_blocks.0.a.weight": torch.full((100,), 1000.0),
            "down_blocks.0.b.bias": torch.ones(1, dtype=torch.float64) + 5e-5}
    rows = {r["tensor"]: r for r in _grad_rows(table, "fp32", ref, ours, "t", None, "tiny")}
    group = rows["grad:down_blocks.0"]
    assert not group["passed"] and group["margin"] == pytest.approx(5.0, rel=5e-3)
    assert rows["grad:worst_parameter"]["margin"] == pytest.approx(5.0, rel=5e-3)
    assert rows["grad:all"]["margin"] == pytest.approx(0.25, rel=5e-3)  # 5e-5 / (1e-4 + 1e-4 * 1), own rules only


# --------------------------------------------------------------------------- a real tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("margin")
    code = cli.main(["check", "--components", "text_encoder,vae,unet,pipeline", "--dtypes", "fp32,bf16",
                     "--out", str(out)] + FAST)
    with open(out / "parity.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return code, rows, (out / "summary.md").read_text(encoding="utf-8")


# Rows judged by a rule no number in the row carries (reports/README.md): scheduler rows where both libraries
# give the same non-finite elements pass at margin inf, scheduler rows whose dtypes differ fail at any margin.
def _exception(r: dict) -> bool:
    return r["component"] == "scheduler" and r["mode"] == "loop" and ("non-finite" in r["reason"]
                                                                     or "dtype differs" in r["reason"])


def test_passed_agrees_with_margin_on_a_tiny_run(tiny_run):
    code, rows, _ = tiny_run
    assert code == 0
    compared = [r for r in rows if r["status"] == "compared"]
    assert compared and all(r["margin"] == "" for r in rows if r["status"] == "skipped")
    without = [(r["component"], r["tensor"]) for r in compared if r["margin"] == ""]
    assert not without, without[:5]  # every compared row of this run has a bar
    disagree = [(r["component"], r["dtype"], r["tensor"], r["margin"], r["passed"]) for r in compared
                if not _exception(r) and (float(r["margin"]) <= 1) != (r["passed"] == "True")]
    assert not disagree, disagree[:5]
    kinds = {(r["dtype"], binding(Row.from_dict({k: _num(v) for k, v in r.items()}))) for r in compared}
    assert ("bf16", "error_ratio") in kinds and any(d == "fp32" for d, _ in kinds), kinds


def _num(text: str):
    try:
        return float(text) if text not in ("", "True", "False") and text[:1] in "0123456789-.in" else text
    except ValueError:
        return text


def test_summary_lists_the_tightest_passing_margins(tiny_run):
    _, rows, summary = tiny_run
    assert "## Tightest passing margins" in summary
    section = summary.split("## Tightest passing margins", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| candidate")]
    assert 1 <= len(table) <= 10
    listed = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in table]
    assert listed == sorted(listed, reverse=True) and all(m <= 1 for m in listed)
    passing = sorted((float(r["margin"]) for r in rows if r["passed"] == "True" and r["margin"] not in ("", "inf")),
                     reverse=True)
    assert listed[0] == pytest.approx(passing[0], rel=1e-2)  # the summary rounds to 3 digits
    assert all(line.split("|")[6].strip() in ("allclose", "psnr", "rel_l2", "cosine", "error_ratio") for line in table)
