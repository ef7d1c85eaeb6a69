"""`sdparity bench`: the report's schema on a quick tiny run, bad input, the CUDA path (mocked),
and the CPU peak-memory method. No test asserts a time."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdparity.main import main

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ["run_id", "component", "impl", "dtype", "device", "device_name", "batch_size", "resolution", "warmup",
            "repeats", "median_ms", "p10_ms", "p90_ms", "peak_mem_mb", "gflop", "achieved_gflops", "peak_fraction",
            "ratio_vs_diffusers", "torch_version", "diffusers_version", "threads", "git_sha", "timestamp"]
QUICK = ["bench", "--preset", "tiny", "--threads", "1", "--dtypes", "fp32,bf16", "--warmup", "1", "--repeats", "3",
         "--sweep-warmup", "0", "--sweep-repeats", "2", "--resolutions", "32,64", "--batch-sizes", "1,2", "--steps", "2"]


def _rows(folder: Path) -> list[dict]:
    with open(folder / "bench.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # scratch_cudagraph is a CUDA case: on this CPU run its rows are skipped (with the reason), at no cost
    rc = main([*QUICK, "--impls", "scratch,diffusers,scratch_cudagraph", "--out", str(out)])
    return rc, out


# --------------------------------------------------------------------------- the tiny run
def test_tiny_run_writes_csv_summary_and_plots(tiny_run):
    rc, out = tiny_run
    assert rc == 0
    for name in ("bench.csv", "summary.md", "latency_by_component.png", "time_vs_resolution.png", "time_vs_batch.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "latency_by_component.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*")), "a temporary file was left behind"
    text = (out / "summary.md").read_text()
    for heading in ("## Components", "## Pipeline stages", "## Resolution sweep", "## Batch sweep", "matmul peak"):
        assert heading in text


def test_csv_has_every_contract_column_and_one_row_per_case_and_impl(tiny_run):
    _, out = tiny_run
    with open(out / "bench.csv", newline="") as f:
        header = next(csv.reader(f))
    missing = [c for c in CONTRACT if c not in header]
    assert not missing, f"bench.csv lacks design.md columns {missing}"
    rows = _rows(out)
    keys = [(r["component"], r["impl"], r["dtype"], r["batch_size"], r["resolution"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate case rows"
    assert {r["component"] for r in rows} == {"text_encoder", "unet", "vae_decode", "vae_encode", "scheduler_step",
                                             "pipeline"}
    assert {r["impl"] for r in rows} == {"scratch", "diffusers", "scratch_cudagraph"}
    assert {r["impl"] for r in rows if r["status"] == "ok"} == {"scratch", "diffusers"}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    assert len({r["run_id"] for r in rows}) == 1


def test_ok_rows_have_consistent_statistics(tiny_run):
    rows = [r for r in _rows(tiny_run[1]) if r["status"] == "ok"]
    assert rows
    for r in rows:
        lo, p10, med, p90, hi = (float(r[k]) for k in ("min_ms", "p10_ms", "median_ms", "p90_ms", "max_ms"))
        assert 0 < lo <= p10 <= med <= p90 <= hi, r
        assert int(r["repeats"]) >= 2 and r["status"] == "ok" and r["reason"] == ""
        if r["component"] != "scheduler_step":  # matmuls/convs to count
            gflop, rate = float(r["gflop"]), float(r["achieved_gflops"])
            assert gflop > 0 and math.isclose(rate, gflop / (med / 1e3), rel_tol=1e-3)
            assert math.isclose(float(r["peak_fraction"]), rate / float(r["matmul_peak_gflops"]), rel_tol=1e-3)


def test_fast_cases_get_more_rounds_until_the_min_time(tiny_run):
    """tiny's --min-time-s default (0.2 s): a case's timed rounds go past --repeats until its calls add
    up to 0.2 s, so a millisecond call is not judged on three rounds."""
    from benchmarks.timing import MAX_REPEATS

    rows = [r for r in _rows(tiny_run[1]) if r["status"] == "ok"]
    cases = {}
    for r in rows:
        cases.setdefault((r["component"], r["dtype"], r["batch_size"], r["resolution"]), []).append(r)
    for key, group in cases.items():
        rounds = {int(r["repeats"]) for r in group}
        assert len(rounds) == 1, key  # interleaved: every impl ran every round
        n = rounds.pop()
        assert n <= MAX_REPEATS
        assert n >= (5 if group[0]["component"] == "pipeline" else 3 if "main" in group[0]["sweeps"] else 2), key
        # the loop stopped only once the timed calls reached 0.2 s (each round is at most the sum of the
        # maxima; scheduler_step reports per step, and its DDIM loop makes one call per step)
        units = int(group[0]["steps"]) if group[0]["per"] == "step" else 1
        assert units == 1 or group[0]["scheduler"] == "ddim", key
        assert n == MAX_REPEATS or n * units * sum(float(r["max_ms"]) for r in group) >= 200, key
    te = cases[("text_encoder", "fp32", "2", "")]
    assert int(te[0]["repeats"]) > 3, "a millisecond call should have been given more than --repeats rounds"
    assert "add up to 0.2 s" in (tiny_run[1] / "summary.md").read_text()


def test_interleaved_min_total_adds_rounds_and_stops_at_the_cap():
    from benchmarks.timing import interleaved

    class Clock:  # every call takes 10 ms
        def time_ms(self, fn):
            fn()
            return 10.0

        def sync(self):
            pass

    ran = []
    calls = {"a": lambda: ran.append("a"), "b": lambda: ran.append("b")}
    assert len(interleaved(calls, 0, 2, Clock(), min_total_ms=95)["a"]) == 5  # 5 rounds x 20 ms >= 95
    assert len(interleaved(calls, 0, 8, Clock(), min_total_ms=95)["b"]) == 8  # --repeats already more
    assert len(interleaved(calls, 0, 1, Clock(), min_total_ms=1e9, max_repeats=7)["a"]) == 7
    assert len(interleaved(calls, 0, 3, Clock())["a"]) == 3  # no minimum: exactly the repeats


def test_ratio_column_is_paired_against_diffusers(tiny_run):
    rows = [r for r in _rows(tiny_run[1]) if r["status"] == "ok"]
    by = {(r["component"], r["dtype"], r["batch_size"], r["resolution"], r["impl"]): r for r in rows}
    checked = 0
    for (comp, dtype, b, res, impl), r in by.items():
        if impl == "diffusers":
            assert float(r["ratio_vs_diffusers"]) == 1.0
            continue
        ref = by[(comp, dtype, b, res, "diffusers")]
        ratio = float(r["ratio_vs_diffusers"])
        # The median of per-repeat ratios lies within the extreme pairings of the two time lists.
        assert float(r["min_ms"]) / float(ref["max_ms"]) <= ratio * (1 + 1e-6)
        assert ratio <= float(r["max_ms"]) / float(ref["min_ms"]) * (1 + 1e-6)
        assert float(r["ratio_p10"]) <= ratio * (1 + 1e-6) <= float(r["ratio_p90"]) * (1 + 2e-6)
        checked += 1
    assert checked >= 12


def test_flops_match_between_impls_and_pipeline_sums_its_stages(tiny_run):
    rows = [r for r in _rows(tiny_run[1]) if r["status"] == "ok" and r["gflop"]]
    by = {(r["component"], r["dtype"], r["batch_size"], r["resolution"], r["impl"]): float(r["gflop"]) for r in rows}
    for (comp, dtype, b, res, impl), g in by.items():
        # the same network computes the same matmuls and convolutions in both implementations
        assert math.isclose(g, by[(comp, dtype, b, res, "diffusers")], rel_tol=1e-6), (comp, impl)
    te, unet = by[("text_encoder", "fp32", "2", "", "scratch")], by[("unet", "fp32", "2", "64", "scratch")]
    dec = by[("vae_decode", "fp32", "1", "64", "scratch")]
    assert math.isclose(by[("pipeline", "fp32", "1", "64", "scratch")], te + 2 * unet + dec, rel_tol=1e-5)


def test_pipeline_rows_carry_the_stage_breakdown(tiny_run):
    pipes = [r for r in _rows(tiny_run[1]) if r["component"] == "pipeline" and r["status"] == "ok"]
    assert len(pipes) == 4
    for r in pipes:
        stages = dict(kv.split("=") for kv in r["stages"].split(";"))
        assert set(stages) == {"text_encoder", "unet x2", "vae_decode", "other (scheduler, tokenizer, glue)"}
        inside = sum(float(stages[k]) for k in ("text_encoder", "unet x2", "vae_decode"))
        assert 0 < inside <= float(r["max_ms"]) * 1.01


def test_sweeps_and_memory_are_recorded(tiny_run):
    rows = [r for r in _rows(tiny_run[1]) if r["status"] == "ok"]
    res = {r["resolution"] for r in rows if "resolution" in r["sweeps"].split(";") and r["component"] == "unet"}
    assert res == {"32", "64"}
    batches = {r["batch_size"] for r in rows if "batch" in r["sweeps"].split(";") and r["component"] == "unet"}
    assert batches == {"2", "4"}  # images 1, 2 at the CFG batch
    main_rows = [r for r in rows if "main" in r["sweeps"].split(";")]
    for r in main_rows:
        assert r["mem_method"] == "subprocess_vmhwm" and float(r["peak_mem_mb"]) >= 0, r
        if r["component"] != "scheduler_step":
            assert float(r["weights_mb"]) > 0
    summary = (tiny_run[1] / "summary.md").read_text()
    assert "exponent k (time ~ pixels^k)" in summary


def test_sd2_preset_benches_both_impls_on_the_same_flops(tmp_path):
    """tiny-sd2 (GELU text tower, linear projections, per-level heads) takes tiny's quick defaults;
    both implementations run the same SD 2.x networks, so their counted FLOPs agree."""
    out = tmp_path / "sd2"
    rc = main(["bench", "--preset", "tiny-sd2", "--threads", "1", "--components", "text_encoder,unet",
               "--dtypes", "fp32", "--impls", "scratch,diffusers", "--repeats", "2", "--sweep-components", "unet",
               "--resolutions", "64", "--batch-sizes", "1", "--memory", "none", "--out", str(out)])
    assert rc == 0
    rows = [r for r in _rows(out) if r["status"] == "ok"]
    by = {(r["component"], r["batch_size"], r["resolution"], r["impl"]): float(r["gflop"]) for r in rows}
    assert {k[0] for k in by} == {"text_encoder", "unet"}
    for (comp, b, res, impl), g in by.items():
        assert g > 0 and math.isclose(g, by[(comp, b, res, "diffusers")], rel_tol=1e-6), (comp, impl)
    assert all(r["ratio_vs_diffusers"] for r in rows if r["impl"] == "scratch")


# --------------------------------------------------------------------------- skipped rows
def test_cudagraph_rows_are_skipped_on_the_cpu_with_the_reason(tiny_run):
    rows = _rows(tiny_run[1])
    graphed = [r for r in rows if r["impl"] == "scratch_cudagraph"]
    case = lambda r: (r["component"], r["dtype"], r["batch_size"], r["resolution"])  # noqa: E731
    assert sorted(map(case, graphed)) == sorted(case(r) for r in rows if r["impl"] == "scratch")  # a row per case
    for r in graphed:
        assert r["status"] == "skipped" and "a CUDA case (--device cuda)" in r["reason"], r
        assert r["median_ms"] == "" and r["peak_mem_mb"] == ""  # no figure claimed
    assert "scratch_cudagraph" in (tiny_run[1] / "summary.md").read_text()


def test_skipped_rows_have_a_reason(tmp_path):
    out = tmp_path / "skip"
    rc = main(["bench", "--preset", "tiny", "--threads", "1", "--components", "scheduler_step", "--dtypes", "fp32",
               "--impls", "scratch,scratch_compiled", "--repeats", "2", "--memory", "none", "--out", str(out)])
    assert rc == 0
    rows = _rows(out)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert [r["impl"] for r in skipped] == ["scratch_compiled"]
    assert "compiles the networks only" in skipped[0]["reason"]
    assert skipped[0]["median_ms"] == ""
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["ratio_vs_diffusers"] == "" for r in ok)  # no diffusers in this run: no ratio
    assert "Skipped or failed cases" in (out / "summary.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the no-GPU path does not apply")
def test_cuda_without_a_gpu_writes_skipped_rows(tmp_path):
    out = tmp_path / "cuda"
    rc = main(["bench", "--preset", "tiny", "--device", "cuda", "--dtypes", "fp16", "--out", str(out)])
    assert rc == 0
    rows = _rows(out)
    assert rows and all(r["status"] == "skipped" and "CUDA is not available" in r["reason"] for r in rows)
    assert all(r["median_ms"] == "" and r["peak_mem_mb"] == "" for r in rows)  # no figure claimed


def test_only_a_dtype_without_fast_arithmetic_is_skipped_as_too_slow():
    from benchmarks.cases import Case
    from benchmarks.runner import _too_slow

    class S:
        max_call_s = 30.0

    peaks = {d: {"peak_gflops": v} for d, v in (("fp32", 170.0), ("bf16", 350.0), ("fp16", 1.5))}
    why = _too_slow(S, Case("unet", "fp16", 1, 512), gflop=1606.0, peaks=peaks)
    assert why and "1,071 s per call" in why and "1/233 of bf16's" in why and "GPU case" in why
    assert _too_slow(S, Case("text_encoder", "fp16", 1, 0), gflop=20.0, peaks=peaks) is None  # 13 s: runs
    # fp32 and bf16 always run, however long the call (an sd15 pipeline is minutes on a CPU)
    assert _too_slow(S, Case("pipeline", "fp32", 1, 512), gflop=1e5, peaks=peaks) is None
    assert _too_slow(S, Case("unet", "bf16", 1, 512), gflop=1e5, peaks=peaks) is None


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, words", [
    (["--components", "unet,clip"], "unknown component 'clip'"),
    (["--dtypes", "fp8"], "unknown dtype 'fp8'"),
    (["--impls", "onnx"], "unknown candidate 'onnx'"),
    (["--impls", ""], "--impls is empty"),
    (["--batch-sizes", "0"], "--batch-sizes value must be >= 1"),
    (["--images", "0"], "--images must be >= 1"),
    (["--resolutions", "256,260"], "260 is not a positive multiple of 8"),
    (["--resolution", "100"], "100 is not a positive multiple of 8"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--min-time-s", "-1"], "--min-time-s must be a finite number >= 0"),
    (["--min-time-s", "nan"], "--min-time-s must be a finite number >= 0"),
    (["--scheduler", "heun"], "unknown scheduler 'heun'"),
])
def test_bad_input_exits_2_with_one_line(extra, words, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["bench", "--preset", "tiny", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not out.exists()


# --------------------------------------------------------------------------- CUDA path, mocked
class FakeEvent:
    clock = [0.0]

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        FakeEvent.clock[0] += 2.5  # every recorded event is 2.5 ms after the previous one
        self.t = FakeEvent.clock[0]

    def synchronize(self):
        assert self.t is not None

    def elapsed_time(self, end):
        return end.t - self.t


@pytest.fixture
def fake_cuda(monkeypatch):
    calls = []
    FakeEvent.clock = [0.0]
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append("sync"))
    state = {"allocated": 300 * 2**20, "peak": 0}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: state["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: (calls.append("reset"),
                                                                                 state.update(peak=state["allocated"])))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: state["peak"])
    return calls, state


def test_cuda_clock_times_with_events_between_synchronizations(fake_cuda):
    from benchmarks.timing import CudaClock, clock_for, interleaved

    calls, _ = fake_cuda
    assert isinstance(clock_for("cuda"), CudaClock)
    ran = []
    ms = CudaClock().time_ms(lambda: ran.append(1))
    assert ran == [1] and ms == 2.5 and calls[0] == "sync"
    times = interleaved({"a": lambda: ran.append("a"), "b": lambda: ran.append("b")}, warmup=1, repeats=3,
                        clock=CudaClock())
    assert ran[1:] == ["a", "b"] * 4  # warm-up round, then A B per repeat
    assert times == {"a": [2.5] * 3, "b": [2.5] * 3}


def test_cuda_stage_timer_resolves_events_after_the_call(fake_cuda):
    from benchmarks.timing import CudaClock

    timer = CudaClock().stage_timer()
    for _ in range(3):
        timer.start("unet")
        timer.stop("unet")
    timer.start("vae_decode")
    timer.stop("vae_decode")
    assert timer.totals() == {"unet": (7.5, 3), "vae_decode": (2.5, 1)}


def test_cuda_peak_memory_is_the_allocator_peak_above_the_memory_before(fake_cuda):
    from benchmarks.memory import cuda_peak_mb

    calls, state = fake_cuda

    def work():  # allocates 64 MiB transiently, then frees it
        state["peak"] = max(state["peak"], state["allocated"] + 64 * 2**20)

    assert cuda_peak_mb(work) == 64.0
    assert "reset" in calls and calls[-1] == "sync"


# --------------------------------------------------------------------------- CPU peak memory method
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_subprocess_peak_memory_grows_with_the_allocation():
    from benchmarks.memory import CHILD_ENV

    code = (
        "import json, torch\n"
        "from benchmarks.memory import measure_peak_mb\n"
        "def alloc(mib):\n"
        "    def run():\n"
        "        x = torch.ones(mib * 2**18)\n"  # float32: 4 bytes each
        "        y = x + 1\n"
        "        return float(y[0])\n"
        "    return run\n"
        "big = measure_peak_mb(alloc(96))\n"
        "small = measure_peak_mb(alloc(8))\n"  # after the big one: its pages must not be counted again
        "print(json.dumps([small, big]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **CHILD_ENV}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    small, big = json.loads(proc.stdout)
    assert 180 <= big <= 220, big  # two live 96 MiB tensors
    assert 12 <= small <= 24, small  # two live 8 MiB tensors, not the freed 192 MiB


# --------------------------------------------------------------------------- statistics
def test_growth_exponent_recovers_a_power_law():
    from benchmarks.timing import fit_growth_exponent

    pixels = [256**2, 384**2, 512**2, 768**2]
    assert math.isclose(fit_growth_exponent(pixels, [3e-4 * p**1.25 for p in pixels]), 1.25, rel_tol=1e-9)
    assert fit_growth_exponent([512**2], [10.0]) is None  # one point fits nothing


def test_paired_ratio_cancels_drift_that_hits_both_impls():
    from benchmarks.timing import paired_ratio, summarize

    drift = [1.0, 1.5, 3.0, 1.2, 2.5]  # the machine slows down and recovers between rounds
    ours, theirs = [8.0 * d for d in drift], [10.0 * d for d in drift]
    assert math.isclose(paired_ratio(ours, theirs), 0.8, rel_tol=1e-12)
    s = summarize(ours)
    assert s["median_ms"] == 8.0 * 1.5 and s["p10_ms"] <= s["median_ms"] <= s["p90_ms"]
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_flops_are_counted_on_meta_copies_including_attention():
    from benchmarks.flops import count_gflop, meta_clone

    lin = torch.nn.Linear(64, 32)
    meta = meta_clone(lin)
    assert meta.weight.is_meta and not lin.weight.is_meta  # the original keeps its data
    x = torch.empty(4, 64, device="meta")
    assert math.isclose(count_gflop(lambda: meta(x)), 2 * 4 * 64 * 32 / 1e9)
    q = torch.empty(1, 2, 16, 8, device="meta")  # attention: QK^T and AV, 2 * 2*16*16*8 each head
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert math.isclose(count_gflop(lambda: sdpa(q, q, q)), 2 * 2 * (2 * 16 * 16 * 8) / 1e9)
