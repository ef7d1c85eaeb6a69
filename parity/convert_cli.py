"""`sdparity convert`: between a diffusers folder, an original single file and a scratch checkpoint.

    sdparity convert v1-5-pruned-emaonly.safetensors --to diffusers --out sd15/      # single file -> folder
    sdparity convert sd15/ --to single --out sd15.safetensors                         # folder -> single file
    sdparity convert sd15.ckpt --to scratch --out sd15-scratch.safetensors --ema      # either -> scratch

Reading is strict (scratch_sd.loading: every tensor used, or dropped by a named rule that is
reported). Writing goes to a temporary name beside the target, renamed at the end, so a failure
leaves nothing half-written; an existing target is replaced only with --force.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

TARGETS = ("diffusers", "single", "scratch")


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert between a diffusers folder, an original single file and a "
                                       "scratch checkpoint")
    p.add_argument("src", help="a diffusers folder, an original .safetensors/.ckpt single file, or a scratch checkpoint")
    p.add_argument("--to", required=True, choices=TARGETS, help="diffusers (a folder), single (.safetensors or "
                                                                 ".ckpt), scratch (.safetensors with our keys)")
    p.add_argument("--out", required=True, help="the folder or file to write")
    p.add_argument("--ema", action="store_true", help="single-file source: take the UNet's EMA weights (model_ema.*)")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="cast floating tensors (default: keep the source's dtypes)")
    p.add_argument("--variant", default=None, help="diffusers source: the weights variant to read (e.g. fp16)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="--to diffusers: the tokenizer folder to copy (default: the source folder's; for a "
                        "single file, a generated placeholder vocabulary)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def _check(args) -> tuple[Path, Path]:
    from parity.cli import UsageError

    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise FileNotFoundError(2, "No such model file or folder", str(src))
    if out.exists() and not args.force:
        raise UsageError(f"--out {out} exists; pass --force to replace it")
    if out.resolve() == src.resolve():
        raise UsageError("--out is the source itself")
    if args.to == "single" and out.suffix.lower() not in (".safetensors", ".ckpt"):
        raise UsageError(f"--to single writes a .safetensors or .ckpt file, not {out.name!r}")
    if args.to == "scratch" and out.suffix.lower() != ".safetensors":
        raise UsageError(f"--to scratch writes a .safetensors file, not {out.name!r}")
    if args.to == "diffusers" and (out.suffix.lower() in (".safetensors", ".ckpt", ".bin") or out.is_file()):
        raise UsageError(f"--to diffusers writes a folder, not a file ({out.name!r})")
    if args.to != "diffusers" and out.is_dir():
        raise UsageError(f"--out {out} is a folder; --to {args.to} writes a file")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise FileNotFoundError(2, "No such tokenizer folder", args.tokenizer)
    return src, out


# --------------------------------------------------------------------------- diffusers folders
def write_diffusers_folder(model, out: Path, tokenizer: Path | None = None, dtype: str | None = None,
                           force: bool = False) -> list[str]:
    """Write `model` (scratch_sd.loading.Model) as a diffusers folder, into a temporary folder
    beside `out` that is renamed onto it at the end. Returns notes."""
    from parity.local_model import write_config_folder
    from scratch_sd import io, loading

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        scheduler_config = None
        if model.kind == "diffusers":
            sched = model.path / "scheduler" / "scheduler_config.json"
            scheduler_config = loading.read_json(sched) if sched.is_file() else None
            if tokenizer is None and (model.path / "tokenizer").is_dir():
                tokenizer = model.path / "tokenizer"
        notes = write_config_folder(tmp, model.cfg, tokenizer, scheduler_config)
        for name, stem in (("text_encoder", "model"), ("vae", "diffusion_pytorch_model"),
                           ("unet", "diffusion_pytorch_model")):
            conv, sub = loading.converter(name), loading.sub_config(name, model.cfg)
            theirs = conv.to_diffusers(model.component(name), sub)  # text encoder: canonical `text_model.` keys
            io.save_state_dict(loading.cast(theirs, dtype), tmp / name / f"{stem}.safetensors", {"format": "pt"})
        io.set_default_mode(tmp)  # mkdtemp makes it 0700
        _replace(tmp, out, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return notes


def _replace(new: Path, out: Path, force: bool) -> None:
    """Rename `new` onto `out`; an existing `out` (only with force) is moved aside first, then removed."""
    if not out.exists():
        new.rename(out)
        return
    if not force:  # pragma: no cover - checked before any work
        raise FileExistsError(17, "Target exists", str(out))
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old) if old.is_dir() else old.unlink()


# --------------------------------------------------------------------------- run
def run(args) -> int:
    from scratch_sd import loading

    src, out = _check(args)
    model = loading.read_model(src, ema=args.ema, variant=args.variant)
    notes = list(model.notes)
    if args.to == "diffusers":
        notes += write_diffusers_folder(model, out, Path(args.tokenizer) if args.tokenizer else None, args.dtype,
                                        args.force)
    elif args.to == "single":  # files are written atomically by scratch_sd.io
        loading.export_single_file(model, out, dtype=args.dtype)
    else:
        loading.export_scratch(model, out, dtype=args.dtype)
    for text in notes:
        print(f"sdparity: note: {text}", file=sys.stderr)
    what = {"diffusers": "diffusers folder", "single": "single file", "scratch": "scratch checkpoint"}
    print(f"wrote {out}: {what[args.to]} from the {what[model.kind]} {src} (config {model.cfg.name}, "
          f"{len(model.state)} scratch tensors, dtype {args.dtype or 'as the source'}"
          f"{', EMA UNet' if args.ema else ''})")
    return 0
