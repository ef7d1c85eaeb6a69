"""bench.csv, summary.md and the plots of a benchmark run (all written atomically)."""
from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path

from benchmarks.timing import fit_growth_exponent

# design.md's contract (never rename these), then ours.
CONTRACT_COLUMNS = [
    "run_id", "component", "impl", "dtype", "device", "device_name", "batch_size", "resolution", "warmup",
    "repeats", "median_ms", "p10_ms", "p90_ms", "peak_mem_mb", "gflop", "achieved_gflops", "peak_fraction",
    "ratio_vs_diffusers", "torch_version", "diffusers_version", "threads", "git_sha", "timestamp",
]
EXTRA_COLUMNS = [
    "status", "reason", "preset", "images", "sweeps", "min_ms", "max_ms", "first_call_ms", "ratio_p10", "ratio_p90",
    "per", "weights_mb", "mem_method", "matmul_peak_gflops", "clock", "steps", "scheduler", "stages", "load_avg_1m",
]
COLUMNS = CONTRACT_COLUMNS + EXTRA_COLUMNS


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _fmt(row.get(c)) for c in COLUMNS})
    _atomic_write(path, buf.getvalue().encode())


# --------------------------------------------------------------------------- summary
def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _ms(v) -> str:
    if v is None or v == "":
        return "-"
    v = float(v)
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _num(v, digits=3) -> str:
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{float(v):.{digits}g}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _spread(row: dict) -> str:
    lo, hi = row.get("ratio_p10"), row.get("ratio_p90")
    return "-" if lo in (None, "") or hi in (None, "") else f"{float(lo):.3g}-{float(hi):.3g}"


def _min_time(meta: dict) -> str:
    from benchmarks.timing import MAX_REPEATS

    t = meta.get("min_time_s") or 0
    return f", and more rounds (up to {MAX_REPEATS}) until a case's timed calls add up to {t:g} s" if t else ""


def main_table(rows: list[dict], impls: list[str]) -> str:
    main = [r for r in _ok(rows) if "main" in r["sweeps"].split(";")]
    groups = defaultdict(dict)
    for r in main:
        groups[(r["component"], r["dtype"], r["batch_size"], r["resolution"])][r["impl"]] = r
    others = [i for i in impls if i != "diffusers"]
    header = ["component", "dtype", "batch", "res"] + [f"{i} ms" for i in impls] + \
             [f"{i}/diffusers" for i in others] + [f"{i}/diffusers p10-p90" for i in others] + ["rounds", "GFLOP"] + \
             [f"{i} GFLOP/s" for i in impls] + [f"{i} peak MiB" for i in impls]
    lines = []
    for (comp, dtype, batch, res), by in groups.items():
        line = [comp, dtype, str(batch), str(res or "-")]
        line += [_ms(by[i].get("median_ms")) if i in by else "-" for i in impls]
        line += [_num(by[i].get("ratio_vs_diffusers")) if i in by else "-" for i in others]
        line += [_spread(by[i]) if i in by else "-" for i in others]
        any_row = next(iter(by.values()))
        line += [str(any_row.get("repeats", "-")), _num(any_row.get("gflop"), 4)]
        line += [_num(by[i].get("achieved_gflops")) if i in by else "-" for i in impls]
        line += [_num(by[i].get("peak_mem_mb"), 4) if i in by else "-" for i in impls]
        lines.append(line)
    return _table(header, lines)


def stage_table(rows: list[dict]) -> str:
    """Per-stage pipeline latency (as NVIDIA's TensorRT demo prints): one column per impl x dtype."""
    pipes = [r for r in _ok(rows) if r["component"] == "pipeline"]
    if not pipes:
        return "_no pipeline case ran_"
    header = ["stage"] + [f"{r['impl']} {r['dtype']} ({r['resolution']}px, b{r['batch_size']})" for r in pipes]
    stages = [dict(kv.split("=", 1) for kv in r["stages"].split(";") if kv) for r in pipes]
    names = []
    for s in stages:
        names += [n for n in s if n not in names]
    lines = [[n] + [s.get(n, "-") for s in stages] for n in names]
    lines.append(["**pipeline (end to end, median)**"] + [f"**{_ms(r['median_ms'])} ms**" for r in pipes])
    return _table(header, lines)


def growth(rows: list[dict], sweep: str, x_of) -> tuple[str, dict]:
    """Table of a sweep and the fitted exponent k of time ~ x^k per (component, impl, dtype)."""
    pts = defaultdict(list)
    for r in _ok(rows):
        if sweep in r["sweeps"].split(";"):
            pts[(r["component"], r["impl"], r["dtype"])].append((x_of(r), float(r["median_ms"]), r))
    lines, fits = [], {}
    for key, p in sorted(pts.items()):
        p.sort(key=lambda t: t[0])
        k = fit_growth_exponent([x for x, _, _ in p], [y for _, y, _ in p])
        fits[key] = k
        cells = ", ".join(f"{_label(sweep, r)}: {_ms(y)} ms" for _, y, r in p)
        lines.append([*key, cells, _num(k)])
    what = "pixels" if sweep == "resolution" else "batch"
    return _table(["component", "impl", "dtype", "median per point", f"exponent k (time ~ {what}^k)"], lines), fits


def _label(sweep: str, r: dict) -> str:
    return f"{r['resolution']}px" if sweep == "resolution" else f"b{r['batch_size']}"


def skipped_table(rows: list[dict]) -> str:
    bad = [r for r in rows if r.get("status") != "ok"]
    if not bad:
        return "_none_"
    return _table(["component", "impl", "dtype", "batch", "res", "status", "reason"],
                  [[r["component"], r["impl"], r["dtype"], str(r["batch_size"]), str(r["resolution"] or "-"),
                    r["status"], r["reason"]] for r in bad])


def write_summary(rows: list[dict], meta: dict, path: Path) -> None:
    impls = meta["impls"]
    res_table, _ = growth(rows, "resolution", lambda r: float(r["resolution"]) ** 2)
    batch_table, _ = growth(rows, "batch", lambda r: float(r["batch_size"]))
    peaks = ", ".join(f"{d} {v['peak_gflops']:.4g} GFLOP/s (n={v['peak_n']})" for d, v in meta["matmul_peak"].items())
    text = f"""# sdparity bench: {meta['run_id']}

- preset `{meta['preset']}`, device `{meta['device']}` ({meta['device_name']}), torch threads: {meta['threads']}
- torch {meta['torch_version']}, diffusers {meta['diffusers_version']}, git {meta['git_sha']}
- started {meta['started']}, took {meta['elapsed_s']:.0f} s; 1-minute load average {meta['load_start']} at start, {meta['load_end']} at the end
- warmup {meta['warmup']}, repeats {meta['repeats']} (sweep-only points: warmup {meta['sweep_warmup']}, repeats {meta['sweep_repeats']}; pipeline: warmup {meta['pipeline_warmup']}, repeats {meta['pipeline_repeats']}){_min_time(meta)}; impls interleaved A B A B per repeat
- pipeline and scheduler_step: scheduler `{meta['scheduler']}`, {meta['steps']} steps, guidance {meta['guidance']}
- measured matmul peak: {peaks}
- memory: {meta['mem_note']}

Times are medians of the repeats (wall clock on the CPU, CUDA events on the GPU).
`X/diffusers` is the median over repeats of the per-repeat ratio X time / diffusers time
(below 1: X is faster). unet and text_encoder run at the classifier-free-guidance batch
(2 x images). scheduler_step is per step. GFLOP counts matmuls and convolutions
(torch's FlopCounterMode, attention through the math kernel); GFLOP/s = GFLOP / median time.
Peak MiB is the call's working memory above the weights and inputs ({meta['mem_method']}).

## Components

{main_table(rows, impls)}

## Pipeline stages (ms per call, median over repeats; unet is the sum over its calls)

{stage_table(rows)}

## Resolution sweep

{res_table}

## Batch sweep

{batch_table}

## Skipped or failed cases

{skipped_table(rows)}
"""
    _atomic_write(path, text.encode())


# --------------------------------------------------------------------------- plots
def write_plots(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "latency_by_component.png", out / "time_vs_resolution.png", out / "time_vs_batch.png"]
    ok = _ok(rows)
    _bar_plot(plt, [r for r in ok if "main" in r["sweeps"].split(";")], paths[0])
    _line_plot(plt, ok, "resolution", lambda r: int(r["resolution"]), "resolution (pixels per side)", paths[1])
    _line_plot(plt, ok, "batch", lambda r: int(r["batch_size"]), "batch (tensor batch of the component)", paths[2])
    return paths


def _save(fig, plt, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


_COMPONENT_ORDER = ("text_encoder", "unet", "vae_decode", "vae_encode", "scheduler_step", "pipeline")
_DTYPE_ORDER = ("fp32", "bf16", "fp16")
_STYLE = {"fp32": "-", "bf16": "--", "fp16": ":"}


def _order(values, order):
    return sorted(values, key=lambda v: (order.index(v) if v in order else len(order), v))


def _bar_plot(plt, rows, path: Path) -> None:
    comps = _order({r["component"] for r in rows}, _COMPONENT_ORDER)
    dtypes = _order({r["dtype"] for r in rows}, _DTYPE_ORDER)
    groups = [(c, d) for c in comps for d in dtypes if any(r["component"] == c and r["dtype"] == d for r in rows)]
    impls = sorted({r["impl"] for r in rows}, key=lambda i: (i != "diffusers", i))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(groups) + 2), 4.8))
    width = 0.8 / max(len(impls), 1)
    for j, impl in enumerate(impls):
        by = {(r["component"], r["dtype"]): float(r["median_ms"]) for r in rows if r["impl"] == impl}
        xs = [i + j * width for i, g in enumerate(groups) if g in by]
        ax.bar(xs, [by[g] for g in groups if g in by], width, label=impl)
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{c} {d}" for c, d in groups], fontsize=8, rotation=35, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("median latency per call (ms, log)")
    ax.set_title("latency by component x dtype (scheduler_step: per step)")
    if not groups:
        ax.text(0.5, 0.5, "no case ran", ha="center", va="center", transform=ax.transAxes)
    if impls:
        ax.legend()
    _save(fig, plt, path)


def _line_plot(plt, rows, sweep: str, x_of, xlabel: str, path: Path) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    series = defaultdict(list)
    for r in rows:
        if sweep in r["sweeps"].split(";"):
            series[(r["component"], r["impl"], r["dtype"])].append((x_of(r), float(r["median_ms"])))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    impls = sorted({k[1] for k in series}, key=lambda i: (i != "diffusers", i))
    colors = {i: f"C{n}" for n, i in enumerate(impls)}
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=" ".join(key), color=colors[key[1]],
                linestyle=_STYLE.get(key[2], "-."))
    if series:
        xs = sorted({x for pts in series.values() for x, _ in pts})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no {sweep} sweep ran", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel + " (log)")
    ax.set_ylabel("median latency (ms, log)")
    ax.set_title(f"time vs {sweep}")
    _save(fig, plt, path)
