"""parity.csv, summary.md and plots of a `sdparity check` run (written atomically)."""
from __future__ import annotations

import csv
import io
import math
import platform
from collections import defaultdict
from pathlib import Path

import torch


def _fmt(x) -> str:
    if isinstance(x, bool) or x == "" or x is None:
        return str(x)
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.6g}"
    return str(x)


def _write_text(path: Path, text: str) -> None:
    from scratch_sd.io import atomic_path

    with atomic_path(path, path.suffix) as tmp:
        tmp.write_text(text, encoding="utf-8")


def rows_to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c, "")) for c in columns})
    return buf.getvalue()


def failure_line(r: dict) -> str:
    where = f"{r['component']} {r['dtype']} {r.get('mode', '')} {r['tensor']}"
    if r.get("step") not in ("", None):
        where += f" step {r['step']}"
    if r.get("case"):
        where += f" [{r['case']}]"
    if r.get("scheduler"):
        where += f" ({r['scheduler']})"
    nums = f"max_abs={_fmt(r['max_abs'])} rel_l2={_fmt(r['rel_l2'])} psnr={_fmt(r['psnr_db'])} dB"
    return f"FAIL {where}: {nums}; {r['reason']}"


def _finite(r: dict, k: str) -> bool:
    return isinstance(r[k], float) and math.isfinite(r[k])


def _worst(rows: list[dict]) -> dict:
    """Worst numbers over compared rows with finite metrics (non-finite rows are listed apart)."""
    comp = [r for r in rows if r["status"] == "compared"]
    fin = [r for r in comp if _finite(r, "max_abs")]
    return {
        "n": len(comp),
        "failed": sum(not r["passed"] for r in comp),
        "max_abs": max((r["max_abs"] for r in fin), default=math.nan),
        "rel_l2": max((r["rel_l2"] for r in fin if _finite(r, "rel_l2")), default=math.nan),
        "psnr_db": min((r["psnr_db"] for r in fin if r["tensor"] not in ("timesteps", "sigmas")
                        and _finite(r, "psnr_db")), default=math.nan),
        "ratio": max((r["error_ratio"] for r in comp if isinstance(r.get("error_ratio"), float)), default=None),
    }


def summary_markdown(rec, opts, elapsed: float) -> str:
    rows = rec.rows
    comps = list(dict.fromkeys(r["component"] for r in rows))
    dtypes = [d for d in ("fp32", "bf16", "fp16") if any(r["dtype"] == d for r in rows)]
    lines = [f"# sdparity check — {rec.preset}", "",
             f"run `{rec.run_id}`, device {rec.device} ({platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}, {elapsed:.1f} s; schedulers {', '.join(opts.schedulers)}, "
             f"{opts.steps} steps, {opts.size}px, seed {opts.seed}; tolerances {opts.table.source}; "
             f"scratch networks in {rec.net_mode} mode", "",
             "## Pass/fail matrix (worst numbers over every compared tensor)", "",
             "Each cell: verdict, passed/compared, worst max_abs, worst rel_l2, lowest PSNR; for fp16/bf16 also "
             "the worst ratio of scratch's error to diffusers' own error against fp32.", "",
             "| component | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    by = defaultdict(list)
    for r in rows:
        by[(r["component"], r["dtype"])].append(r)
    for c in comps:
        cells = []
        for d in dtypes:
            rs = by.get((c, d), [])
            if not rs:
                cells.append("—")
                continue
            if all(r["status"] == "skipped" for r in rs):
                cells.append("skipped")
                continue
            w = _worst(rs)
            verdict = "**FAIL**" if w["failed"] else "PASS"
            cell = (f"{verdict} {w['n'] - w['failed']}/{w['n']}; max_abs {_fmt(w['max_abs'])}, "
                    f"rel_l2 {_fmt(w['rel_l2'])}, PSNR {_fmt(w['psnr_db'])} dB")
            if w["ratio"] is not None:
                cell += f", ratio {w['ratio']:.2f}"
            cells.append(cell)
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""]
        seen = set()
        for r in skipped:
            key = (r["component"], r["dtype"], r["reason"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r['component']} {r['dtype']}: {r['reason']}")
    odd = [r for r in rows if r["status"] == "compared" and r["passed"] and not _finite(r, "max_abs")]
    if odd:
        lines += ["", "## Findings: non-finite in both implementations (equal where finite)", ""]
        lines += [f"- {r['component']} {r['scheduler']} {r['tensor']} steps={r['step']}: {r['reason']}" for r in odd]
    failed = [r for r in rows if r["status"] == "compared" and not r["passed"]]
    lines += ["", f"## Failures ({len(failed)})", ""]
    lines += [f"- {failure_line(r)}" for r in failed[:100]] or ["none"]
    nets = sorted({(r["component"], r["dtype"]) for r in failed if r["component"] in ("text_encoder", "vae", "unet")})
    if nets:
        lines += ["", "Localise the first diverging layer:", ""]
        lines += [f"    sdparity localize --component {c} --dtype {d} --preset {opts.preset}" for c, d in nets]
    lines += ["", "Columns of parity.csv are explained in reports/README.md.", ""]
    return "\n".join(lines)


def plot_errors_by_step(rec, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in rec.rows:
        if r["status"] == "compared" and r["tensor"] == "latents" and r["mode"] in ("txt2img", "img2img"):
            series[(r["dtype"], r["mode"], r["scheduler"], r["component"])].append((int(r["step"]), r["max_abs"]))
    if not series:
        return False
    panels = sorted({k[:3] for k in series})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key, pts in sorted(series.items()):
            if key[:3] != panel:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [max(p[1], 1e-12) for p in pts], marker="o", label=key[3])
        ax.set_yscale("log")
        ax.set_title(f"{panel[0]} {panel[1]} [{panel[2]}]")
        ax.set_xlabel("denoising step")
        ax.set_ylabel("latents max_abs vs diffusers")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)
    return True


def plot_images(rec, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k, v in rec.images.items() if "diffusers" in v and len(v) > 1)
    if not keys:
        return False
    fig, axes = plt.subplots(len(keys), 3, figsize=(9, 3.2 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        imgs = rec.images[key]
        other = "all_swapped" if "all_swapped" in imgs else next(k for k in imgs if k != "diffusers")
        ref, out = imgs["diffusers"][0].float(), imgs[other][0].float()
        diff = (out - ref).abs().amax(-1)
        row[0].imshow(ref.clamp(0, 1).numpy())
        row[0].set_title(f"diffusers {key[0]} {key[1]}", fontsize=8)
        row[1].imshow(out.clamp(0, 1).numpy())
        row[1].set_title(f"{other} {key[0]} {key[1]}", fontsize=8)
        im = row[2].imshow(diff.numpy(), cmap="inferno")
        row[2].set_title(f"|diff| max {float(diff.max()):.2g}", fontsize=8)
        fig.colorbar(im, ax=row[2], fraction=0.046)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    _save_fig(fig, path)
    return True


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    from scratch_sd.io import atomic_path

    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def write_check(rec, opts, elapsed: float) -> dict:
    from parity.check import COLUMNS

    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "parity.csv", "summary": out / "summary.md"}
    _write_text(paths["csv"], rows_to_csv(rec.rows, COLUMNS))
    _write_text(paths["summary"], summary_markdown(rec, opts, elapsed))
    if opts.plots:
        if plot_errors_by_step(rec, out / "error_by_step.png"):
            paths["error_plot"] = out / "error_by_step.png"
        if plot_images(rec, out / "images.png"):
            paths["images"] = out / "images.png"
    return paths
