"""`sdparity bench`: time and measure every component, each implementation against diffusers in
the same run (benchmarks.runner); `--impls` takes built-in impls and any candidate."""
from __future__ import annotations

from sdparity.common import UsageError, progress_printer, seed as seed_arg


def add_parser(sub) -> None:
    from benchmarks import cases as C
    from benchmarks.settings import PRESET_DEFAULTS
    from benchmarks.timing import MAX_REPEATS

    p = sub.add_parser("bench", help="time and measure every component, each implementation vs diffusers")
    p.add_argument("--preset", choices=sorted(PRESET_DEFAULTS), default="tiny")
    p.add_argument("--model", default=None, help="a local diffusers folder or single file (sizes as sd15)")
    p.add_argument("--components", default=",".join(C.CASE_COMPONENTS),
                   help=f"comma list of {', '.join(C.CASE_COMPONENTS)}")
    p.add_argument("--impls", default="scratch,diffusers",
                   help=f"comma list of {', '.join(C.IMPLS)} and any candidate (see `sdparity candidates`)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--resolution", type=int, default=None, help="pixels per side of the main cases (preset's size)")
    p.add_argument("--images", type=int, default=1, help="images per call in the main cases (CFG doubles unet/text)")
    p.add_argument("--resolutions", default=None, help="resolution sweep, pixels per side (comma list)")
    p.add_argument("--batch-sizes", default=None, help="batch sweep, images per call (comma list)")
    p.add_argument("--batch-resolution", type=int, default=None, help="resolution of the batch sweep")
    p.add_argument("--sweep-components", default="unet", help="components the sweeps run on (comma list)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--min-time-s", type=float, default=None,
                   help=f"more rounds than --repeats (up to {MAX_REPEATS}, timing.MAX_REPEATS) until a case's timed "
                        "calls add up to this many seconds (tiny 0.2, sd15 5; 0: exactly --repeats)")
    p.add_argument("--sweep-warmup", type=int, default=None)
    p.add_argument("--sweep-repeats", type=int, default=None)
    p.add_argument("--pipeline-warmup", type=int, default=None)
    p.add_argument("--pipeline-repeats", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps of pipeline and scheduler_step")
    p.add_argument("--scheduler", default="ddim", help="scheduler of pipeline and scheduler_step")
    p.add_argument("--memory", default="subprocess",
                   help="CPU peak memory: subprocess (one per impl, benchmarks/memory.py) or none")
    p.add_argument("--memory-warmup", type=int, default=None, help="calls of a case before its memory is measured")
    p.add_argument("--memory-components", default=None, help="components whose memory is measured (comma list)")
    p.add_argument("--memory-scope", default=None, help="cases whose memory is measured: main or all")
    p.add_argument("--max-call-s", type=float, default=30.0,
                   help="for a dtype without fast arithmetic here (matmul peak < 1/10 of the best dtype's, e.g. fp16 "
                        "on a CPU): skip a case whose estimated time per call (GFLOP / that peak) exceeds this")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--out", default=None, help="output folder (default reports/bench-RUN_ID)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


SETTINGS = ("preset", "model", "components", "impls", "dtypes", "device", "resolution", "images", "resolutions",
            "batch_sizes", "batch_resolution", "sweep_components", "warmup", "repeats", "min_time_s", "sweep_warmup",
            "sweep_repeats", "pipeline_warmup", "pipeline_repeats", "steps", "scheduler", "memory", "memory_warmup",
            "memory_components", "memory_scope", "max_call_s", "threads", "seed", "out")


def settings_of(args):
    from benchmarks.settings import BenchSettings, BenchSettingsError

    try:
        return BenchSettings.make(**{k: getattr(args, k) for k in SETTINGS})
    except BenchSettingsError as exc:
        raise UsageError(str(exc)) from None


def run(args) -> int:
    from benchmarks import runner
    from benchmarks.workload import is_candidate
    from parity import candidates
    from parity.outputs import check_target

    s = settings_of(args)
    for impl in s.impls:  # a candidate that does not load is bad input, before any work
        if is_candidate(impl):
            candidates.load(impl)
    if s.out is not None:
        check_target(s.out, "dir", args.force, "--out")
    return runner.run(s, progress_printer("bench", args.quiet), force=args.force)
