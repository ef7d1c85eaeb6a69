"""Golden records (parity.record, `sdparity record`, `sdparity check --against`): a record gates
scratch and the installed diffusers with numbers identical to the live gate's; recording is
reproducible; every bad record is refused (exit 2, one line, nothing written)."""
from __future__ import annotations

import csv
import json
import shutil

import pytest

from parity import report
from parity.gate import GateSettings, run_gate
from parity.record import Record, write_record
from sdparity import main as cli

KW = dict(components="vae,pipeline", dtypes="fp32,bf16", modes="txt2img", num_seeds=1, steps=2, size=32,
          candidates="scratch,diffusers")
CLI = ["--components", "vae,pipeline", "--dtypes", "fp32,bf16", "--modes", "txt2img", "--num-seeds", "1",
       "--steps", "2", "--size", "32"]


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def recorded(tiny_refs, tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    st = GateSettings.make(**KW)
    write_record(st, root / "a", references=tiny_refs)
    write_record(st, root / "b", references=tiny_refs)
    return st, root


@pytest.fixture(scope="module")
def live(recorded, tiny_refs, tmp_path_factory):
    st, _ = recorded
    out = tmp_path_factory.mktemp("live") / "run"
    report.write_check(run_gate(st, references=tiny_refs), out, plots=False)
    return _csv(out / "parity.csv")


def test_recording_is_reproducible(recorded):
    _, root = recorded
    a, b = (json.loads((root / x / "manifest.json").read_text()) for x in "ab")
    assert a["files"] and a["files"] == b["files"] and a["id"] == b["id"]
    for name in a["files"]:
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes()
    assert {"direct-fp32-vae-seed0.safetensors", "direct-bf16-vae-seed0.safetensors",
            "trace-fp32-pndm-txt2img.safetensors", "trace-bf16-pndm-txt2img.safetensors"} == set(a["files"])
    env = a["environment"]
    for key in ("torch", "diffusers", "transformers", "sd_parity", "git_sha", "device_name", "threads"):
        assert env[key] not in ("", None)
    assert a["settings"]["dtypes"] == ["fp32", "bf16"] and a["reference"]["weights_hash"]


def test_check_against_the_record_equals_the_live_gate(recorded, live, tmp_path, capsys):
    _, root = recorded
    out = tmp_path / "against"
    assert cli.main(["check", "--against", str(root / "a"), "--candidates", "scratch,diffusers", "--no-plots",
                     "--quiet", "--out", str(out)]) == 0
    rows = _csv(out / "parity.csv")
    rid = json.loads((root / "a" / "manifest.json").read_text())["id"]
    assert {r["reference"] for r in rows} == {f"record:{rid}"} and {r["reference"] for r in live} == {"live"}
    assert len(rows) == len(live) > 50
    assert {r["candidate"] for r in rows} == {"scratch", "diffusers"}
    drop = ("run_id", "reference")
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in live]
    summary = (out / "summary.md").read_text()
    assert f"golden record {rid}" in summary and "diffusers 0." in summary


@pytest.fixture
def copy(recorded, tmp_path):
    _, root = recorded
    dst = tmp_path / "rec"
    shutil.copytree(root / "a", dst)
    return dst


def _refused(args, capsys, needle, out):
    code = cli.main(args + ["--no-plots", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def _manifest(folder, edit):
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def test_tampered_tensor_is_refused(copy, tmp_path, capsys):
    f = copy / "direct-fp32-vae-seed0.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor, same size
    f.write_bytes(bytes(data))
    _refused(["check", "--against", str(copy)], capsys, "was changed after recording", tmp_path / "o")


def test_truncated_tensor_file_is_refused(copy, tmp_path, capsys):
    f = copy / "trace-bf16-pndm-txt2img.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    _refused(["check", "--against", str(copy)], capsys, "truncated or replaced", tmp_path / "o")


def test_missing_file_and_missing_manifest_are_refused(copy, tmp_path, capsys):
    (copy / "trace-fp32-pndm-txt2img.safetensors").unlink()
    _refused(["check", "--against", str(copy)], capsys, "incomplete record: trace-fp32", tmp_path / "o")
    (copy / "manifest.json").unlink()
    _refused(["check", "--against", str(copy)], capsys, "incomplete record (no manifest.json)", tmp_path / "o")


def test_newer_format_is_refused(copy, tmp_path, capsys):
    _manifest(copy, lambda m: m.update(format=m["format"] + 1))
    _refused(["check", "--against", str(copy)], capsys, "is newer than this sd-parity reads", tmp_path / "o")


def test_conflicting_option_is_refused(copy, tmp_path, capsys):
    _refused(["check", "--against", str(copy), "--preset", "sd15"], capsys, "--preset sd15 conflicts",
             tmp_path / "o")
    _refused(["check", "--against", str(copy), "--dtypes", "fp32"], capsys, "--dtypes fp32 conflicts",
             tmp_path / "o")


def test_record_of_other_weights_is_refused(copy, tmp_path, capsys):
    # a manifest whose weights hash is not these references' (as a record of another model would be)
    _manifest(copy, lambda m: m["reference"].update(weights_hash="0" * 64))
    _refused(["check", "--against", str(copy)], capsys, "was made from other weights", tmp_path / "o")


def test_profile_needs_a_record(tmp_path, capsys):
    _refused(["check", "--profile", "cross"], capsys, "--profile is for --against", tmp_path / "o")


def test_record_cli_writes_a_record(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(["record", "--components", "vae", "--num-seeds", "1", "--quiet", "--out", str(out)]) == 0
    assert "recorded" in capsys.readouterr().out
    Record.open(out)  # verifies every file's size and sha256


@pytest.mark.slow
@pytest.mark.ci
def test_sharded_check_against_a_record_merges_to_the_unsharded_one(recorded, tmp_path, capsys):
    """`check --against --shard i/N` on separate invocations, merged, equals `check --against` unsharded:
    a record can be gated in pieces on machines that have no diffusers run of their own."""
    _, root = recorded
    base = ["check", "--against", str(root / "a"), "--candidates", "scratch,diffusers", "--no-plots", "--quiet"]
    assert cli.main(base + ["--out", str(tmp_path / "whole")]) == 0
    shards = [tmp_path / f"s{i}" for i in (1, 2, 3)]
    for i, folder in enumerate(shards, 1):
        assert cli.main(base + ["--shard", f"{i}/3", "--out", str(folder)]) == 0
    assert cli.main(["merge", *map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    whole, merged = _csv(tmp_path / "whole" / "parity.csv"), _csv(tmp_path / "merged" / "parity.csv")
    parts = [_csv(f / "parity.csv") for f in shards]
    assert all(parts) and sum(map(len, parts)) == len(whole) > 50  # every shard did work; none twice
    rid = json.loads((root / "a" / "manifest.json").read_text())["id"]
    assert {r["reference"] for r in merged} == {f"record:{rid}"}
    drop = ("run_id",)
    key = lambda r: tuple(r[k] for k in ("candidate", "component", "dtype", "mode", "scheduler", "step", "tensor",
                                         "case"))
    assert sorted(({k: v for k, v in r.items() if k not in drop} for r in merged), key=key) == \
           sorted(({k: v for k, v in r.items() if k not in drop} for r in whole), key=key)


def test_shards_of_a_record_and_a_live_run_do_not_merge(recorded, tmp_path, capsys):
    _, root = recorded
    args = ["--no-plots", "--quiet", "--shard"]
    assert cli.main(["check", "--against", str(root / "a"), *args, "1/2", "--out", str(tmp_path / "s1")]) == 0
    assert cli.main(["check", *CLI, "--candidates", "scratch", *args, "2/2", "--out", str(tmp_path / "s2")]) == 0
    capsys.readouterr()
    code = cli.main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "shards of one run share their reference" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_sd15_fp32_record_and_check_against_it(tmp_path, capsys):
    """sd15 at fp32: record the reference side, then gate scratch and the installed diffusers against it
    (measured here: 3.9 MB, ~61 s to record; ~215 s to check both candidates; diffusers' rows max_abs 0)."""
    args = ["--preset", "sd15", "--components", "text_encoder,vae,unet", "--modes", "txt2img", "--num-seeds", "1"]
    assert cli.main(["record", *args, "--quiet", "--out", str(tmp_path / "rec")]) == 0
    rec = Record.open(tmp_path / "rec")
    size = sum(f.stat().st_size for f in (tmp_path / "rec").iterdir())
    assert rec.manifest["settings"]["dtypes"] == ["fp32"] and size < 20e6
    out = tmp_path / "against"
    assert cli.main(["check", "--against", str(tmp_path / "rec"), "--candidates", "scratch,diffusers", "--no-plots",
                     "--quiet", "--out", str(out)]) == 0, capsys.readouterr().err
    rows = [r for r in _csv(out / "parity.csv") if r["status"] == "compared"]
    assert {r["candidate"] for r in rows} == {"scratch", "diffusers"} and all(r["passed"] == "True" for r in rows)
    assert {r["component"] for r in rows} >= {"text_encoder", "vae", "unet"}
    assert {r["reference"] for r in rows if r["component"] != "scheduler"} == {rec.reference}
    # the installed diffusers against its own record on this machine: bit for bit
    assert all(float(r["max_abs"]) == 0.0 for r in rows if r["candidate"] == "diffusers")


def test_same_rows_tool_compares_numbers_not_run_ids(tmp_path):
    """tools/same_rows.py (CI's record-vs-live comparison): equal apart from run_id/reference -> 0;
    one changed number or one missing row -> 1, naming it."""
    import subprocess
    import sys
    from pathlib import Path

    from parity.rows import Row, to_csv

    tool = Path(__file__).resolve().parents[1] / "tools" / "same_rows.py"
    base = [Row(run_id="a", component="vae", dtype="fp32", tensor="image", max_abs=1e-6, candidate="scratch"),
            Row(run_id="a", component="vae", dtype="fp32", tensor="image", max_abs=2e-6, candidate="scratch")]
    other = [Row(**{**r.as_dict(), "run_id": "b", "reference": "record:x"}) for r in base]
    (tmp_path / "a.csv").write_text(to_csv(base))
    (tmp_path / "b.csv").write_text(to_csv(other))

    def run(b):
        p = subprocess.run([sys.executable, str(tool), str(tmp_path / "a.csv"), str(b)], capture_output=True, text=True)
        return p.returncode, p.stdout

    assert run(tmp_path / "b.csv")[0] == 0
    other[1].max_abs = 3e-6
    (tmp_path / "c.csv").write_text(to_csv(other))
    code, out = run(tmp_path / "c.csv")
    assert code == 1 and "max_abs" in out and "1 differ" in out
    (tmp_path / "d.csv").write_text(to_csv(other[:1]))
    code, out = run(tmp_path / "d.csv")
    assert code == 1 and "row only in A" in out
