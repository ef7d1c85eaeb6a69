"""A gate run's folder: parity.csv, summary.md and plots, written whole (parity.outputs)."""
from __future__ import annotations

import math
import platform
from collections import defaultdict
from pathlib import Path

import torch

from parity.outputs import writing_dir
from parity.rows import COLUMNS, Row, binding, fmt, to_csv
from scratch_sd.names import NETWORKS



def failure_line(r: Row) -> str:
    where = f"{r.candidate + ' ' if r.candidate else ''}{r.component} {r.dtype} {r.mode} {r.tensor}"
    if r.step not in ("", None):
        where += f" step {r.step}"
    if r.case:
        where += f" [{r.case}]"
    if r.scheduler:
        where += f" ({r.scheduler})"
    nums = f"max_abs={fmt(r.max_abs)} rel_l2={fmt(r.rel_l2)} psnr={fmt(r.psnr_db)} dB"
    return f"FAIL {where}: {nums}; {r.reason}"


def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def worst(rows: list[Row]) -> dict:
    """Worst numbers over compared rows with finite metrics (non-finite rows are listed apart)."""
    comp = [r for r in rows if r.compared]
    fin = [r for r in comp if _finite(r.max_abs)]
    return {
        "n": len(comp),
        "failed": sum(not r.passed for r in comp),
        "max_abs": max((r.max_abs for r in fin), default=math.nan),
        "rel_l2": max((r.rel_l2 for r in fin if _finite(r.rel_l2)), default=math.nan),
        "psnr_db": min((r.psnr_db for r in fin if r.tensor not in ("timesteps", "sigmas") and _finite(r.psnr_db)),
                       default=math.nan),
        "ratio": max((r.error_ratio for r in comp if isinstance(r.error_ratio, float)), default=None),
    }


def _cell(rs: list[Row]) -> str:
    if not rs:
        return "—"
    if all(r.status == "skipped" for r in rs):
        return "skipped"
    w = worst(rs)
    verdict = "**FAIL**" if w["failed"] else "PASS"
    cell = (f"{verdict} {w['n'] - w['failed']}/{w['n']}; max_abs {fmt(w['max_abs'])}, "
            f"rel_l2 {fmt(w['rel_l2'])}, PSNR {fmt(w['psnr_db'])} dB")
    if w["ratio"] is not None:
        cell += f", ratio {w['ratio']:.2f}"
    return cell


def side_by_side(rows: list[Row]) -> list[str]:
    """candidate x component rows, one column per dtype, each cell the worst numbers and the verdict."""
    dtypes = [d for d in ("fp32", "bf16", "fp16") if any(r.dtype == d for r in rows)]
    keys = list(dict.fromkeys((r.candidate, r.component) for r in rows))
    by = defaultdict(list)
    for r in rows:
        by[(r.candidate, r.component, r.dtype)].append(r)
    profile = {(r.candidate): r.profile for r in rows}
    lines = ["| candidate | profile | component | " + " | ".join(dtypes) + " |", "|---|---|---|" + "---|" * len(dtypes)]
    for cand, comp in keys:
        gating = all(r.gating for r in rows if r.candidate == cand)
        name = cand if gating else f"{cand} (informational)"
        cells = [_cell(by.get((cand, comp, d), [])) for d in dtypes]
        lines.append(f"| {name} | {profile.get(cand, '')} | {comp} | " + " | ".join(cells) + " |")
    return lines


def tightest_margins(rows: list[Row], n: int = 10) -> list[str]:
    """The `n` passing rows closest to their bar (largest finite margin), as a markdown table."""
    passing = [r for r in rows if r.compared and r.passed and isinstance(r.margin, (int, float))
               and not isinstance(r.margin, bool) and math.isfinite(r.margin)]
    passing.sort(key=lambda r: -r.margin)
    lines = ["| candidate | component | dtype | tensor | mode / case | binds | margin |", "|---|---|---|---|---|---|---|"]
    for r in passing[:n]:
        tensor = r.tensor + (f" step {r.step}" if r.step not in ("", None) else "")
        where = " / ".join(x for x in (r.mode, r.case, r.scheduler if r.mode == "loop" else "") if x)
        lines.append(f"| {r.candidate} | {r.component} | {r.dtype} | {tensor} | {where} | {binding(r)} | "
                     f"{r.margin:.3g} |")
    return lines if passing else ["none"]


def summary_markdown(result) -> str:
    rows, st = result.rows, result.settings
    modes = sorted({r.net_mode for r in rows if r.net_mode})
    lines = [f"# sdparity check — {result.preset_label}", "",
             f"run `{result.run_id}`, device {st.device} ({platform.processor() or platform.machine()}), "
             f"torch {torch.__version__}, {result.elapsed_s:.1f} s; candidates {', '.join(st.candidates)}; "
             f"schedulers {', '.join(st.schedulers)}, {st.steps} steps, {st.size}px, seed {st.seed}; "
             f"tolerances {st.tolerances or 'parity/tolerances.toml'}; reference {result.source}"
             + (f"; scratch networks in {', '.join(modes)} mode" if modes else ""), "",
             "## Side by side (worst numbers over every compared tensor)", "",
             "Each cell: verdict, passed/compared, worst max_abs, worst rel_l2, lowest PSNR; for fp16/bf16 under the "
             "exact profile also the worst ratio of the candidate's error to diffusers' own error against fp32.", ""]
    lines += side_by_side(rows)
    lines += ["", "## Tightest passing margins", "",
              "The passing rows closest to their bar: margin = error / bar of the rule that binds (parity.csv "
              "`margin`; > 1 fails; reports/README.md defines it per rule).", ""]
    lines += tightest_margins(rows)
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    skipped = [r for r in rows if r.status == "skipped"]
    if skipped:
        lines += ["", "## Skipped", ""]
        seen = set()
        for r in skipped:
            key = (r.candidate, r.component, r.dtype, r.reason)
            if key not in seen:
                seen.add(key)
                lines.append(f"- {r.candidate} {r.component} {r.dtype}: {r.reason}")
    odd = [r for r in rows if r.compared and r.passed and not _finite(r.max_abs)]
    if odd:
        lines += ["", "## Findings: non-finite in both implementations (equal where finite)", ""]
        lines += [f"- {r.component} {r.scheduler} {r.tensor} steps={r.step}: {r.reason}" for r in odd]
    failed = [r for r in rows if r.failed]
    lines += ["", f"## Failures ({len(failed)})", ""]
    lines += [f"- {failure_line(r)}{'' if r.gating else ' (informational)'}" for r in failed[:100]] or ["none"]
    hints = localize_hints(result)
    if hints:
        lines += ["", "Localise the first diverging layer:", ""] + [f"    {h}" for h in hints]
    lines += ["", "Columns of parity.csv are explained in reports/README.md.", ""]
    return "\n".join(lines)


def localize_hints(result) -> list[str]:
    st = result.settings
    source = f"--model {st.model}" if st.model else f"--preset {st.preset}"
    nets = sorted({(r.candidate, r.component, r.dtype) for r in result.rows
                   if r.failed and r.component in NETWORKS})
    return [f"sdparity localize --component {n} --dtype {d} {source}" + ("" if c == "scratch" else f" --candidate {c}")
            for c, n, d in nets]


def plot_errors_by_step(rows: list[Row], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in rows:
        if r.compared and r.tensor == "latents" and r.mode in ("txt2img", "img2img") and _finite(r.max_abs):
            series[(r.dtype, r.mode, r.scheduler, f"{r.candidate}:{r.component}")].append((int(r.step), r.max_abs))
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
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
    return True


def plot_images(images: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(k for k, v in images.items() if "diffusers" in v and len(v) > 1)
    if not keys:
        return False
    fig, axes = plt.subplots(len(keys), 3, figsize=(9, 3.2 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        imgs = images[key]
        other = "all_swapped" if "all_swapped" in imgs else next(k for k in imgs if k != "diffusers")
        ref, out = imgs["diffusers"][0].float(), imgs[other][0].float()
        diff = (out - ref).abs().amax(-1)
        title = " ".join(key[1:])
        row[0].imshow(ref.clamp(0, 1).numpy())
        row[0].set_title(f"diffusers {title}", fontsize=8)
        row[1].imshow(out.clamp(0, 1).numpy())
        row[1].set_title(f"{key[0]} {other} {title}", fontsize=8)
        im = row[2].imshow(diff.nan_to_num(0).numpy(), cmap="inferno")
        row[2].set_title(f"|diff| max {float(diff.max()):.2g}", fontsize=8)
        fig.colorbar(im, ax=row[2], fraction=0.046)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
    return True


def write_check(result, out: str | Path, plots: bool = True, force: bool = False,
                extra: dict[str, bytes] | None = None) -> dict[str, Path]:
    """The run folder at `out`, written whole: parity.csv, summary.md, plots, and `extra` files."""
    out = Path(out)
    names = {"csv": "parity.csv", "summary": "summary.md"}
    with writing_dir(out, force=force) as tmp:
        (tmp / names["csv"]).write_text(to_csv(result.rows, COLUMNS), encoding="utf-8")
        (tmp / names["summary"]).write_text(summary_markdown(result), encoding="utf-8")
        if plots:
            if plot_errors_by_step(result.rows, tmp / "error_by_step.png"):
                names["error_plot"] = "error_by_step.png"
            if plot_images(result.images, tmp / "images.png"):
                names["images"] = "images.png"
        for name, data in (extra or {}).items():
            (tmp / name).write_bytes(data)
            names[name] = name
    return {k: out / v for k, v in names.items()}
