"""What each optimisation of the scratch networks buys: time and peak memory, change by change.

    sdparity ablation --preset sd15 --components unet,vae_decode --dtypes fp32,bf16 --out DIR

Variants of the scratch network (the same weights), each against diffusers in the same run:
- `before`          every op out of place, NCHW: the scratch networks as they were before issue 7
                    (bit-identical to diffusers, like the default but slower and bigger)
- `inplace`         + inference writes into its own fresh intermediates (SiLU after GroupNorm, residual
                    and time-embedding adds, GEGLU's product): the same bits, fewer allocations
- `ff_chunks`       + the UNet's GEGLU feed-forward over 2048 tokens at a time (its (tokens, 2*inner)
                    intermediate is the UNet's largest tensor; rows are independent: the same bits)
- `channels_last`   + NHWC weights and activations: oneDNN's NHWC conv kernels, no layout reorders,
                    free (B,C,H,W) <-> (B,HW,C) views in attention
- `onednn_linear`   + fp32 linear layers through oneDNN instead of the BLAS sgemm (CPU, fp32 only).
                    This last row is the default (fast) mode; `before` and `inplace` are exact
                    (bit-identical to diffusers).

Timing: one untimed round, then `--repeats` rounds; in each round diffusers and every variant run one
after the other; ratio = median over rounds of variant / diffusers in the same round. Memory: as
`sdparity bench` measures it on a CPU (benchmarks/memory.py): one subprocess per variant holding
only that variant's network, glibc's mmap threshold fixed, VmHWM minus VmRSS around one call after
one warm-up call. Writes ablation.csv and ablation.md into --out.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass


import torch

from benchmarks import cases as C
from benchmarks import memory
from benchmarks.timing import CpuClock, interleaved, paired_ratio, summarize
from scratch_sd.names import DTYPES

VARIANTS = {  # name -> (in-place ops, GEGLU row chunks, channels_last, oneDNN fp32 linears): cumulative
    "before": (False, False, False, False),
    "inplace": (True, False, False, False),
    "ff_chunks": (True, True, False, False),
    "channels_last": (True, True, True, False),
    "onednn_linear": (True, True, True, True),
}
COMPONENTS = ("text_encoder", "unet", "vae_decode", "vae_encode")
COLUMNS = ("component", "dtype", "batch_size", "resolution", "impl", "median_ms", "p10_ms", "p90_ms",
           "ratio_vs_diffusers", "peak_mem_mb", "mem_ratio_vs_diffusers", "repeats", "max_abs_vs_diffusers")


class Variant:
    """A scratch network set to one variant; calling it runs the component with the in-place switch set."""

    def __init__(self, name: str, case: C.Case, net, inputs: dict):
        from scratch_sd import layers

        from scratch_sd.unet import GEGLU

        self.inplace, chunks, channels_last, onednn = VARIANTS[name]
        net.set_exact(not channels_last)
        for m in net.modules():
            if isinstance(m, GEGLU):
                m.exact = not chunks
            if isinstance(m, layers.Linear):
                m.exact = not onednn
        self.layers, self.net = layers, net
        self.fn = C.network_call(case.component, "plain", {_network(case): net}, inputs)

    def __call__(self):
        with self.layers.inference_options(inplace=self.inplace):
            return self.fn()


def _network(case: C.Case) -> str:
    return C.NETWORKS_OF[case.component][0]


def _case(component: str, dtype: str, cfg) -> C.Case:
    """One image at the preset's native size (sd15: 512 px, 64x64 latents; the UNet at CFG batch 2)."""
    return C.Case(component, dtype, 1, cfg.unet.sample_size * cfg.vae.downsample_factor)


def _build(preset: str, network: str, seed: int, side: str):
    from parity import zoo
    from parity.candidates.scratch import network_from_reference
    from scratch_sd.config import preset as get_preset

    cfg = get_preset(preset)
    ref = zoo.BUILDERS[network](cfg, seed)
    if side == "diffusers":
        return cfg, ref
    return cfg, network_from_reference(network, ref, cfg)


def _call(impl: str, case: C.Case, net, inputs: dict):
    if impl == "diffusers":
        return C.network_call(case.component, "diffusers", {_network(case): net}, inputs)
    return Variant(impl, case, net, inputs)


# --------------------------------------------------------------------------- memory child
def child(spec: dict) -> None:
    """One impl's network alone: for each dtype (fp32 first), warm up once, then the peak of one call."""
    from parity.references import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(spec["threads"])
    cfg, net = _build(spec["preset"], spec["network"], spec["seed"], spec["impl"])
    out = {}
    for dtype in spec["dtypes"]:
        net.to(DTYPES[dtype])
        case = _case(spec["component"], dtype, cfg)
        fn = _call(spec["impl"], case, net, C.make_inputs(case, cfg, "cpu"))
        with torch.inference_mode():
            fn()
            out[dtype] = memory.measure_peak_mb(fn)
        del fn
    print(memory.PREFIX + json.dumps(out), flush=True)


def measure_memory(spec: dict) -> dict[str, float]:
    env = {**os.environ, **memory.CHILD_ENV}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ablation", "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(memory.PREFIX):
            return json.loads(line[len(memory.PREFIX):])
    raise RuntimeError(f"memory child for {spec['impl']} failed: {proc.stderr.strip().splitlines()[-1:]}")


# --------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class AblationSettings:
    preset: str = "sd15"
    components: str = "unet,vae_decode"  # comma lists, as on the command line
    dtypes: str = "fp32,bf16"
    warmup: int = 1
    repeats: int = 3
    memory: bool = True
    threads: int | None = None
    seed: int = 0
    out: str = "reports/ablation"
    force: bool = False  # replace `out` if it exists


def run(args: AblationSettings) -> int:
    from parity.outputs import check_target, writing_dir

    components = [c for c in args.components.split(",") if c]
    dtypes = [d for d in args.dtypes.split(",") if d]
    impls = ["diffusers", *VARIANTS]
    for c in components:
        if c not in COMPONENTS:
            raise ValueError(f"unknown component {c!r}; known: {', '.join(COMPONENTS)}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; known: {', '.join(DTYPES)}")
    if not components or not dtypes or args.repeats < 1 or args.warmup < 0:
        raise ValueError("need at least one component and dtype, --repeats >= 1 and --warmup >= 0")
    dtypes.sort(key=list(DTYPES).index)
    out = check_target(args.out, "dir", args.force, "--out")
    torch.set_num_threads(args.threads or torch.get_num_threads())
    rows = []
    clock = CpuClock()
    from parity.references import quiet_libraries

    quiet_libraries()
    for component in components:
        network = C.NETWORKS_OF[component][0]
        cfg, ref = _build(args.preset, network, args.seed, "diffusers")
        from parity.candidates.scratch import network_from_reference

        nets = {"diffusers": ref, **{v: network_from_reference(network, ref, cfg) for v in VARIANTS}}
        for dtype in dtypes:
            for net in nets.values():
                net.to(DTYPES[dtype])
            case = _case(component, dtype, cfg)
            inputs = C.make_inputs(case, cfg, "cpu")
            calls = {impl: _call(impl, case, nets[impl], inputs) for impl in impls}
            with torch.inference_mode():
                outputs = {impl: _seeded(fn) for impl, fn in calls.items()}
                times = interleaved(calls, args.warmup, args.repeats, clock)
            for impl in impls:
                diff = (outputs[impl].float() - outputs["diffusers"].float()).abs().max().item()
                rows.append({"component": component, "dtype": dtype, "batch_size": case.batch_size,
                             "resolution": "" if component == "text_encoder" else case.resolution, "impl": impl,
                             **summarize(times[impl]), "ratio_vs_diffusers": paired_ratio(times[impl], times["diffusers"]),
                             "repeats": args.repeats, "max_abs_vs_diffusers": diff})
                print(f"{component} {dtype} {impl}: {rows[-1]['median_ms']:.0f} ms, "
                      f"ratio {rows[-1]['ratio_vs_diffusers']:.3f}, max_abs {diff:.2e}", flush=True)
        del nets, ref
        if args.memory:
            for impl in impls:
                spec = {"preset": args.preset, "network": network, "component": component, "impl": impl,
                        "dtypes": dtypes, "seed": args.seed, "threads": torch.get_num_threads()}
                peaks = measure_memory(spec)
                for r in rows:
                    if r["component"] == component and r["impl"] == impl:
                        r["peak_mem_mb"] = peaks[r["dtype"]]
                print(f"{component} {impl} peak: " + ", ".join(f"{d} {p:.0f} MiB" for d, p in peaks.items()), flush=True)
            for r in rows:
                if r["component"] == component:
                    base = next(b for b in rows if b["component"] == component and b["dtype"] == r["dtype"]
                                and b["impl"] == "diffusers")
                    r["mem_ratio_vs_diffusers"] = r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] else ""
    with writing_dir(out, args.force) as tmp:
        with open(tmp / "ablation.csv", "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS, restval="")
            w.writeheader()
            w.writerows(rows)
        (tmp / "ablation.md").write_text(markdown(rows, args))
    print(f"wrote {out / 'ablation.csv'} and {out / 'ablation.md'}")
    return 0


def _seeded(fn):
    """The call's output, with the global RNG seeded first (vae_encode samples its posterior)."""
    torch.manual_seed(0)
    out = fn()
    return out if torch.is_tensor(out) else out[0]


def markdown(rows: list[dict], args) -> str:
    lines = [f"# Ablation: scratch variants vs diffusers ({args.preset}, CPU, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"{args.repeats} interleaved repeats after {args.warmup} warm-up round(s); ratio = median of per-round "
             "ratios; memory = working memory of one call (VmHWM - VmRSS, own subprocess).", "",
             "| component | dtype | impl | median ms | time ratio | peak MiB | memory ratio | max abs vs diffusers |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") not in (None, "") else ""
        mr = f"{r['mem_ratio_vs_diffusers']:.3f}" if r.get("mem_ratio_vs_diffusers") not in (None, "") else ""
        lines.append(f"| {r['component']} | {r['dtype']} | {r['impl']} | {r['median_ms']:.0f} | "
                     f"{r['ratio_vs_diffusers']:.3f} | {mem} | {mr} | {r['max_abs_vs_diffusers']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the memory child: python -m benchmarks.ablation --child SPEC
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit("run the ablation with `sdparity ablation` (this module's own entry is its memory child)")
