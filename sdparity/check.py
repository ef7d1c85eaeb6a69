"""`sdparity check`: the parity gate (parity.gate), its run folder and its verdict."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from sdparity.common import UsageError, add_gate_options, gate_settings, progress_printer


def add_parser(sub) -> None:
    from parity.gate import GATE_COMPONENTS

    p = sub.add_parser("check", help="the parity gate: candidates vs diffusers, component by component")
    add_gate_options(p, f"comma list of {', '.join(GATE_COMPONENTS)} (default all = every one but train)",
                     "comma list of fp32, fp16, bf16 (default fp32)")
    p.add_argument("--candidates", default=None,
                   help="comma list of candidates to gate (built-in names, installed entry points, or "
                        "package.module:factory; see `sdparity candidates`; default scratch)")
    p.add_argument("--candidate", dest="candidates_one", action="append", default=None,
                   help="one candidate (repeatable); joins --candidates")
    p.add_argument("--informational", default="", help="comma list of candidates reported but not gated")
    p.add_argument("--exact", action="store_true",
                   help="alias of --candidates scratch-exact: the scratch networks in exact mode (NCHW, "
                        "diffusers' kernels: bit-identical) instead of the default fast mode")
    p.add_argument("--tolerances", default=None, help="a tolerance TOML file replacing parity/tolerances.toml")
    p.add_argument("--out", default=None, help="run folder (default reports/check-<time>)")
    p.add_argument("--junit-xml", default=None, metavar="FILE",
                   help="also write the gate as JUnit XML (testsuite per component, testcase per candidate x "
                        "dtype x mode x scheduler group; see docs/pytest-plugin.md)")
    p.add_argument("--against", default=None, metavar="DIR",
                   help="compare the candidates with a golden record (sdparity record) instead of a live diffusers "
                        "run; the gate's settings come from the record (docs/records.md)")
    p.add_argument("--profile", default="", help="with --against: judge every row by this tolerance profile "
                   "(e.g. cross: another device or library version; parity/tolerances.toml)")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="run the i-th of N deterministic parts of the gate's work units (1 <= i <= N); the run "
                        "folder gets run.json for `sdparity merge` (docs/sharding.md)")
    p.add_argument("--force", action="store_true", help="replace --out (and --junit-xml) if it exists")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)
    from sdparity.record import mark_given

    mark_given(p)  # --against: an option given that differs from the record is an error


def candidates_of(args) -> list[str]:
    chosen = [c for c in (args.candidates or "").split(",") if c.strip()] + list(args.candidates_one or [])
    if args.exact:
        chosen = ["scratch-exact" if c == "scratch" else c for c in chosen] or ["scratch-exact"]
    return [c.strip() for c in chosen] or ["scratch"]


def settings_of(args):
    return gate_settings(args, candidates=candidates_of(args), informational=args.informational,
                         tolerances=args.tolerances)


def run(args) -> int:
    from parity import report
    from parity.gate import load_candidates, run_gate
    from parity.outputs import check_target
    from parity.tolerances import Table

    settings = settings_of(args)
    record = None
    if args.against is not None:
        from parity.record import Record
        from sdparity.record import against_settings

        record = Record.open(args.against, profile=args.profile)
        settings = against_settings(args, settings, record)
    elif args.profile:
        raise UsageError("--profile is for --against (a record); a candidate names its own profile")
    shard = None
    if args.shard is not None:
        from parity.shard import parse_shard

        shard = parse_shard(args.shard)
    out = Path(args.out) if args.out else Path("reports") / time.strftime("check-%Y%m%d-%H%M%S")
    check_target(out, "dir", args.force)  # before any work
    junit = check_target(args.junit_xml, "file", args.force, option="--junit-xml") if args.junit_xml else None
    if junit is not None and junit.absolute() == out.absolute():
        raise UsageError(f"--junit-xml {args.junit_xml!r} is the --out folder; name a file")
    Table.load(settings.tolerances)
    load_candidates(settings)  # a bad candidate: one line, before any model is built
    extra = None
    if shard is not None:
        from parity.shard import run_json, run_shard

        result = run_shard(settings, *shard, progress=progress_printer("check", args.quiet), record=record)
        extra = {"run.json": run_json(result, *shard, reference=record.reference if record else "live")}
    else:
        result = run_gate(settings, progress_printer("check", args.quiet), record=record)
    paths = report.write_check(result, out, plots=not args.no_plots, force=args.force, extra=extra)
    if junit is not None:  # after the run folder: --junit-xml may lie inside it
        from parity.junit import write_junit

        paths["junit"] = write_junit(result, junit, force=args.force)
    return verdict(result, paths)


def verdict(result, paths: dict) -> int:
    from parity.report import failure_line, localize_hints

    failed = result.failed
    for r in failed[:50]:
        print(failure_line(r), file=sys.stderr)
    if len(failed) > 50:
        print(f"... and {len(failed) - 50} more failing rows in {paths['csv']}", file=sys.stderr)
    for hint in localize_hints(result):
        print(f"  localise it: {hint}", file=sys.stderr)
    compared = len(result.compared)
    informational = sum(1 for r in result.rows if r.failed and not r.gating)
    skipped = sum(1 for r in result.rows if r.status == "skipped")
    extra = f", {informational} informational failures" if informational else ""
    print(f"{'FAIL' if failed else 'PASS'}: {compared - len(failed) - informational}/{compared} comparisons within "
          f"tolerance ({skipped} skipped{extra}) in {result.elapsed_s:.1f} s; report: {paths['summary']}")
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    from sdparity.main import main

    sys.exit(main(["check", *sys.argv[1:]]))
