"""`sdparity ablation`: what each optimisation of the scratch networks buys, change by change
(benchmarks/ablation.py)."""
from __future__ import annotations

import sys

from scratch_sd.config import PRESETS
from sdparity.common import nonnegative_int, positive_int, seed as seed_arg


def add_parser(sub) -> None:
    p = sub.add_parser("ablation", help="time and memory of the scratch networks' optimisations, change by change")
    p.add_argument("--preset", default="sd15", choices=tuple(PRESETS))
    p.add_argument("--components", default="unet,vae_decode")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--warmup", type=nonnegative_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--out", default="reports/ablation")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from benchmarks.ablation import AblationSettings, run as run_ablation

    return run_ablation(AblationSettings(args.preset, args.components, args.dtypes, args.warmup, args.repeats,
                                         args.memory, args.threads, args.seed, args.out, args.force))


if __name__ == "__main__":  # pragma: no cover
    from sdparity.main import main

    sys.exit(main(["ablation", *sys.argv[1:]]))
