"""`sdparity` command line.

Exit codes (design.md): 0 pass, 1 a tolerance or a check failed, 2 bad usage or bad
input, with a one-line reason on stderr and no traceback.

Library warnings (Python's `warnings`) are recorded while a command runs: after a finished run
they are printed one line each; a refusal (exit 2) prints its one line only. SIGTERM is an
interrupt like SIGINT, so a killed run still removes its temporaries.

Each subcommand lives in its own module exposing `add_parser(subparsers)` (which sets
`func` on its parser); this file only dispatches and maps errors to exit codes.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import warnings

from sdparity.common import UsageError

# subcommand -> module that implements it
SUBCOMMANDS = {
    "check": "sdparity.check",
    "localize": "sdparity.localize",
    "candidates": "sdparity.candidates",
    "bench": "sdparity.bench",
    "generate": "sdparity.generate",
    "convert": "sdparity.convert",
    "train": "sdparity.train",
    "ablation": "sdparity.ablation",
    "merge": "sdparity.merge",
    "record": "sdparity.record",
    "sensitivity": "sdparity.sensitivity",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """All subcommands, or (with `only`) just that one's module imported and the rest as stubs."""
    parser = _Parser(prog="sdparity", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see sdparity {name} --help)")
            continue
        importlib.import_module(module).add_parser(sub)
    return parser


def input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2), not a bug."""
    from scratch_sd.convert.common import ConversionError
    from scratch_sd.config import UnsupportedConfig
    from scratch_sd.storage import CheckpointError

    return (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
            ConversionError, UnsupportedConfig, CheckpointError, ValueError)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    old_term = None
    if threading.current_thread() is threading.main_thread():
        old_term = signal.signal(signal.SIGTERM, _terminate)
    try:
        with warnings.catch_warnings(record=True) as caught:
            rc = _run(argv)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if rc != 2:
        for text in dict.fromkeys(f"{w.category.__name__}: {_one_line(w.message)}" for w in caught):
            print(f"sdparity: warning: {text}", file=sys.stderr)
    return rc


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _run(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        # Import only the chosen subcommand's module (imports of diffusers cost seconds).
        parser = build_parser(command if command in SUBCOMMANDS else "")
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sdparity: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - mapped to exit codes below
        if isinstance(exc, input_errors()):
            print(f"sdparity: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        if os.environ.get("SDPARITY_TRACEBACK"):
            raise
        print(f"sdparity: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(set SDPARITY_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 3


def _one_line(exc) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    return " ".join(text.split())


if __name__ == "__main__":
    # `python -m sdparity.main`: run the imported module's main, so that the UsageError the
    # subcommands import is the same class as the one caught here (not __main__'s copy).
    from sdparity.main import main as _main

    sys.exit(_main())
