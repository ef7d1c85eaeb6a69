"""Candidates (parity/candidates): the registry, the built-ins compiled and int8, a plug-in package
installed by pip (examples/handmade-attention), and every way a candidate can be bad input.

The plug-in tests need `pip install -e examples/handmade-attention` (the README's test command
does it); the broken candidates load by import path from tests/candidate_fixtures.py."""
from __future__ import annotations

import csv
import importlib.metadata

import pytest

from sdparity.main import main

QUICK = ["--steps", "2", "--num-seeds", "1", "--modes", "txt2img", "--no-plots", "--quiet"]


def _rows(folder):
    with open(folder / "parity.csv", newline="") as f:
        return list(csv.DictReader(f))


def _plugin_installed() -> bool:
    eps = importlib.metadata.entry_points(group="sd_parity.candidates")
    return {"handmade-attention", "handmade-attention-buggy"} <= {ep.name for ep in eps}


needs_plugin = pytest.mark.skipif(not _plugin_installed(), reason="pip install -e examples/handmade-attention")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDPARITY_CACHE", str(tmp_path / "cache"))


# --------------------------------------------------------------------------- registry and listing
def test_listing_names_every_builtin_and_the_installed_plugin(capsys):
    assert main(["candidates"]) == 0
    out = capsys.readouterr().out
    for name in ("scratch", "scratch-exact", "diffusers", "compiled", "onnxruntime", "int8"):
        assert name in out
    if _plugin_installed():
        line = next(ln for ln in out.splitlines() if ln.startswith("handmade-attention "))
        assert "entry point handmade_attention:candidate" in line and "sdparity-handmade-attention" in line


def test_a_missing_optional_dependency_is_listed_and_skipped(tmp_path, capsys):
    spec = "candidate_fixtures:needs_missing_library"
    out = tmp_path / "c"
    assert main(["check", "--candidates", spec, "--components", "unet", "--out", str(out)] + QUICK) == 0
    rows = _rows(out)
    assert rows and all(r["status"] == "skipped" and "tensorrt is not installed" in r["reason"] for r in rows)
    assert "unavailable: tensorrt is not installed" in (out / "summary.md").read_text()


# --------------------------------------------------------------------------- bad input: exit 2, one line
@pytest.mark.parametrize("spec, words", [
    ("no_such_package.mod:factory", "cannot import no_such_package.mod (ModuleNotFoundError"),
    ("candidate_fixtures:no_such_factory", "candidate_fixtures has no attribute 'no_such_factory'"),
    ("candidate_fixtures:factory_raises", "its factory raised RuntimeError: license server unreachable"),
    ("candidate_fixtures:not_a_candidate", "object is not a candidate (lacks name, components, build)"),
    ("candidate_fixtures:bad_components", "components must be a non-empty subset"),
    ("candidate_fixtures:unknown_profile", "its profile 'fp4' is not in"),
    ("candidate_fixtures:build_raises", "build(unet, fp32) raised KeyError"),
    ("candidate_fixtures:raises_when_called", "raised RuntimeError: my kernel is not ready"),
    ("candidate_fixtures:wrong_shape", "unet noise_pred has shape (2, 4, 7, 8), expected (2, 4, 8, 8)"),
    ("candidate_fixtures:wrong_dtype", "unet noise_pred is torch.float64, expected torch.float32"),
    ("nosuchname", "unknown candidate 'nosuchname'"),
])
def test_a_bad_candidate_is_exit_2_naming_it(spec, words, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["check", "--candidates", spec, "--components", "unet", "--out", str(out)] + QUICK) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".c.*")), "something was half-written"


def test_bad_candidates_in_localize_and_bench_are_exit_2(tmp_path, capsys):
    assert main(["localize", "--component", "unet", "--candidate", "candidate_fixtures:factory_raises",
                 "--out", str(tmp_path / "l")]) == 2
    assert "its factory raised RuntimeError" in capsys.readouterr().err
    assert main(["localize", "--component", "vae", "--candidate", "candidate_fixtures:correct_plain_unet",
                 "--out", str(tmp_path / "l")]) == 2
    assert "does not provide vae" in capsys.readouterr().err
    assert main(["bench", "--impls", "diffusers,candidate_fixtures:factory_raises", "--out", str(tmp_path / "b")]) == 2
    assert "its factory raised RuntimeError" in capsys.readouterr().err
    assert not (tmp_path / "l").exists() and not (tmp_path / "b").exists()


def test_a_nan_output_fails_the_gate_with_the_reason(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["check", "--candidates", "candidate_fixtures:nan_output", "--components", "unet",
                 "--out", str(out)] + QUICK) == 1
    bad = [r for r in _rows(out) if r["passed"] == "False"]
    assert bad and all("non-finite values (candidate)" in r["reason"] for r in bad)


def test_a_plain_function_candidate_is_wrapped_and_passes(tmp_path):
    """The plain interface (unet(x, t, ctx) -> noise_pred) inside diffusers' pipeline, via the adapters."""
    out = tmp_path / "c"
    assert main(["check", "--candidates", "candidate_fixtures:correct_plain_unet", "--components", "unet",
                 "--out", str(out)] + QUICK) == 0
    rows = [r for r in _rows(out) if r["status"] == "compared"]
    assert {r["mode"] for r in rows} == {"direct", "txt2img"}
    assert all(float(r["max_abs"]) == 0.0 for r in rows)  # diffusers' own UNet: the same bits
    assert {r["candidate"] for r in rows} == {"candidate_fixtures:correct_plain_unet"}  # as the user named it


# --------------------------------------------------------------------------- int8 (lossy profile)
def test_int8_passes_its_profile_and_every_row_names_it(tmp_path):
    out = tmp_path / "c"
    assert main(["check", "--candidates", "int8", "--components", "text_encoder,vae,unet,pipeline",
                 "--dtypes", "fp32,bf16", "--out", str(out), "--steps", "2", "--num-seeds", "1", "--no-plots",
                 "--quiet"]) == 0
    rows = _rows(out)
    compared = [r for r in rows if r["status"] == "compared"]
    assert compared and {r["profile"] for r in rows} == {"int8"}
    assert all(r["max_cosine_distance"] != "" and r["min_psnr_db"] != "" for r in compared)
    # int8 is not exact: the profile judged rows that the exact bars would fail
    assert any(float(r["rel_l2"]) > 1e-3 for r in compared if r["tensor"] == "noise_pred")
    skipped = [r for r in rows if r["dtype"] == "bf16"]
    assert skipped and all(r["status"] == "skipped" and "float32 activations" in r["reason"] for r in skipped)
    assert "| int8 | int8 | unet |" in (out / "summary.md").read_text()


def test_an_int8_bug_fails_the_int8_profile(tmp_path):
    out = tmp_path / "c"
    assert main(["check", "--candidates", "candidate_fixtures:int8_drops_bias", "--components", "unet",
                 "--out", str(out)] + QUICK) == 1
    bad = [r for r in _rows(out) if r["passed"] == "False"]
    assert bad and all(r["profile"] == "int8" for r in bad)


# --------------------------------------------------------------------------- a plug-in package
@needs_plugin
def test_plugin_candidate_passes_and_its_buggy_twin_fails_and_is_localised(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    assert main(["check", "--candidates", "handmade-attention", "--components", "unet", "--dtypes", "fp32,bf16",
                 "--out", str(good)] + QUICK) == 0
    assert main(["check", "--candidates", "handmade-attention-buggy", "--components", "unet",
                 "--out", str(bad)] + QUICK) == 1
    err = capsys.readouterr().err
    assert "FAIL handmade-attention-buggy unet fp32" in err
    assert "sdparity localize --component unet --dtype fp32 --preset tiny --candidate handmade-attention-buggy" in err
    assert main(["localize", "--component", "unet", "--candidate", "handmade-attention-buggy",
                 "--out", str(tmp_path / "l")]) == 1
    first = next(r for r in csv.DictReader(open(tmp_path / "l" / "localize.csv")) if r["over"] == "True")
    assert first["reference"] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", first
    assert main(["localize", "--component", "unet", "--candidate", "handmade-attention",
                 "--out", str(tmp_path / "l2")]) == 0


@needs_plugin
def test_side_by_side_with_an_informational_candidate(tmp_path):
    """Two candidates in one run; the buggy one is informational: reported, failing, not gating."""
    out = tmp_path / "c"
    assert main(["check", "--candidates", "scratch,handmade-attention-buggy", "--informational",
                 "handmade-attention-buggy", "--components", "unet", "--out", str(out)] + QUICK) == 0
    rows = _rows(out)
    assert {r["candidate"] for r in rows} == {"scratch", "handmade-attention-buggy"}
    buggy = [r for r in rows if r["candidate"] == "handmade-attention-buggy"]
    assert any(r["passed"] == "False" for r in buggy) and all(r["gating"] == "False" for r in buggy)
    summary = (out / "summary.md").read_text()
    assert "| scratch | exact | unet |" in summary and "| handmade-attention-buggy (informational) | exact | unet | **FAIL**" in summary


@needs_plugin
def test_plugin_loads_by_import_path_too(tmp_path):
    out = tmp_path / "c"
    assert main(["check", "--candidates", "handmade_attention:candidate", "--components", "unet",
                 "--out", str(out)] + QUICK) == 0


@needs_plugin
def test_bench_times_a_candidate_against_diffusers(tmp_path):
    out = tmp_path / "b"
    assert main(["bench", "--components", "unet", "--impls", "diffusers,handmade-attention,int8", "--dtypes", "fp32",
                 "--repeats", "2", "--min-time-s", "0", "--resolutions", "64", "--batch-sizes", "1",
                 "--memory", "none", "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "bench.csv")))
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["impl"] for r in ok} == {"diffusers", "handmade-attention", "int8"}
    assert all(float(r["ratio_vs_diffusers"]) > 0 for r in ok)


# --------------------------------------------------------------------------- compiled (torch.compile)
@pytest.mark.slow
@pytest.mark.ci
def test_compiled_text_encoder_is_compiled_and_passes(tmp_path):
    """torch.compile of transformers' own text encoder, inside diffusers' pipeline; the UNet and VAE
    compile for minutes on this CPU, so they run in .ci/run's candidates gate, not here."""
    import torch._dynamo

    out = tmp_path / "c"
    torch._dynamo.reset()
    assert main(["check", "--candidates", "compiled", "--components", "text_encoder", "--out", str(out)] + QUICK) == 0
    rows = [r for r in _rows(out) if r["status"] == "compared"]
    assert rows and {r["candidate"] for r in rows} == {"compiled"} and all(r["passed"] == "True" for r in rows)
    assert {r["mode"] for r in rows} == {"direct", "txt2img"}
    assert max(float(r["rel_l2"]) for r in rows) < 1e-5
    assert "torch.compile(backend='inductor', dynamic=True)" in (out / "summary.md").read_text()
    # really compiled: dynamo saw frames (an eager fallback would leave the counter at zero)
    from torch._dynamo.utils import counters

    assert counters["stats"]["unique_graphs"] > 0


@pytest.mark.slow
def test_compiled_sd15_gate_passes_fp32(tmp_path):
    out = tmp_path / "c"
    assert main(["check", "--preset", "sd15", "--candidates", "compiled", "--components", "text_encoder,vae,unet",
                 "--dtypes", "fp32", "--modes", "txt2img", "--num-seeds", "1", "--no-plots", "--quiet",
                 "--out", str(out)]) == 0
    rows = [r for r in _rows(out) if r["status"] == "compared"]
    assert {r["component"] for r in rows} == {"text_encoder", "vae", "unet"}  # (all_swapped comes with pipeline)
    assert all(r["passed"] == "True" for r in rows)
