"""The gate's rows as test cases: the one definition of a row group, and JUnit XML of a gate run.

    groups = row_groups(result.rows)   # one Group per candidate x component x dtype x mode x scheduler
    groups[0].status                   # passed | failed | skipped | informational
    write_junit(result, "junit.xml")   # testsuite per component, testcase per group, written whole

The pytest plugin (sdparity.pytest_plugin) turns the same groups into test items, so a CI
dashboard shows the same cases whichever way the gate ran. A group:
- fails when any of its compared rows of a gating candidate is over tolerance; the failure text
  is one `parity.report.failure_line` per failing row (the numbers and the bar it missed);
- is skipped when every row is skipped (the reason is the rows' reason);
- is `informational` when an --informational candidate is over tolerance (JUnit: skipped with
  the failure text; pytest: xfail), so it is reported without failing the run;
- passes otherwise.
Rows carry no per-group timing (the gate interleaves groups): each testcase's time is 0 and the
run's wall time is on <testsuites>.
Imports: the standard library and parity.rows / parity.report / parity.outputs only.
"""
from __future__ import annotations

import math
import platform
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from parity.rows import Row, fmt

MAX_LINES = 25  # failing rows spelled out per group; the rest are counted
VERSIONED = ("sd-parity", "torch", "diffusers", "transformers", "safetensors", "numpy")


@dataclass(frozen=True)
class GroupKey:
    candidate: str
    component: str
    dtype: str
    mode: str
    scheduler: str

    @property
    def case_id(self) -> str:
        """`handmade-attention-fp32-txt2img-pndm`: the parametrisation, empty parts left out."""
        return "-".join(p for p in (self.candidate, self.dtype, self.mode, self.scheduler) if p)

    @property
    def name(self) -> str:
        """The test's name, pytest style: `unet[handmade-attention-fp32-txt2img-pndm]`."""
        return f"{self.component}[{self.case_id}]"


def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def _where(r: Row) -> str:
    where = r.tensor
    if r.step not in ("", None):
        where += f" step {r.step}"
    if r.case:
        where += f" [{r.case}]"
    return where


def _bar(r: Row) -> str:
    if r.atol != "" or r.rtol != "":
        return f"atol {fmt(r.atol)} + rtol {fmt(r.rtol)}*|ref|, psnr >= {fmt(r.min_psnr_db)} dB, " \
               f"rel_l2 <= {fmt(r.max_rel_l2)}"
    if r.max_error_ratio != "":
        return f"error ratio vs fp32 <= {fmt(r.max_error_ratio)} x diffusers' own"
    if r.max_cosine_distance != "":
        return f"profile {r.profile}: psnr >= {fmt(r.min_psnr_db)} dB, cosine distance <= {fmt(r.max_cosine_distance)}"
    return "see the row's reason"


@dataclass
class Group:
    key: GroupKey
    rows: list[Row] = field(default_factory=list)

    @property
    def compared(self) -> list[Row]:
        return [r for r in self.rows if r.compared]

    @property
    def failing(self) -> list[Row]:
        return [r for r in self.rows if r.failed]

    @property
    def gating(self) -> bool:
        return all(r.gating for r in self.rows)

    @property
    def status(self) -> str:
        if not self.compared:
            return "skipped"
        if self.failing:
            return "failed" if self.gating else "informational"
        return "passed"

    @property
    def skip_reason(self) -> str:
        return "; ".join(dict.fromkeys(r.reason for r in self.rows if r.status == "skipped" and r.reason)) or "skipped"

    def message(self) -> str:
        """One line: how many comparisons missed, the worst numbers and where, the bar of the worst."""
        bad, n = self.failing, len(self.compared)
        k = self.key
        head = f"{k.candidate} {k.component} {k.dtype} {k.mode}" + (f" ({k.scheduler})" if k.scheduler else "")
        if not bad:
            return f"{head}: {n} of {n} comparisons within tolerance"
        fin = [r for r in bad if _finite(r.max_abs)]
        parts = [f"{head}: {len(bad)} of {n} comparisons over tolerance"]
        if len(fin) < len(bad):
            parts.append(f"{len(bad) - len(fin)} non-finite")
        if fin:
            w = max(fin, key=lambda r: r.max_abs)
            parts.append(f"worst max_abs {fmt(w.max_abs)} at {_where(w)} of shape {w.shape} (bar: {_bar(w)})")
            rel = [r for r in fin if _finite(r.rel_l2)]
            if rel:
                wr = max(rel, key=lambda r: r.rel_l2)
                parts.append(f"worst rel_l2 {fmt(wr.rel_l2)} at {_where(wr)}")
            ps = [r for r in fin if _finite(r.psnr_db)]
            if ps:
                wp = min(ps, key=lambda r: r.psnr_db)
                parts.append(f"lowest psnr {fmt(wp.psnr_db)} dB at {_where(wp)}")
        return "; ".join(parts)

    def failure_text(self) -> str:
        """The message, then one `failure_line` per failing row (the first MAX_LINES)."""
        from parity.report import failure_line

        bad = self.failing
        lines = [self.message(), ""] + [failure_line(r) for r in bad[:MAX_LINES]]
        if len(bad) > MAX_LINES:
            lines.append(f"... and {len(bad) - MAX_LINES} more failing rows (parity.csv has them all)")
        return "\n".join(lines)

    def row_lines(self) -> str:
        """Every row of the group, one line each (JUnit system-out)."""
        out = []
        for r in self.rows:
            if r.status == "skipped":
                out.append(f"SKIP {r.tensor or '-'}: {r.reason}")
                continue
            out.append(f"{'ok  ' if r.passed else 'FAIL'} {_where(r)} {r.shape}: max_abs={fmt(r.max_abs)} "
                       f"rel_l2={fmt(r.rel_l2)} psnr={fmt(r.psnr_db)} dB" + (f"; {r.reason}" if r.reason else ""))
        return "\n".join(out)


def group_key(r: Row) -> GroupKey:
    return GroupKey(r.candidate, r.component, r.dtype, r.mode, r.scheduler)


def row_groups(rows: list[Row]) -> list[Group]:
    """The gate's rows grouped per (candidate, component, dtype, mode, scheduler), in the order
    the gate produced them: the test items of `sdparity check --junit-xml` and `pytest --sdparity`."""
    groups: dict[GroupKey, Group] = {}
    for r in rows:
        groups.setdefault(group_key(r), Group(group_key(r))).rows.append(r)
    return list(groups.values())


# --------------------------------------------------------------------------- JUnit XML
def versions() -> dict[str, str]:
    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["python"] = platform.python_version()
    return out


def run_properties(result) -> dict[str, str]:
    """Versions and the gate's settings, as <property> name/value pairs."""
    st = result.settings
    props = {f"version.{k}": v for k, v in versions().items()}
    props.update({
        "run_id": result.run_id, "preset": result.preset_label, "reference": result.source,
        "model": str(st.model or ""), "candidates": ",".join(st.candidates),
        "informational": ",".join(st.informational), "components": ",".join(st.components),
        "dtypes": ",".join(st.dtypes), "device": st.device, "schedulers": ",".join(st.schedulers),
        "modes": ",".join(st.modes), "steps": str(st.steps), "size": str(st.size), "seed": str(st.seed),
        "num_seeds": str(st.num_seeds), "tolerances": str(st.tolerances or "parity/tolerances.toml"),
        "clip_skip": "" if getattr(st, "clip_skip", None) is None else str(st.clip_skip),
        "platform": platform.platform(),
    })
    return props


def junit_tree(result) -> ET.ElementTree:
    """<testsuites> > <testsuite> per component > <testcase> per row group."""
    groups = row_groups(result.rows)
    props = run_properties(result)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - result.elapsed_s))
    root = ET.Element("testsuites", name="sdparity check")
    totals = dict(tests=0, failures=0, errors=0, skipped=0)
    components = list(dict.fromkeys(g.key.component for g in groups))
    for comp in components:
        mine = [g for g in groups if g.key.component == comp]
        counts = dict(tests=len(mine), failures=sum(g.status == "failed" for g in mine), errors=0,
                      skipped=sum(g.status in ("skipped", "informational") for g in mine))
        suite = ET.SubElement(root, "testsuite", name=f"sdparity.{comp}",
                              **{k: str(v) for k, v in counts.items()}, time="0.000", timestamp=stamp,
                              hostname=socket.gethostname())
        pe = ET.SubElement(suite, "properties")
        for name, value in props.items():
            ET.SubElement(pe, "property", name=name, value=value)
        for g in mine:
            case = ET.SubElement(suite, "testcase", classname=f"sdparity.{comp}", name=g.key.name, time="0.000")
            if g.status == "failed":
                ET.SubElement(case, "failure", message=g.message(), type="ParityFailure").text = g.failure_text()
            elif g.status == "informational":
                ET.SubElement(case, "skipped", message=f"informational candidate, not gated: {g.message()}",
                              type="informational").text = g.failure_text()
            elif g.status == "skipped":
                ET.SubElement(case, "skipped", message=g.skip_reason)
            ET.SubElement(case, "system-out").text = g.row_lines()
        if result.notes:  # the references' and candidates' notes (<testsuites> takes no system-out)
            ET.SubElement(suite, "system-out").text = "\n".join(result.notes)
        for k in totals:
            totals[k] += counts[k]
    root.attrib.update({k: str(v) for k, v in totals.items()})
    root.set("time", f"{result.elapsed_s:.3f}")
    ET.indent(root)
    return ET.ElementTree(root)


def junit_bytes(result) -> bytes:
    return ET.tostring(junit_tree(result).getroot(), encoding="utf-8", xml_declaration=True)


def write_junit(result, path: str | Path, force: bool = False, option: str = "--junit-xml") -> Path:
    """JUnit XML of a gate run at `path`, written whole (parity.outputs.writing_file: a temporary
    sibling moved into place). Check the location first with parity.outputs.check_target."""
    from parity.outputs import writing_file

    data = junit_bytes(result)
    with writing_file(path, force=force, option=option) as tmp:
        tmp.write_bytes(data)
    return Path(path)
