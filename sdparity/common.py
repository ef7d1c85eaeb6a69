"""What the subcommands share: the usage error, and parsing of option values."""
from __future__ import annotations

import sys


class UsageError(Exception):
    """Bad usage or bad input: exit 2 with this one-line message."""


def names(value: str, known, what: str) -> list[str]:
    """A comma list of known names (duplicates dropped), or a UsageError naming the option."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"--{what} is empty")
    bad = [v for v in items if v not in known]
    if bad:
        raise UsageError(f"unknown {what.rstrip('s')} {bad[0]!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(items))


def check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; known: cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this torch build")
    return device


def progress_printer(prefix: str, quiet: bool = False):
    """A progress callable writing `[prefix] msg` lines to stderr (None when quiet)."""
    if quiet:
        return None
    if prefix == "bench":  # benchmarks.runner.Progress prefixes its own elapsed time
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)
