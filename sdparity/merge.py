"""`sdparity merge RUN_DIR... --out DIR`: the shards of one `sdparity check --shard i/N` run joined
into one run folder (parity.csv, summary.md, the error plot), rows in unit order (parity.shard)."""
from __future__ import annotations

import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="join the run folders of `sdparity check --shard i/N` into one")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="the shards' run folders (each with run.json)")
    p.add_argument("--out", required=True, help="the merged run folder")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=run)


def run(args) -> int:
    from parity import report
    from parity.outputs import check_target
    from parity.shard import merge

    out = check_target(args.out, "dir", args.force)
    result = merge([Path(r) for r in args.runs])
    paths = report.write_check(result, out, plots=not args.no_plots, force=args.force)
    from sdparity.check import verdict

    return verdict(result, paths)


if __name__ == "__main__":  # pragma: no cover
    from sdparity.main import main

    sys.exit(main(["merge", *sys.argv[1:]]))
