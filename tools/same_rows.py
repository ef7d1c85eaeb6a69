"""Do two parity.csv files hold the same numbers? `python tools/same_rows.py A.csv B.csv [--candidate C]`

Rows are matched on what identifies them (candidate, component, dtype, mode, scheduler, step, tensor,
case) and every other column but run_id and reference must be equal as text. CI uses it to show that
`check --against` a golden record reports exactly what the live gate reports. Exit 0 equal, 1 not.
"""
from __future__ import annotations

import argparse
import csv
import sys

KEY = ("candidate", "component", "dtype", "mode", "scheduler", "step", "tensor", "case")
NAMES = KEY + ("nth",)
IGNORED = ("run_id", "reference")


def rows(path: str, candidate: str | None) -> dict[tuple, dict]:
    with open(path, newline="", encoding="utf-8") as f:
        out, seen = {}, {}
        for r in csv.DictReader(f):
            if candidate is None or r["candidate"] == candidate:
                key = tuple(r[k] for k in KEY)
                seen[key] = seen.get(key, -1) + 1  # rows sharing an identity are matched in order
                out[key + (seen[key],)] = {k: v for k, v in r.items() if k not in IGNORED}
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--candidate", default=None, help="compare only this candidate's rows")
    args = p.parse_args(argv)
    a, b = rows(args.a, args.candidate), rows(args.b, args.candidate)
    only = [k for k in a if k not in b] + [k for k in b if k not in a]
    diff = [k for k in a if k in b and a[k] != b[k]]
    if not a or only or diff:
        for k in only[:5]:
            print(f"row only in {'A' if k in a else 'B'}: {dict(zip(NAMES, k))}")
        for k in diff[:5]:
            cols = [c for c in a[k] if a[k][c] != b[k].get(c)]
            print(f"row differs {dict(zip(NAMES, k))}: " + ", ".join(f"{c} {a[k][c]!r} vs {b[k][c]!r}" for c in cols))
        print(f"NOT EQUAL: {len(a)} vs {len(b)} rows, {len(only)} unmatched, {len(diff)} differ")
        return 1
    print(f"EQUAL: {len(a)} rows, every column but {', '.join(IGNORED)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
