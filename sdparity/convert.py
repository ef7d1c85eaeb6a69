"""`sdparity convert`: between a diffusers folder, an original single file and a scratch checkpoint.

    sdparity convert v1-5-pruned-emaonly.safetensors --to diffusers --out sd15/      # single file -> folder
    sdparity convert sd15/ --to single --out sd15.safetensors                         # folder -> single file
    sdparity convert sd15.ckpt --to scratch --out sd15-scratch.safetensors --ema      # either -> scratch
    sdparity convert --preset tiny --to single --out tiny.safetensors                 # the seeded preset

Reading is strict (scratch_sd.loading: every tensor used, or dropped by a named rule that is
reported). Writing goes to a temporary name beside the target, moved into place at the end
(parity.outputs), so a failure leaves nothing half-written; an existing target is replaced only
with --force.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sdparity.common import UsageError, add_prediction_type_option, seed as seed_arg

TARGETS = ("diffusers", "single", "scratch")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert between a diffusers folder, an original single file and a "
                                       "scratch checkpoint")
    p.add_argument("src", nargs="?", default=None,
                   help="a diffusers folder, an original .safetensors/.ckpt single file, or a scratch checkpoint")
    p.add_argument("--preset", default=None, help="instead of src: the embedded preset (tiny, sd15, tiny-sd2, ...) with the "
                                                  "seeded weights `sdparity check --preset` gates")
    p.add_argument("--seed", type=seed_arg, default=0, help="--preset: the weights' seed (default 0, as check's)")
    p.add_argument("--to", required=True, choices=TARGETS, help="diffusers (a folder), single (.safetensors or "
                                                                 ".ckpt), scratch (.safetensors with our keys)")
    p.add_argument("--out", required=True, help="the folder or file to write")
    add_prediction_type_option(p)
    p.add_argument("--ema", action="store_true", help="single-file source: take the UNet's EMA weights (model_ema.*)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="cast floating tensors (default: keep the source's dtypes)")
    p.add_argument("--variant", default=None, help="diffusers source: the weights variant to read (e.g. fp16)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="--to diffusers: the tokenizer folder to copy (default: the source folder's; for a "
                        "single file, CLIP's shipped vocabulary)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _check(args) -> tuple[Path, Path]:
    from parity.outputs import check_target

    from scratch_sd.config import PRESETS

    if (args.src is None) == (args.preset is None):
        raise UsageError("give one source: a model path or --preset NAME")
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
        if args.ema or args.variant or args.prediction_type:
            raise UsageError("--ema, --variant and --prediction-type read a model file; a --preset fixes its own")
    src, out = Path(args.src or f"preset:{args.preset}"), Path(args.out)
    if args.preset is None and not src.exists():
        raise FileNotFoundError(2, "No such model file or folder", str(src))
    if args.preset is None and out.exists() and out.resolve() == src.resolve():
        raise UsageError("--out is the source itself")
    if args.to == "single" and out.suffix.lower() not in (".safetensors", ".ckpt"):
        raise UsageError(f"--to single writes a .safetensors or .ckpt file, not {out.name!r}")
    if args.to == "scratch" and out.suffix.lower() != ".safetensors":
        raise UsageError(f"--to scratch writes a .safetensors file, not {out.name!r}")
    if args.to == "diffusers" and out.suffix.lower() in (".safetensors", ".ckpt", ".bin"):
        raise UsageError(f"--to diffusers writes a folder, not a file ({out.name!r})")
    check_target(out, "dir" if args.to == "diffusers" else "file", args.force)
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(2, "No such tokenizer folder", args.tokenizer)
    return src, out


# --------------------------------------------------------------------------- run
def run(args) -> int:
    from scratch_sd import loading

    src, out = _check(args)
    if args.preset is not None:
        from parity.export import preset_model

        model = preset_model(args.preset, args.seed)
    else:
        model = loading.read_model(src, ema=args.ema, variant=args.variant, prediction_type=args.prediction_type)
    notes = list(model.notes)
    if args.to == "diffusers":
        from parity.export import write_diffusers_folder

        notes += write_diffusers_folder(model, out, Path(args.tokenizer) if args.tokenizer else None, args.dtype,
                                        args.force)
    else:
        from parity.outputs import writing_file

        export = loading.export_single_file if args.to == "single" else loading.export_scratch
        with writing_file(out, args.force) as tmp:
            export(model, tmp, dtype=args.dtype)
    for text in notes:
        print(f"sdparity: note: {text}", file=sys.stderr)
    what = {"diffusers": "diffusers folder", "single": "single file", "scratch": "scratch checkpoint",
            "preset": "embedded preset"}
    print(f"wrote {out}: {what[args.to]} from the {what[model.kind]} {src} (config {model.cfg.name}, "
          f"{len(model.state)} scratch tensors, dtype {args.dtype or 'as the source'}"
          f"{', EMA UNet' if args.ema else ''})")
    return 0
