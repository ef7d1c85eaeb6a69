"""The gate inside a user's own pytest suite (#22): the `sdparity` pytest plugin in throw-away
projects (subprocesses), and `sdparity check --junit-xml` (in process): its structure against the
common JUnit schema, its counts against parity.csv, and bad locations refused before any work."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from parity.junit import junit_tree, row_groups
from parity.rows import Row
from sdparity import main as cli

CANDIDATE, BUGGY = "handmade-attention", "handmade-attention-buggy"  # examples/handmade-attention
FAST = ["--steps", "2", "--num-seeds", "1"]


def _pytest(project: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m pytest` in `project` with this interpreter (sd-parity installed in it), isolated
    from this run's pytest settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2", PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=project,
                          env=env, capture_output=True, text=True, timeout=timeout)


def _project(root: Path, pyproject: str, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pyproject.toml").write_text(textwrap.dedent(pyproject))
    for name, text in files.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def _cases(xml_path: Path) -> dict[str, ET.Element]:
    """pytest's own --junitxml: nodeid-like `classname::name` -> testcase."""
    return {f"{c.get('classname')}::{c.get('name')}": c for c in ET.parse(xml_path).getroot().iter("testcase")}


# --------------------------------------------------------------------------- the plugin, off
SPY_CONFTEST = """
import json, sys

def pytest_collection_finish(session):
    seen = {
        "plugin_loaded": session.config.pluginmanager.hasplugin("sdparity"),
        "heavy": sorted(m for m in ("torch", "diffusers", "transformers", "parity", "scratch_sd") if m in sys.modules),
        "items": [i.nodeid for i in session.items],
    }
    with open("seen.json", "w") as f:
        json.dump(seen, f)
"""


def test_without_the_flag_the_plugin_collects_nothing_and_imports_nothing(tmp_path):
    project = _project(tmp_path / "plain", """
        [tool.pytest.ini_options]
        sdparity_preset = "tiny"
    """, {"conftest.py": SPY_CONFTEST, "test_plain.py": "def test_one():\n    assert 1 + 1 == 2\n"})
    proc = _pytest(project, "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads((project / "seen.json").read_text())
    assert seen["plugin_loaded"], "the pytest11 entry point is not registered (pip install -e . again)"
    assert seen["items"] == ["test_plain.py::test_one"]
    assert seen["heavy"] == [], f"imported because of the plugin: {seen['heavy']}"
    assert "1 passed" in proc.stdout


def test_fixtures_skip_without_the_flag(tmp_path):
    project = _project(tmp_path / "fixtures", "[tool.pytest.ini_options]\n", {
        "test_uses.py": "def test_needs_models(sdparity_models):\n    raise AssertionError('ran')\n"})
    proc = _pytest(project, "-q", "-rs")
    assert proc.returncode == 0 and "sd-parity fixtures need pytest --sdparity" in proc.stdout, proc.stdout + proc.stderr


def test_bad_plugin_setting_is_a_usage_error_before_any_work(tmp_path):
    project = _project(tmp_path / "bad", "[tool.pytest.ini_options]\n", {"test_a.py": "def test_a():\n    pass\n"})
    proc = _pytest(project, "-q", "--sdparity", "--sdparity-dtypes", "fp8")
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert errors == ["ERROR: sdparity: unknown dtype 'fp8'; known: fp32, fp16, bf16"], proc.stderr
    proc = _pytest(project, "-q", "--sdparity", "--sdparity-candidate", "no_such_pkg.mod:factory")
    assert proc.returncode == 4 and "sdparity: candidate 'no_such_pkg.mod:factory'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the plugin, on
OWN_TEST = """
import torch

def test_own_parity_with_our_metrics(sdparity_models, sdparity_gate):
    unet = sdparity_models.networks["unet"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, 10, ctx).sample
    assert sdparity_gate.assert_close("unet", "noise_pred", "fp32", ref, ref.clone())["passed"]
    off = ref.clone()
    off[0, 1, 2, 3] += 1e-2
    try:
        sdparity_gate.assert_close("unet", "noise_pred", "fp32", ref, off)
    except AssertionError as e:
        print("OWN:", e)
    else:
        raise AssertionError("a 1e-2 error passed the fp32 bar")
    assert {g.key.candidate for g in sdparity_gate.groups} == {"handmade-attention", "handmade-attention-buggy"}
"""


@pytest.fixture(scope="module")
def gated_project(tmp_path_factory):
    """A throw-away project gating the example candidate and its buggy twin (tiny, unet, fp32, txt2img)."""
    project = _project(tmp_path_factory.mktemp("user") / "project", """
        [tool.pytest.ini_options]
        sdparity_preset = "tiny"
        sdparity_components = "unet"
        sdparity_dtypes = "fp32"
        sdparity_modes = "txt2img"
    """, {"conftest.py": SPY_CONFTEST, "test_own.py": OWN_TEST})
    proc = _pytest(project, "-rA", "--sdparity", "--sdparity-candidate", CANDIDATE, "--sdparity-candidate", BUGGY,
                   "--sdparity-steps", "2", "--sdparity-num-seeds", "1", "--junitxml", "results.xml")
    return project, proc


def test_plugin_collects_the_gate_as_items(gated_project):
    project, proc = gated_project
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the buggy twin fails
    gate_items = [f"sdparity::unet[{c}-fp32-{m}]" for c in (CANDIDATE, BUGGY) for m in ("direct", "txt2img-pndm")]
    seen = json.loads((project / "seen.json").read_text())
    assert seen["items"] == ["test_own.py::test_own_parity_with_our_metrics", *gate_items]
    assert {"torch", "diffusers"} <= set(seen["heavy"])  # the spy sees them when the gate is on
    assert "collected 5 items" in proc.stdout
    cases = _cases(project / "results.xml")
    assert sorted(cases) == sorted(["test_own::test_own_parity_with_our_metrics"]
                                   + gate_items)


def test_plugin_passes_the_correct_candidate_and_fails_the_broken_one_with_numbers(gated_project):
    project, proc = gated_project
    cases = _cases(project / "results.xml")
    verdict = {k: ("failed" if c.find("failure") is not None else "skipped" if c.find("skipped") is not None
                   else "error" if c.find("error") is not None else "passed") for k, c in cases.items()}
    assert verdict == {"test_own::test_own_parity_with_our_metrics": "passed",
                       f"sdparity::unet[{CANDIDATE}-fp32-direct]": "passed",
                       f"sdparity::unet[{CANDIDATE}-fp32-txt2img-pndm]": "passed",
                       f"sdparity::unet[{BUGGY}-fp32-direct]": "failed",
                       f"sdparity::unet[{BUGGY}-fp32-txt2img-pndm]": "failed"}, proc.stdout
    failure = cases[f"sdparity::unet[{BUGGY}-fp32-txt2img-pndm]"].find("failure")
    text = failure.text
    head = text.splitlines()[0]
    # what, how many, the worst numbers and where, the bar
    assert head.startswith(f"{BUGGY} unet fp32 txt2img (pndm): ") and "comparisons over tolerance" in head, head
    assert "worst max_abs 0.0" in head and "worst rel_l2 0.0" in head and "lowest psnr" in head, head
    assert "bar: atol 0.0002 + rtol 0.0002*|ref|" in head, head
    lines = [ln for ln in text.splitlines() if ln.startswith("FAIL ")]
    assert lines and all(ln.startswith(f"FAIL {BUGGY} unet fp32 txt2img ") and "max_abs=" in ln
                         and "rel_l2=" in ln and "psnr=" in ln for ln in lines), text
    # the same text in the terminal
    assert f"FAILED sdparity::unet[{BUGGY}-fp32-direct]" in proc.stdout
    assert f"PASSED sdparity::unet[{CANDIDATE}-fp32-direct]" in proc.stdout
    # the user's own test, through the fixtures: element count and location of the mismatch
    assert "OWN: unet noise_pred fp32 1x4x8x8: 1 of 256 elements over atol" in proc.stdout
    assert "largest difference at index (0, 1, 2, 3)" in proc.stdout


# --------------------------------------------------------------------------- row groups (synthetic rows)
def _row(cand="c", comp="unet", dtype="fp32", mode="txt2img", sched="pndm", passed=True, **kw) -> Row:
    base = dict(candidate=cand, component=comp, dtype=dtype, mode=mode, scheduler=sched, passed=passed,
                tensor="latents", shape="1x4x8x8", max_abs=0.5 if not passed else 1e-7, rel_l2=0.01 if not passed
                else 1e-7, psnr_db=40.0 if not passed else 130.0, atol=2e-4, rtol=2e-4, min_psnr_db=90.0,
                max_rel_l2=1e-5, reason="" if passed else "max_abs 0.5 exceeds atol")
    base.update(kw)
    return Row(**base)


def test_row_groups_and_their_verdicts():
    rows = [_row(step=0), _row(step=1, passed=False), _row(mode="direct", sched="", case="seed=0,t=1"),
            _row(cand="info", passed=False, gating=False),
            _row(cand="gone", status="skipped", passed=True, mode="", sched="", reason="no CUDA here")]
    groups = row_groups(rows)
    assert [g.key.name for g in groups] == ["unet[c-fp32-txt2img-pndm]", "unet[c-fp32-direct]",
                                            "unet[info-fp32-txt2img-pndm]", "unet[gone-fp32]"]
    assert [g.status for g in groups] == ["failed", "passed", "informational", "skipped"]
    assert [len(g.rows) for g in groups] == [2, 1, 1, 1]
    assert groups[0].message() == ("c unet fp32 txt2img (pndm): 1 of 2 comparisons over tolerance; worst max_abs 0.5 "
                                   "at latents step 1 of shape 1x4x8x8 (bar: atol 0.0002 + rtol 0.0002*|ref|, psnr "
                                   ">= 90 dB, rel_l2 <= 1e-05); worst rel_l2 0.01 at latents step 1; lowest psnr 40 dB "
                                   "at latents step 1")
    assert groups[3].skip_reason == "no CUDA here"


def test_junit_maps_informational_and_skipped_groups_to_skipped():
    from parity.gate import GateSettings

    rows = [_row(), _row(cand="info", passed=False, gating=False), _row(cand="bad", passed=False),
            _row(cand="gone", comp="vae", status="skipped", mode="", sched="", reason="unavailable")]
    result = SimpleNamespace(settings=GateSettings(), rows=rows, run_id="r", preset_label="tiny", source="preset:tiny",
                             elapsed_s=1.5, notes=["a note"])
    root = junit_tree(result).getroot()
    _validate_junit(root)
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert list(suites) == ["sdparity.unet", "sdparity.vae"]
    assert {k: suites["sdparity.unet"].get(k) for k in ("tests", "failures", "errors", "skipped")} == \
        {"tests": "3", "failures": "1", "errors": "0", "skipped": "1"}
    assert suites["sdparity.vae"].find("testcase/skipped").get("message") == "unavailable"
    info = suites["sdparity.unet"].find("testcase[@name='unet[info-fp32-txt2img-pndm]']/skipped")
    assert info.get("type") == "informational" and "1 of 1 comparisons over tolerance" in info.get("message")
    assert root.get("time") == "1.500" and suites["sdparity.vae"].find("system-out").text == "a note"


# --------------------------------------------------------------------------- the JUnit file of `sdparity check`
def _validate_junit(root: ET.Element) -> None:
    """The common JUnit schema (Jenkins' junit-10.xsd, what CI dashboards read): element nesting and
    order, required attributes, and counts that add up."""
    def number(el, name, kind=int):
        value = el.get(name)
        assert value is not None, f"<{el.tag}> lacks {name}"
        n = kind(value)
        assert n >= 0, f"<{el.tag} {name}={value}>"
        return n

    assert root.tag == "testsuites"
    totals = Counter()
    assert root.findall("testsuite") and all(c.tag == "testsuite" for c in root)
    for suite in root:
        assert suite.get("name")
        order = [c.tag for c in suite]
        allowed = ["properties", "testcase", "system-out", "system-err"]
        assert set(order) <= set(allowed), order
        assert order == sorted(order, key=allowed.index), f"children out of order: {order}"
        assert order.count("properties") <= 1 and order.count("system-out") <= 1
        for prop in suite.iterfind("properties/property"):
            assert prop.get("name") and prop.get("value") is not None and len(prop) == 0
        assert all(p.tag == "property" for p in suite.iterfind("properties/*"))
        cases = suite.findall("testcase")
        counts = Counter()
        for case in cases:
            assert case.get("name") and case.get("classname")
            number(case, "time", float)
            kids = [c.tag for c in case]
            assert set(kids) <= {"skipped", "error", "failure", "system-out", "system-err"}, kids
            assert sum(k in ("skipped", "error", "failure") for k in kids) <= 1, kids
            for tag in ("failure", "error"):
                for el in case.iter(tag):
                    assert el.get("message"), f"<{tag}> without a message in {case.get('name')}"
                    counts[{"failure": "failures", "error": "errors"}[tag]] += 1
            counts["skipped"] += len(case.findall("skipped"))
        declared = {k: number(suite, k) for k in ("tests", "failures", "errors", "skipped")}
        number(suite, "time", float)
        assert declared == {"tests": len(cases), "failures": counts["failures"], "errors": counts["errors"],
                            "skipped": counts["skipped"]}, suite.get("name")
        totals.update(declared)
    assert {k: number(root, k) for k in ("tests", "failures", "errors", "skipped")} == dict(totals)
    number(root, "time", float)


@pytest.fixture(scope="module")
def check_with_junit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("junit")
    code = cli.main(["check", "--preset", "tiny", "--components", "unet", "--dtypes", "fp32", "--modes", "txt2img",
                     "--candidates", f"scratch,{BUGGY}", *FAST, "--no-plots", "--quiet",
                     "--out", str(tmp / "run"), "--junit-xml", str(tmp / "run" / "junit.xml")])
    return code, tmp / "run"


def test_check_junit_validates_and_counts_like_parity_csv(check_with_junit):
    code, run = check_with_junit
    assert code == 1  # the buggy twin fails the gate
    root = ET.parse(run / "junit.xml").getroot()
    _validate_junit(root)
    with open(run / "parity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = f"{r['component']}[{'-'.join(p for p in (r['candidate'], r['dtype'], r['mode'], r['scheduler']) if p)}]"
        groups.setdefault(key, []).append(r)
    failing = {k for k, rs in groups.items() if any(r["passed"] != "True" for r in rs)}
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert set(cases) == set(groups)
    assert {n for n, c in cases.items() if c.find("failure") is not None} == failing
    assert failing == {f"unet[{BUGGY}-fp32-direct]", f"unet[{BUGGY}-fp32-txt2img-pndm]"}
    assert int(root.get("tests")) == len(groups) and int(root.get("failures")) == len(failing)
    assert int(root.get("skipped")) == 0 == sum(r["status"] == "skipped" for r in rows)
    # row counts too: each case's system-out has one line per parity.csv row, FAIL on the failing ones
    for name, case in cases.items():
        out = case.find("system-out").text.splitlines()
        assert len(out) == len(groups[name])
        assert sum(ln.startswith("FAIL") for ln in out) == sum(r["passed"] != "True" for r in groups[name])
    failure = cases[f"unet[{BUGGY}-fp32-txt2img-pndm]"].find("failure")
    assert "comparisons over tolerance; worst max_abs" in failure.get("message")
    assert failure.text.count(f"FAIL {BUGGY} unet fp32 txt2img") == sum(
        r["passed"] != "True" for r in groups[f"unet[{BUGGY}-fp32-txt2img-pndm]"])
    props = {p.get("name"): p.get("value") for p in root.find("testsuite/properties")}
    assert props["candidates"] == f"scratch,{BUGGY}" and props["dtypes"] == "fp32" and props["modes"] == "txt2img"
    assert props["version.torch"].startswith("2.") and props["version.diffusers"] and props["preset"] == "tiny"
    assert [s.get("name") for s in root.findall("testsuite")] == ["sdparity.unet"]
    assert not [p for p in run.parent.iterdir() if ".sdparity-tmp-" in p.name]  # nothing half-written left


def _refuse_work(monkeypatch):
    import parity.gate

    def boom(*a, **k):
        raise AssertionError("the gate ran before the --junit-xml location was checked")

    monkeypatch.setattr(parity.gate, "run_gate", boom)


@pytest.mark.parametrize("case", ["directory", "exists", "unwritable", "parent-is-a-file", "is-the-out-folder"])
def test_bad_junit_location_exits_2_with_one_line_before_any_work(case, tmp_path, capsys, monkeypatch):
    _refuse_work(monkeypatch)
    out = tmp_path / "run"
    target = {"directory": tmp_path / "adir", "exists": tmp_path / "old.xml",
              "unwritable": tmp_path / "locked" / "sub" / "j.xml", "parent-is-a-file": tmp_path / "old.xml" / "j.xml",
              "is-the-out-folder": out}[case]
    (tmp_path / "adir").mkdir()
    (tmp_path / "old.xml").write_text("<testsuites/>")
    (tmp_path / "locked").mkdir()
    if case == "unwritable":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        (tmp_path / "locked").chmod(0o500)
    try:
        code = cli.main(["check", "--components", "unet", "--out", str(out), "--junit-xml", str(target)])
    finally:
        (tmp_path / "locked").chmod(0o700)
    err = capsys.readouterr().err.strip()
    needle = {"directory": "is a folder; this command writes a file there", "exists": "exists; pass --force",
              "unwritable": "is not writable", "parent-is-a-file": "is a file, so the folder for it cannot be made",
              "is-the-out-folder": "is the --out folder"}[case]
    assert code == 2 and len(err.splitlines()) == 1 and "--junit-xml" in err and needle in err, err
    assert not out.exists() and (tmp_path / "old.xml").read_text() == "<testsuites/>"
