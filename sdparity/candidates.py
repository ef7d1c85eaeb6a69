"""`sdparity candidates`: what can be gated here — built-ins and installed plug-ins — and why one
cannot run (a missing optional dependency, a plug-in that does not load)."""
from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("candidates", help="list the candidates (built-in, installed) and whether they can run here")
    p.set_defaults(func=run)


def run(args) -> int:
    from parity.candidates import listing

    rows = listing()
    width = max(len(r.name) for r in rows)
    for r in rows:
        state = "ok" if r.unavailable is None else f"unavailable: {r.unavailable}"
        comps = ",".join(r.components) or "-"
        print(f"{r.name:<{width}}  {comps:<37} profile {r.profile or '-':<6} {r.source:<10}  {state}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    from sdparity.main import main

    sys.exit(main(["candidates", *sys.argv[1:]]))
