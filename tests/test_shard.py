"""Sharding the gate (parity.shard, `sdparity check --shard i/N`, `sdparity merge`): the merged
shards equal the unsharded run row for row (every column but run_id) for N = 1, 3 and 7, and
shards that do not belong together are refused (exit 2, one line, nothing written)."""
from __future__ import annotations

import csv
import json

import pytest

from parity import report
from parity.gate import GateSettings, run_gate
from parity.shard import canonical, owned, run_json, run_shard, units
from sdparity import main as cli

# 4 units (2 dtypes x 2 candidates x vae): N = 3 splits them 2/1/1, N = 7 leaves shards empty
KW = dict(components="vae", dtypes="fp32,bf16", candidates="scratch,scratch-exact", modes="txt2img,img2img",
          num_seeds=1, steps=2, size=32)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "run_id"} for r in rows]


@pytest.fixture(scope="module")
def gate(tiny_refs, tmp_path_factory):
    """The unsharded gate, once: its settings, its parity.csv rows in unit order."""
    st = GateSettings.make(**KW)
    result = run_gate(st, references=tiny_refs)
    out = tmp_path_factory.mktemp("full") / "run"
    report.write_check(result, out, plots=False)
    return st, _csv(out / "parity.csv")


def _shards(st, refs, n, root):
    """Each shard as `sdparity check --shard i/n` writes it (parity.shard.run_shard + run.json)."""
    folders = []
    for i in range(1, n + 1):
        res = run_shard(st, i, n, references=refs)
        folders.append(root / f"s{i}")
        report.write_check(res, folders[-1], plots=False, extra={"run.json": run_json(res, i, n)})
    return folders


def test_units_partition_the_gate():
    st = GateSettings.make(**KW)
    every = units(st)
    assert len(every) == 4
    for n in (1, 3, 7):
        parts = [owned(st, i, n) for i in range(1, n + 1)]
        assert sorted(map(str, sum(parts, []))) == sorted(map(str, every))  # each unit exactly once


@pytest.mark.parametrize("n", [1, 3, 7])
def test_merged_shards_equal_the_unsharded_run(n, gate, tiny_refs, tmp_path, capsys):
    st, full = gate
    folders = _shards(st, tiny_refs, n, tmp_path)
    assert cli.main(["merge", *map(str, reversed(folders)), "--out", str(tmp_path / "m"), "--no-plots"]) == 0
    merged = _csv(tmp_path / "m" / "parity.csv")
    assert len(full) > 40
    assert _strip(merged) == _strip(canonical(full, st))
    assert sorted(map(str, _strip(merged))) == sorted(map(str, _strip(full)))  # canonical only reorders
    summary = (tmp_path / "m" / "summary.md").read_text()
    assert f"merged from {n} shards" in summary and "PASS" in summary


def test_check_shard_cli_writes_run_json(tmp_path, gate):
    st, full = gate
    args = ["check", "--components", "vae", "--dtypes", "fp32,bf16", "--candidates", "scratch,scratch-exact",
            "--num-seeds", "1", "--steps", "2", "--size", "32", "--no-plots", "--quiet"]
    assert cli.main(args + ["--shard", "2/3", "--out", str(tmp_path / "s2")]) == 0
    doc = json.loads((tmp_path / "s2" / "run.json").read_text())
    assert doc["shard"] == {"index": 2, "count": 3}
    assert doc["units"] == [["fp32", "scratch-exact", "vae"]]  # unit 1 of 0..3
    rows = _csv(tmp_path / "s2" / "parity.csv")
    want = [r for r in full if r["dtype"] == "fp32" and r["candidate"] == "scratch-exact"]
    assert _strip(rows) == _strip(want) and len(rows) == doc["rows"]


@pytest.fixture(scope="module")
def three(gate, tiny_refs, tmp_path_factory):
    st, _ = gate
    return _shards(st, tiny_refs, 3, tmp_path_factory.mktemp("three"))


def _refused(args, capsys, needle, out):
    code = cli.main(args + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_merge_refuses_a_missing_shard(three, tmp_path, capsys):
    _refused(["merge", str(three[0]), str(three[2])], capsys, "shard 2/3 is missing", tmp_path / "m")


def test_merge_refuses_a_duplicate_shard(three, tmp_path, capsys):
    _refused(["merge", str(three[0]), str(three[1]), str(three[1]), str(three[2])], capsys, "given twice",
             tmp_path / "m")


def test_merge_refuses_shards_of_different_settings(three, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for f in ("parity.csv", "summary.md"):
        (other / f).write_bytes((three[1] / f).read_bytes())
    doc = json.loads((three[1] / "run.json").read_text())
    doc["settings"]["seed"] = 5
    (other / "run.json").write_text(json.dumps(doc))
    _refused(["merge", str(three[0]), str(other), str(three[2])], capsys, "(seed: 5 vs 0)",
             tmp_path / "m")


def test_merge_refuses_a_folder_that_is_not_a_shard(three, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "parity.csv").write_bytes((three[0] / "parity.csv").read_bytes())
    _refused(["merge", str(plain)], capsys, "not a shard's run folder", tmp_path / "m")


@pytest.mark.parametrize("value", ["0/3", "4/3", "1/0", "a/b", "3"])
def test_bad_shard_value_is_usage(value, tmp_path, capsys):
    _refused(["check", "--shard", value], capsys, "--shard must be i/N", tmp_path / "s")
