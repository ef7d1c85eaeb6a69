"""`sdparity train`: a tiny class-conditional scratch UNet trained from scratch on handwritten digits.

    sdparity train --dataset digits --objective both --out reports/train-digits

Data: scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [-1, 1] and
upsampled (bilinear) to 16x16. The label (0-9, or a null label for classifier-free guidance) is
embedded and given to the UNet as its cross-attention context. Objectives (sdparity.digits):
`ddpm` (epsilon prediction; sampled with the scratch DDIM, or DDPM) and `vesde` (VE-SDE denoising
score matching; sampled with the scratch Euler-Maruyama predictor), or `both`.

The check that it learned: a logistic regression fit on the real 8x8 digits only labels the
generated samples (average-pooled back to 8x8); the accuracy against the conditioning label is
reported per objective, and the run fails (exit 1) below --min-accuracy.

Writes into --out: loss.csv, loss.png, checkpoint.safetensors (every objective's model, EMA and
AdamW state; --resume continues it), samples_grid.png (one row per digit, one panel per
objective), summary.json and summary.md. The folder is written whole (parity.outputs): into a
temporary sibling, renamed into place at the end; --out is checked before any training.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdparity.common import fraction, seed as seed_arg

DATASETS = ("digits",)
OBJECTIVE_CHOICES = ("ddpm", "vesde", "both")
IMAGE_SIZE = 16  # the 8x8 digits, upsampled x2
CHECKPOINT = "checkpoint.safetensors"


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a tiny class-conditional scratch UNet on digits (DDPM and/or VE-SDE)")
    p.add_argument("--dataset", default="digits", help="digits (scikit-learn's bundled 8x8 digits; the only one)")
    p.add_argument("--objective", default="both", help="ddpm | vesde | both (default both)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per objective, in total (default 300)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of initialisation, batches, noise (default 0)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="a checkpoint.safetensors of an earlier run")
    p.add_argument("--out", default=None, metavar="DIR", help="run folder (default reports/train-<time>), written "
                                                              "whole at the end")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--width", type=int, default=16, help="UNet channels at 16x16 (x2 below; default 16)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale; 1 = none (default 2)")
    p.add_argument("--ddpm-sampler", default="ddpm", help="ddpm (ancestral) | ddim (default ddpm)")
    p.add_argument("--ddpm-steps", type=int, default=100, help="DDPM/DDIM sampling steps (default 100)")
    p.add_argument("--sde-steps", type=int, default=100, help="Euler-Maruyama steps (default 100)")
    p.add_argument("--sde-correct-steps", type=int, default=0, help="Langevin corrector steps per EM step (default 0)")
    p.add_argument("--samples-per-digit", type=int, default=20, help="samples per digit to classify (default 20)")
    p.add_argument("--min-accuracy", type=fraction, default=0.8,
                   help="exit 1 below this accuracy, in [0, 1] (default 0.8)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the training forward")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: this model's ops are too small to share, and on a busy CPU "
                        "every extra OpenMP thread waits for the others at each op)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- options
def _validate(args) -> list[str]:
    from sdparity.common import UsageError

    if args.dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; known: {', '.join(DATASETS)}")
    if args.objective not in OBJECTIVE_CHOICES:
        raise UsageError(f"unknown objective {args.objective!r}; known: {', '.join(OBJECTIVE_CHOICES)}")
    checks = [("--batch-size", args.batch_size, 1), ("--steps", args.steps, 0), ("--ddpm-steps", args.ddpm_steps, 1),
              ("--sde-steps", args.sde_steps, 2), ("--sde-correct-steps", args.sde_correct_steps, 0),
              ("--samples-per-digit", args.samples_per_digit, 1), ("--width", args.width, 8)]
    for flag, value, lo in checks:
        if value < lo:
            raise UsageError(f"{flag} must be >= {lo}, got {value}")
    if args.width % 8:
        raise UsageError(f"--width must be a multiple of 8 (the GroupNorm groups), got {args.width}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if args.guidance < 0 or not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be >= 0, got {args.guidance}")
    if args.ddpm_sampler not in ("ddim", "ddpm"):
        raise UsageError(f"unknown --ddpm-sampler {args.ddpm_sampler!r}; known: ddim, ddpm")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.resume is not None and not Path(args.resume).is_file():
        raise FileNotFoundError(2, "No such checkpoint file", str(args.resume))
    return ["ddpm", "vesde"] if args.objective == "both" else [args.objective]


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(f"[train] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data and classifier
def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) floats in [0, 16], (1797,) labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def to_training_images(images_8x8: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """[0, 16] 8x8 -> [-1, 1] (N, 1, size, size), bilinear upsampling."""
    x = torch.from_numpy(images_8x8)[:, None] / 8.0 - 1.0
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def to_classifier_inputs(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 16, 16) in [-1, 1] -> (N, 64) in [0, 16]: the classifier's real-digit scale, 2x2 average pooled."""
    x = images.clamp(-1, 1)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return ((x[:, 0] + 1.0) * 8.0).reshape(len(x), 64).numpy()


def fit_classifier(images_8x8: np.ndarray, labels: np.ndarray, seed: int = 0):
    """A logistic regression on real digits only; returns it with its held-out accuracies
    (on the 8x8 originals, and on the same digits sent through the 16x16 up/down round trip)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    flat = images_8x8.reshape(len(images_8x8), 64)
    x_tr, x_te, y_tr, y_te, _, i_te = train_test_split(flat, labels, np.arange(len(labels)), test_size=0.25,
                                                       random_state=seed, stratify=labels)
    clf = LogisticRegression(max_iter=5000).fit(x_tr, y_tr)
    round_trip = to_classifier_inputs(to_training_images(images_8x8[i_te]))
    return clf, {"real_heldout": float(clf.score(x_te, y_te)), "real_roundtrip": float(clf.score(round_trip, y_te))}


# --------------------------------------------------------------------------- checkpoint
def _load_resume(path: str, trainers: dict, log) -> None:
    from scratch_sd.storage import load_state_dict

    state = load_state_dict(path)
    held = sorted({k.split(".", 1)[0] for k in state if k.endswith(".step") and k.count(".") == 1})
    for name, trainer in trainers.items():
        if name not in held:
            raise ValueError(f"resume checkpoint {path} has no {name} state (it holds: {', '.join(held) or 'none'})")
        trainer.load_state_dict(state, prefix=f"{name}.", source=f"resume checkpoint {path}")
        log(f"{name}: resumed at step {trainer.step} from {path}")


def _save_checkpoint(path: Path, trainers: dict) -> None:
    from scratch_sd.storage import save_state_dict

    state, meta = {}, {"format": "sd-parity digits trainer", "objectives": ",".join(trainers)}
    for name, trainer in trainers.items():
        state.update(trainer.state_dict(prefix=f"{name}."))
        meta.update(trainer.metadata())
    save_state_dict(state, path, metadata=meta)


# --------------------------------------------------------------------------- outputs
def _write_bytes(path: Path, data: bytes) -> None:
    from scratch_sd.storage import atomic_path

    with atomic_path(path, path.suffix) as tmp:
        tmp.write_bytes(data)


def _loss_csv(history: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["objective", "step", "loss", "grad_norm", "lr", "elapsed_s"],
                       lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue().encode()


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _loss_png(history: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in dict.fromkeys(r["objective"] for r in history):
        rows = [r for r in history if r["objective"] == name]
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        ax.plot(steps, loss, alpha=0.25)
        smooth = np.convolve(loss, np.ones(min(25, len(loss))) / min(25, len(loss)), mode="valid")
        ax.plot(steps[len(steps) - len(smooth):], smooth, label=f"{name} (moving mean of 25)",
                color=ax.lines[-1].get_color())
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss (MSE)")
    ax.legend()
    ax.grid(alpha=0.3)
    return _figure_png(fig)


def _grid_png(samples: dict[str, torch.Tensor], titles: dict[str, str], per_row: int) -> bytes:
    """One panel per objective; row d shows `per_row` samples conditioned on digit d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(3.6 * len(samples), 4.2), squeeze=False)
    for ax, (name, x) in zip(axes[0], samples.items()):
        x = ((x.clamp(-1, 1) + 1) / 2)[:, 0].numpy()  # (10 * k, H, W), digit-major
        k, s = x.shape[0] // 10, x.shape[-1]
        tiles = x.reshape(10, k, s, s)[:, :per_row]
        mosaic = np.zeros((10 * (s + 1) - 1, per_row * (s + 1) - 1))  # white gaps
        for d in range(10):
            for j in range(tiles.shape[1]):
                mosaic[d * (s + 1):d * (s + 1) + s, j * (s + 1):j * (s + 1) + s] = tiles[d, j]
        ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks([d * (s + 1) + s / 2 for d in range(10)], [str(d) for d in range(10)])
        ax.set_xticks([])
        ax.set_title(titles[name], fontsize=9)
    return _figure_png(fig)


def _summary_md(summary: dict) -> str:
    lines = [f"# sdparity train: {summary['dataset']}", "",
             f"Wall time {summary['wall_s']:.0f} s, CPU time {summary['cpu_s']:.0f} s (torch threads "
             f"{summary['threads']}; load average at the end {summary['load_average']}).", "",
             f"Classifier (logistic regression, real digits only): held-out accuracy "
             f"{summary['classifier']['real_heldout']:.1%} on real 8x8 digits, "
             f"{summary['classifier']['real_roundtrip']:.1%} after the 16x16 up/down round trip.", "",
             "| objective | steps | final loss (mean of last 50) | sampler | guidance | samples | accuracy | "
             "train s | sample s |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["objectives"].items():
        loss = "-" if r["final_loss"] is None else f"{r['final_loss']:.4f}"
        lines.append(f"| {name} | {r['steps']} | {loss} | {r['sampler']} | {r['guidance']:g} | "
                     f"{r['num_samples']} | {r['accuracy']:.1%} | {r['train_s']:.0f} | {r['sample_s']:.0f} |")
    lines += ["", "Per-digit accuracy:", "", "| objective | " + " | ".join(map(str, range(10))) + " |",
              "|---|" + "---|" * 10]
    for name, r in summary["objectives"].items():
        lines.append(f"| {name} | " + " | ".join(f"{a:.0%}" for a in r["per_digit_accuracy"]) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- run
def _objective(name: str, args):
    from sdparity.digits import DDPMObjective, VESDEObjective

    if name == "ddpm":
        return DDPMObjective(sampler=args.ddpm_sampler)
    return VESDEObjective(correct_steps=args.sde_correct_steps)


def _sample(name: str, objective, model, args, k: int) -> tuple[torch.Tensor, str]:
    labels = torch.arange(10).repeat_interleave(k)
    g = torch.Generator().manual_seed(args.seed + 1234)
    shape = (1, IMAGE_SIZE, IMAGE_SIZE)
    if name == "ddpm":
        x = objective.sample(model, labels, shape, steps=args.ddpm_steps, guidance=args.guidance, generator=g)
        how = f"{args.ddpm_sampler.upper()} {args.ddpm_steps} steps"
    else:
        x = objective.sample(model, labels, shape, steps=args.sde_steps, guidance=args.guidance, generator=g)
        how = f"Euler-Maruyama {args.sde_steps} steps" + (
            f" + {args.sde_correct_steps} Langevin" if args.sde_correct_steps else "")
    return x.clamp(-1, 1), how


def _train(trainers: dict, images: torch.Tensor, labels: torch.Tensor, args) -> tuple[list[dict], dict]:
    """Train each objective up to --steps; returns this invocation's loss rows and per-objective timings."""
    history, results = [], {}
    for name, trainer in trainers.items():
        t0, first = time.perf_counter(), trainer.step
        every = max(1, (args.steps - first) // 10)

        def on_step(row, name=name, t0=t0):
            row["elapsed_s"] = time.perf_counter() - t0
            if row["step"] % every == 0 or row["step"] == args.steps:
                _log(args, f"{name} step {row['step']}/{args.steps} loss {row['loss']:.4f} ({row['elapsed_s']:.0f} s)")

        _log(args, f"{name}: training steps {first + 1}..{args.steps}, batch {args.batch_size}, lr {args.lr:g}")
        history += trainer.train(images, labels, on_step=on_step)
        results[name] = {"train_s": time.perf_counter() - t0, "steps": trainer.step}
    return history, results


def _evaluate(trainers: dict, clf, args, results: dict) -> tuple[dict, dict]:
    """Sample --samples-per-digit images per digit with each EMA model; the classifier labels them."""
    samples, titles, k = {}, {}, args.samples_per_digit
    want = np.repeat(np.arange(10), k)
    for name, trainer in trainers.items():
        t0 = time.perf_counter()
        x, how = _sample(name, trainer.objective, trainer.ema_model(), args, k)
        pred = clf.predict(to_classifier_inputs(x))
        acc = float((pred == want).mean())
        losses = [r["loss"] for r in trainer.history[-50:]]  # this invocation's steps only
        results[name].update(sample_s=time.perf_counter() - t0, sampler=how, guidance=args.guidance,
                             num_samples=len(want), accuracy=acc,
                             per_digit_accuracy=[float((pred[want == d] == d).mean()) for d in range(10)],
                             final_loss=float(np.mean(losses)) if losses else None)
        samples[name] = x
        label = {"ddpm": "DDPM (epsilon)", "vesde": "VE-SDE (score matching)"}[name]
        titles[name] = f"{label}\n{how}, CFG {args.guidance:g}: {acc:.1%} classified"
        _log(args, f"{name}: {how}, guidance {args.guidance:g}: classifier accuracy {acc:.1%} "
                   f"({results[name]['sample_s']:.0f} s)")
    return samples, titles


def _report(results: dict, clf_acc: dict, summary: dict, out: Path, min_accuracy: float) -> int:
    for name, r in results.items():
        loss = "no steps run" if r["final_loss"] is None else f"final loss {r['final_loss']:.4f}"
        print(f"{name}: accuracy {r['accuracy']:.1%} ({r['num_samples']} samples, {r['sampler']}, "
              f"guidance {r['guidance']:g}), {loss}, {r['steps']} steps")
    print(f"classifier on real held-out digits: {clf_acc['real_heldout']:.1%}; wall time {summary['wall_s']:.0f} s "
          f"(CPU {summary['cpu_s']:.0f} s, load average {summary['load_average']}); outputs in {out}")
    failed = [n for n, r in results.items() if r["accuracy"] < min_accuracy]
    if failed:
        print(f"sdparity train: accuracy below {min_accuracy:g} for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    names = _validate(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, names)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their own setting


def _run(args, names: list[str]) -> int:
    from sdparity.digits import DigitsTrainConfig, DigitsTrainer, digits_unet_config

    from parity.outputs import check_target, writing_dir

    out = Path(args.out) if args.out else Path("reports") / time.strftime("train-%Y%m%d-%H%M%S")
    check_target(out, "dir", args.force)  # before any training
    start, cpu_start = time.perf_counter(), time.process_time()

    # 1. data and models (a resume checkpoint is checked before any training)
    images8, labels = load_digits_8x8()
    unet_cfg = digits_unet_config(args.width, IMAGE_SIZE)
    tcfg = DigitsTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, bf16=args.bf16)
    trainers = {n: DigitsTrainer(_objective(n, args), unet_cfg, tcfg) for n in names}
    if args.resume:
        _load_resume(args.resume, trainers, lambda m: _log(args, m))

    # 2. train; 3. sample, classify
    history, results = _train(trainers, to_training_images(images8), torch.from_numpy(labels), args)
    clf, clf_acc = fit_classifier(images8, labels, args.seed)
    samples, titles = _evaluate(trainers, clf, args, results)

    # 4. files, into a temporary sibling moved into place whole
    with writing_dir(out, args.force) as tmp:
        _save_checkpoint(tmp / CHECKPOINT, trainers)
        if history:  # this run's steps (a resumed run's earlier steps are in the earlier run's loss.csv)
            _write_bytes(tmp / "loss.csv", _loss_csv(history))
            _write_bytes(tmp / "loss.png", _loss_png(history))
        _write_bytes(tmp / "samples_grid.png", _grid_png(samples, titles, per_row=min(args.samples_per_digit, 10)))
        summary = {"dataset": args.dataset, "objectives": results, "classifier": clf_acc,
                   "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start,
                   "threads": torch.get_num_threads(), "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                   "args": {k: v for k, v in vars(args).items() if k != "func"}, "unet_config": asdict(unet_cfg),
                   "files": [CHECKPOINT, "samples_grid.png", "loss.csv", "loss.png"]}
        _write_bytes(tmp / "summary.json", json.dumps(summary, indent=2).encode())
        _write_bytes(tmp / "summary.md", _summary_md(summary).encode())
    return _report(results, clf_acc, summary, out, args.min_accuracy)
