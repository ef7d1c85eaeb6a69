"""`sdparity record`: the reference side of the gate (diffusers) stored as a golden record
(parity.record; docs/records.md), for `sdparity check --against DIR`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sdparity.common import UsageError, add_gate_options, gate_settings, progress_printer

# the gate options a record fixes: (argparse dest, GateSettings field, the parser's default)
RECORDED = (("preset", "preset", "tiny"), ("model", "model", None), ("components", "components", "all"),
            ("dtypes", "dtypes", "fp32"), ("scheduler", "schedulers", "pndm"), ("steps", "steps", None),
            ("size", "size", None), ("seed", "seed", 0), ("num_seeds", "num_seeds", 2),
            ("modes", "modes", "txt2img,img2img"), ("clip_skip", "clip_skip", None),
            ("prediction_type", "prediction_type", None))


def add_parser(sub) -> None:
    from parity.gate import GATE_COMPONENTS

    p = sub.add_parser("record", help="store the reference side of the gate (diffusers) as a golden record")
    add_gate_options(p, f"comma list of {', '.join(GATE_COMPONENTS)} (default all)",
                     "comma list of fp32, fp16, bf16 (fp32 is always recorded)")
    p.add_argument("--out", default=None, help="record folder (default reports/record-<time>)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from parity.outputs import check_target
    from parity.record import write_record

    settings = gate_settings(args)
    out = Path(args.out) if args.out else Path("reports") / time.strftime("record-%Y%m%d-%H%M%S")
    check_target(out, "dir", args.force)
    t0 = time.time()
    manifest = write_record(settings, out, progress_printer("record", args.quiet), force=args.force)
    size = sum(f["bytes"] for f in manifest["files"].values())
    print(f"recorded {manifest['id']}: {len(manifest['files'])} tensor files, {size / 1e6:.2f} MB, "
          f"{time.time() - t0:.1f} s; {out}")
    return 0


class _Given(argparse._StoreAction):
    """A store action that also notes, in `args._given`, that the option was on the command line."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace._given = getattr(namespace, "_given", set()) | {self.dest}


def mark_given(parser) -> None:
    """The options a record fixes remember whether they were given (`check --against`: a given
    option that differs from the record is an error, even at its default value)."""
    dests = {d for d, _f, _v in RECORDED}
    for action in parser._actions:
        if action.dest in dests and type(action) is argparse._StoreAction:
            action.__class__ = _Given


def against_settings(args, settings, record):
    """`check --against`: the record's settings with the candidate side's (candidates, informational,
    tolerances, device); an option given on the command line that differs from the record is an error."""
    recorded = record.settings_with()
    for dest, field, default in RECORDED:
        given = getattr(args, dest, default)
        if dest in getattr(args, "_given", set()) and getattr(settings, field) != getattr(recorded, field):
            shown = ",".join(map(str, v)) if isinstance(v := getattr(recorded, field), tuple) else v
            raise UsageError(f"--{dest.replace('_', '-')} {given} conflicts with record {record.id}, which was made "
                             f"with {field} {shown}; drop the option (a record fixes the gate's settings)")
    return record.settings_with(candidates=settings.candidates, informational=settings.informational,
                                tolerances=settings.tolerances, device=settings.device)


if __name__ == "__main__":  # pragma: no cover
    from sdparity.main import main

    sys.exit(main(["record", *sys.argv[1:]]))
