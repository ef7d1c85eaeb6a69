"""`sdparity localize`: the per-layer divergence table of one candidate network and its first
layer over tolerance (parity.localize)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from scratch_sd.config import PRESETS
from sdparity.common import UsageError, add_prediction_type_option, check_device, seed as seed_arg


def add_parser(sub) -> None:
    p = sub.add_parser("localize", help="per-layer divergence table of one network, first layer over tolerance")
    p.add_argument("--component", required=True, help="text_encoder | vae | unet")
    p.add_argument("--candidate", default="scratch", help="the candidate whose network is localised (default scratch)")
    p.add_argument("--exact", action="store_true", help="alias of --candidate scratch-exact")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--preset", default="tiny", help=f"{' | '.join(PRESETS)} (default tiny)")
    p.add_argument("--model", default=None, help="a local diffusers folder or single checkpoint file")
    add_prediction_type_option(p)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--timestep", type=float, default=745.3, help="UNet timestep (default 745.3)")
    p.add_argument("--threshold", type=float, default=None, help="rel_l2 over which a layer diverges "
                   "(default: [localize] in the tolerance file; at bf16/fp16 a layer must also be more than "
                   "[localize.max_ratio] times as wrong against fp32 as the reference)")
    p.add_argument("--tolerances", default=None, help="tolerance TOML file")
    p.add_argument("--out", default=None, help="folder for localize.csv and localize.md")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--all", action="store_true", help="print every layer, not only up to the first divergence")
    p.set_defaults(func=run)


def _validate(args) -> None:
    from scratch_sd.config import PRESETS
    from scratch_sd.names import DTYPES, NETWORKS

    if args.component not in NETWORKS:
        raise UsageError(f"unknown component {args.component!r}; localize takes one of {', '.join(NETWORKS)}")
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; known: {', '.join(DTYPES)}")
    check_device(args.device)
    if args.model is None and args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"--model path does not exist: {args.model}")
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold > 0):
        raise UsageError(f"--threshold must be a finite number > 0 (got {args.threshold})")
    if not math.isfinite(args.timestep) or not 0 <= args.timestep <= 999:
        raise UsageError(f"--timestep must be a finite number in [0, 999], the training schedule "
                         f"(got {args.timestep})")


def run(args) -> int:
    from parity import candidates
    from parity.gate import Gated
    from parity.localize import first_divergence, format_table, localize, verdict
    from parity.outputs import check_target, writing_dir
    from parity.references import build_references, quiet_libraries
    from parity.rows import to_csv
    from parity.tolerances import Table

    _validate(args)
    name = "scratch-exact" if args.exact and args.candidate == "scratch" else args.candidate
    if args.out:
        check_target(args.out, "dir", args.force)
    table = Table.load(args.tolerances)
    threshold = args.threshold if args.threshold is not None else table.localize_threshold(args.dtype)
    cand = Gated(name, candidates.load(name))
    if args.component not in cand.candidate.components:
        raise UsageError(f"candidate {name!r} does not provide {args.component} (it has "
                         f"{', '.join(cand.candidate.components)})")
    quiet_libraries()
    refs = build_references(args.preset, args.model, (args.component,), seed=args.seed,
                            prediction_type=args.prediction_type)
    max_ratio = table.localize_max_ratio(args.dtype)
    rows, note = localize(args.component, args.dtype, refs, cand, args.seed, args.timestep, threshold, args.device,
                          max_ratio=max_ratio)
    print(format_table(rows, args.all))
    text = verdict(rows, args.component, args.dtype, threshold, max_ratio)
    print(f"{text} [{name}; {note}]")
    if args.out:
        cols = ["order", "candidate", "reference", "shape", "max_abs", "rel_l2", "psnr_db", "over", "missing",
                "error_ratio"]
        with writing_dir(args.out, args.force) as tmp:
            (tmp / "localize.csv").write_text(to_csv([r.__dict__ for r in rows], cols), encoding="utf-8")
            (tmp / "localize.md").write_text(f"# localize {name} {args.component} {args.dtype}\n\n{text}\n\n{note}\n\n"
                                             f"```\n{format_table(rows, True)}\n```\n", encoding="utf-8")
    return 1 if first_divergence(rows) is not None else 0


if __name__ == "__main__":  # pragma: no cover
    from sdparity.main import main

    sys.exit(main(["localize", *sys.argv[1:]]))
