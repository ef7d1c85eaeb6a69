"""`sdparity generate`: a prompt (and optionally an init image) to a PNG, with the scratch pipeline
or diffusers' — or both (`--compare`): side by side with a difference heat map, PSNR and max_abs.

    sdparity generate --prompt "a red fox" --preset tiny --steps 4 --compare --out fox.png
    sdparity generate --prompt "a red fox" --model PATH --device cuda --cuda-graphs --out fox.png

`--compile [MODE]` and `--cuda-graphs` accelerate the scratch pipeline's UNet call
(ScratchPipeline.accelerate, scratch_sd/accel.py); with --compare they are checked against
diffusers' eager pipeline.

Both pipelines are built by parity.pipelines (the one builder), on the same weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from parity import pipelines
from scratch_sd import accel
from scratch_sd.config import PRESETS
from scratch_sd.images import load_image
from scratch_sd.pipeline import PIPELINE_SCHEDULERS, ScratchPipeline, make_scheduler
from sdparity.common import UsageError, add_prediction_type_option, check_sizes, finite_float, positive_int, seed as seed_arg

# The bar of issue 5: final images in [0, 1] pixel units, fp32 on CPU.
MIN_PSNR_DB = 80.0
MAX_ABS = 1e-4


# --------------------------------------------------------------------------- running
def _request(args) -> dict:
    """The pipeline call's keyword arguments, shared by both implementations."""
    prompts = args.prompt
    negatives = args.negative_prompt
    if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    request = dict(prompt=prompts if len(prompts) > 1 else prompts[0],
                   negative_prompt=(negatives if len(negatives) > 1 else negatives[0]) if negatives else None,
                   num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                   num_images_per_prompt=args.num_images)
    if args.init_image is not None:
        image = load_image(args.init_image)
        if args.height or args.width:  # diffusers' img2img has no size: resize the init image for both
            image = image.resize((args.width or image.width, args.height or image.height),
                                 resample=PIL.Image.Resampling.LANCZOS)
        request.update(image=image, strength=args.strength)
    else:
        request.update(height=args.height, width=args.width)
    return request


def _on_device(pipe, args):
    """The pipeline on --device (moved only off the CPU), the scratch one accelerated as asked."""
    if args.device != "cpu":
        pipe.to(args.device)
    if isinstance(pipe, ScratchPipeline):
        pipe.accelerate(compile=args.compile is not None, compile_mode=args.compile or "default",
                        cuda_graphs=args.cuda_graphs)
    return pipe


def run_scratch(pipe: ScratchPipeline, request: dict, seed: int, progress: bool) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    return pipe(**request, generator=generator, output_type="np", progress=progress).images


def run_diffusers(pipe, request: dict, seed: int, progress: bool) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe(**request, generator=generator, output_type="np").images


def _validate(args) -> None:
    """Every input error before any model is built (bad input: exit 2, nothing written)."""
    from scratch_sd.pipeline import check_prompts, check_strength

    from parity.outputs import check_target

    if Path(args.out).suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    check_target(args.out, "file", args.force)
    make_scheduler(args.scheduler)
    check_prompts(args.prompt if len(args.prompt) > 1 else args.prompt[0],
                   None if args.negative_prompt is None else
                   (args.negative_prompt * len(args.prompt) if len(args.negative_prompt) == 1 else args.negative_prompt))
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.cuda_graphs and args.device != "cuda":
        raise UsageError(f"--cuda-graphs needs --device cuda (CUDA graphs replay GPU kernels), got --device "
                         f"{args.device}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this torch build")
    if (args.compile is not None or args.cuda_graphs) and args.impl == "diffusers" and not args.compare:
        raise UsageError("--compile and --cuda-graphs accelerate the scratch pipeline: use --impl scratch or --compare")
    if args.compile is not None and args.cuda_graphs and accel.mode_uses_cuda_graphs(args.compile):
        raise UsageError(f"--compile {args.compile} runs inductor's own CUDA graphs; with --cuda-graphs use "
                         "--compile default or max-autotune-no-cudagraphs")
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    check_sizes(args.height, args.width)
    if args.init_image is not None:
        check_strength(args.strength, args.steps)
        load_image(args.init_image)  # missing or unreadable: exit 2 now
    elif args.strength_given:
        raise UsageError("--strength needs --init-image")
    if args.model is not None and not Path(args.model).exists():
        raise FileNotFoundError(2, "No such model file or folder", str(args.model))


def generate(args) -> tuple[dict[str, np.ndarray], str]:
    """Run the chosen implementation(s); returns {impl: images (B, H, W, 3)} and a source label."""
    request = _request(args)
    mode = "img2img" if "image" in request else "txt2img"
    impls = ("scratch", "diffusers") if args.compare else (args.impl,)
    progress = not args.no_progress
    out: dict[str, np.ndarray] = {}
    from parity.references import build_references

    # A local model (diffusers folder, single file, scratch checkpoint) is read as check reads it:
    # our strict reader (NaN/inf and damaged files refused, naming the tensor) and diffusers' own,
    # the same weights on both sides; a preset is the zoo's seeded weights.
    refs = build_references(args.preset, args.model, seed=args.model_seed, quiet=True,
                            prediction_type=args.prediction_type)
    if "scratch" in impls:
        out["scratch"] = run_scratch(_on_device(pipelines.scratch_pipeline_from_references(refs, args.scheduler), args),
                                     request, args.seed, progress)
    if "diffusers" in impls:
        out["diffusers"] = run_diffusers(_on_device(pipelines.reference_pipeline(refs, args.scheduler, mode), args),
                                         request, args.seed, progress)
    return out, str(args.model) if args.model is not None else f"preset {args.preset}"


# --------------------------------------------------------------------------- pictures
def heat(diff: np.ndarray, scale: float) -> np.ndarray:
    """(H, W) non-negative -> (H, W, 3) in [0, 1]: black -> red -> yellow -> white (white = `scale`)."""
    x = diff / scale if scale > 0 else diff
    return np.stack([np.clip(3 * x, 0, 1), np.clip(3 * x - 1, 0, 1), np.clip(3 * x - 2, 0, 1)], axis=-1)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.uint8)


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> PIL.Image.Image:
    """Rows of (H, W, 3) images in [0, 1] -> one RGB image with white gaps."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            canvas[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = _to_uint8(im)
    return PIL.Image.fromarray(canvas)


def comparison_picture(scratch: np.ndarray, reference: np.ndarray) -> tuple[PIL.Image.Image, float]:
    """One row per image: scratch | diffusers | |difference| heat map (white = the largest difference)."""
    diff = np.abs(scratch.astype(np.float64) - reference.astype(np.float64)).max(axis=-1)  # (B, H, W)
    scale = float(diff.max())
    rows = [[s, r, heat(d, scale)] for s, r, d in zip(scratch, reference, diff)]
    return grid(rows), scale


def save_png(image: PIL.Image.Image, out: str | Path, force: bool = False) -> Path:
    from parity.outputs import writing_file

    with writing_file(out, force=force) as tmp:
        image.save(tmp, format="PNG")
    return Path(out)


# --------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="prompt -> PNG with the scratch pipeline, diffusers', or both (--compare)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch of prompts")
    p.add_argument("--negative-prompt", action="append", default=None,
                   help="one for all prompts, or one per --prompt (in order)")
    p.add_argument("--init-image", default=None, metavar="PATH", help="img2img: start from this image")
    p.add_argument("--strength", type=float, default=None, help="img2img: how much to change the image, in (0, 1] "
                                                                "(default 0.8)")
    p.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance-scale", type=finite_float, default=7.5,
                   help="classifier-free guidance; <= 1 turns it off")
    p.add_argument("--scheduler", default="pndm", help=f"one of {', '.join(PIPELINE_SCHEDULERS)} (default pndm)")
    p.add_argument("--seed", type=seed_arg, default=0,
                   help="noise seed (a CPU torch.Generator; 0 <= seed < 2**64 - 2**16)")
    p.add_argument("--height", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="pixels, a multiple of 8 (default: the model's size)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=tuple(PRESETS), default="tiny", help="seeded random weights (default tiny)")
    src.add_argument("--model", default=None, metavar="PATH",
                     help="a local diffusers folder or a single .safetensors/.ckpt file (as check reads it)")
    p.add_argument("--model-seed", type=seed_arg, default=0, help="seed of a preset's random weights")
    add_prediction_type_option(p)
    p.add_argument("--impl", choices=("scratch", "diffusers"), default="scratch")
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--compare", action="store_true",
                   help="run both implementations; write scratch | diffusers | difference map; print PSNR, max_abs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the networks run (default cpu; "
                                                                           "noise is drawn on the CPU either way)")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=accel.compile_modes(),
                   metavar="MODE", help="torch.compile the scratch UNet call (MODE: one of "
                                        f"{', '.join(accel.compile_modes())}; default 'default')")
    p.add_argument("--cuda-graphs", action="store_true", help="run the scratch UNet call as CUDA graphs "
                                                              "(needs --device cuda)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the PNG (written atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (without it, an existing "
                                                        "--out is refused, as convert does)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    args.strength_given = args.strength is not None
    args.strength = 0.8 if args.strength is None else args.strength
    _validate(args)
    images, source = generate(args)
    if not args.compare:
        picture = grid([list(images[args.impl])])
        save_png(picture, args.out, args.force)
        print(f"wrote {args.out} ({len(images[args.impl])} image(s), {args.impl}{_accel_label(args)}, {source})")
        return 0
    from parity.metrics import compare

    scratch, reference = images["scratch"], images["diffusers"]
    picture, scale = comparison_picture(scratch, reference)
    save_png(picture, args.out, args.force)
    mode = f"img2img strength {args.strength}" if args.init_image else "txt2img"
    print(f"scratch vs diffusers: {source}, {mode}, scheduler {args.scheduler}, {args.steps} steps, "
          f"guidance {args.guidance_scale}, seed {args.seed}, {len(scratch)} image(s) "
          f"{scratch.shape[2]}x{scratch.shape[1]}, fp32 {args.device}"
          + (f", scratch{_accel_label(args)}" if _accel_label(args) else ""))
    for i, (s, r) in enumerate(zip(scratch, reference)):
        e = compare(torch.from_numpy(r), torch.from_numpy(s))
        print(f"  image {i}: PSNR {e.psnr_db:.1f} dB  max_abs {e.max_abs:.3g}  mean_abs {e.mean_abs:.3g}")
    total = compare(torch.from_numpy(reference), torch.from_numpy(scratch))
    ok = total.finite and total.psnr_db >= MIN_PSNR_DB and total.max_abs <= MAX_ABS
    print(f"all: PSNR {total.psnr_db:.1f} dB  max_abs {total.max_abs:.3g}  "
          f"(bar: PSNR >= {MIN_PSNR_DB:g} dB, max_abs <= {MAX_ABS:g})  {'PASS' if ok else 'FAIL'}")
    print(f"wrote {args.out} (rows: scratch | diffusers | |difference|, white = {scale:.3g})")
    return 0 if ok else 1


def _accel_label(args) -> str:
    parts = []
    if args.compile is not None:
        parts.append(f"compile {args.compile}")
    if args.cuda_graphs:
        parts.append("cuda graphs")
    return f" with {' + '.join(parts)}" if parts else ""  # "scratch with compile default + cuda graphs"


if __name__ == "__main__":  # pragma: no cover
    from sdparity.main import main

    sys.exit(main(["generate", *sys.argv[1:]]))
