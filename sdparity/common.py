"""What the subcommands share: the usage error, and parsing of option values.

Numeric options are range-checked when argparse reads them (`type=seed`, `type=positive_int`,
...): a bad value is "argument --seed: ..." on one line, exit 2, before any work.
"""
from __future__ import annotations

import argparse
import math
import sys

from scratch_sd.config import PREDICTION_TYPES, PRESETS

# torch.Generator.manual_seed takes 64-bit seeds; runs derive more seeds from the base one (seed + i
# per network check, + 1 and + 2 for the zoo's VAE and UNet, + 1234 for train's sampling), so the
# largest accepted seed leaves 2**16 of room below 2**64.
SEED_LIMIT = 2 ** 64 - 2 ** 16


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


# --------------------------------------------------------------------------- argparse types
def _number(text: str, kind):
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None


def seed(text: str) -> int:
    """A seed: an integer with 0 <= seed < SEED_LIMIT (torch's 64-bit range, less room for derived seeds)."""
    v = _number(text, int)
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed must be an integer with 0 <= seed < 2**64 - 2**16 "
                                         f"(torch's 64-bit generator seeds, with room for the seeds a run "
                                         f"derives from it), got {text}")
    return v


def positive_int(text: str) -> int:
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return v


def nonnegative_int(text: str) -> int:
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return v


def finite_float(text: str) -> float:
    v = _number(text, float)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def positive_float(text: str) -> float:
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def fraction(text: str) -> float:
    """A number in [0, 1] (an accuracy, a probability)."""
    v = finite_float(text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return v


def check_sizes(height: int | None, width: int | None) -> None:
    """--height / --width (None: the model's default): positive multiples of 8, both reported as given."""
    bad = [n for n, v in (("height", height), ("width", width)) if v is not None and (v <= 0 or v % 8)]
    if bad:
        given = ", ".join(f"--{n} {'(the model default)' if v is None else v}"
                          for n, v in (("height", height), ("width", width)))
        raise UsageError(f"{' and '.join('--' + n for n in bad)} must be a positive multiple of 8 (the VAE "
                         f"downsamples by 8); given: {given}")


def add_prediction_type_option(p) -> None:
    """--prediction-type: what a single file's UNet predicts (no weight shows it; a folder's scheduler
    config and a preset say it themselves)."""
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="for a --model single file: what its UNet predicts (default: the file's metadata, "
                        "else diffusers' from_single_file rule: SD 2.x v_prediction unless global_step is "
                        "875000, SD 1.x epsilon)")


def add_gate_options(p, components_help: str, dtypes_help: str) -> None:
    """The options that fix what a gate runs (`check` and `record` take the same ones; a record
    stores them, `check --against` reads them back): preset or model, components, dtypes, device,
    schedulers, steps, size, seeds, modes, clip_skip."""
    p.add_argument("--preset", default="tiny", help=f"{' | '.join(PRESETS)} (default tiny)")
    p.add_argument("--model", default=None, help="a local diffusers folder or a single .safetensors/.ckpt file")
    p.add_argument("--components", default="all", help=components_help)
    p.add_argument("--dtypes", default="fp32", help=dtypes_help)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--scheduler", default="pndm", help="scheduler for the pipeline runs, or 'all' (default pndm)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per pipeline run (tiny 4, sd15 2)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (tiny 64, sd15 256)")
    p.add_argument("--seed", type=seed, default=0, help="base seed (default 0)")
    p.add_argument("--num-seeds", type=int, default=2, help="seeds per direct network check (default 2)")
    p.add_argument("--modes", default="txt2img,img2img", help="pipeline modes (default txt2img,img2img)")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="diffusers' clip_skip in every pipeline run: prompt embeddings N layers before the "
                        "text encoder's last, through its final LayerNorm (default: none)")
    add_prediction_type_option(p)


def gate_settings(args, **extra):
    """parity.gate.GateSettings from the options of `add_gate_options` (plus `extra` fields)."""
    from parity.gate import GateSettings

    return GateSettings.make(preset=args.preset, model=args.model, components=args.components, dtypes=args.dtypes,
                             device=args.device, scheduler=args.scheduler, steps=args.steps, size=args.size,
                             seed=args.seed, num_seeds=args.num_seeds, modes=args.modes, clip_skip=args.clip_skip,
                             prediction_type=args.prediction_type, **extra)
