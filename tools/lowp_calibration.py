"""Calibrate the pooled low-precision statistic (parity/lowp.py, issue 21, docs/lowp.md).

For each gate seed S and low dtype, run the default gate's direct network checks (parity.network_check
.check_networks, the same code `sdparity check --seed S --components text_encoder,vae,unet` runs; two
input seeds S, S+1 as the gate's default --num-seeds 2) for the correct scratch candidate and for
each injected precision bug (monkeypatched here, inside this process: the scratch code is untouched),
with a Recorder that pools (parity.lowp.Pool). One CSV line per (seed, dtype, component, tensor, bug):
the pooled rms ratio and its 95 % bootstrap upper bound, and the per-row rule's worst error_ratio
and how many of its rows failed.

    python tools/lowp_calibration.py --seeds 0-19 --dtypes bf16,fp16 --bug none,attn,gn_onepass --out lowp.csv
    python tools/lowp_calibration.py --summary lowp.csv      # the table of docs/lowp.md

Bugs (all "an op in the low dtype where the reference accumulates in fp32"):
  none         the correct scratch implementation
  attn         attention scores q@k^T and softmax materialised in the low dtype (SDPA keeps them fp32)
  gn_twopass   GroupNorm mean and variance (two-pass) computed in the low dtype
  gn_onepass   GroupNorm variance as E[x^2] - E[x]^2 in the low dtype
  gn_accum16   GroupNorm mean and variance sums kept in a low-dtype accumulator (16-element tiles
               summed in fp32, each tile added to the running sum in the low dtype)
  temb         the UNet's timestep-embedding arguments t * freqs and sin/cos in the low dtype
  linear16     every Linear accumulates its K dimension in 16-wide chunks summed in the low dtype
  linear8      the same with 8-wide chunks
Tiny preset, CPU, one process (seconds per seed and bug).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scratch_sd import layers  # noqa: E402
from scratch_sd import unet as unet_mod  # noqa: E402

LOW = (torch.bfloat16, torch.float16)
FIELDS = ["seed", "dtype", "component", "tensor", "bug", "tensors", "rms_ratio", "bound", "pooled_passed",
          "row_worst_ratio", "rows", "rows_failed"]


# --------------------------------------------------------------------------- injected bugs
def _attention_lowp(q, k, v, heads, causal=False, mask=None):
    if q.dtype not in LOW:
        return _ORIG["attention"](q, k, v, heads, causal, mask)
    q, k, v = layers.split_heads(q, heads), layers.split_heads(k, heads), layers.split_heads(v, heads)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # rounded to the low dtype
    if causal and mask is None:
        t = scores.shape[-1]
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    return layers.merge_heads(torch.softmax(scores, dim=-1) @ v)  # probabilities rounded to the low dtype


def _gn_with_stats(stats):
    """A GroupNorm forward whose low-dtype (mean, var) over each group `(B, G, n)` come from
    `stats(g)`: the one place each GroupNorm bug below differs."""
    def forward(self, x, overwrite=False):
        if x.dtype not in LOW:
            return _ORIG["gn_forward"](self, x, overwrite)
        b, c = x.shape[:2]
        g = x.reshape(b, self.num_groups, -1)  # all in the low dtype
        mean, var = stats(g)
        y = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)
    return forward


def _gn_lowp(onepass):
    def stats(g):
        mean = g.mean(-1, keepdim=True)
        var = ((g * g).mean(-1, keepdim=True) - mean * mean).clamp_min(0) if onepass \
            else ((g - mean) ** 2).mean(-1, keepdim=True)
        return mean, var
    return _gn_with_stats(stats)


def _accumulated_mean(g, chunk):
    """The mean over the last dim with a low-dtype accumulator: each `chunk`-wide partial sum (fp32
    inside, as one tile of a kernel) is added to a running sum held in g's dtype, in order."""
    n = g.shape[-1]
    pad = (-n) % chunk
    parts = F.pad(g, (0, pad)).reshape(*g.shape[:-1], -1, chunk).float().sum(-1).to(g.dtype)
    acc = torch.zeros(g.shape[:-1], dtype=g.dtype, device=g.device)
    for i in range(parts.shape[-1]):
        acc = acc + parts[..., i]  # rounded to the low dtype at every tile
    return (acc / n).unsqueeze(-1)


def _gn_accumulated(chunk):
    def stats(g):
        mean = _accumulated_mean(g, chunk)
        return mean, _accumulated_mean((g - mean) ** 2, chunk)  # two-pass: the accumulator alone is the bug
    return _gn_with_stats(stats)


def _time_embedding_lowp(self, x, t):
    if x.dtype not in LOW:
        return _ORIG["time_embedding"](self, x, t)
    t = unet_mod.timesteps_tensor(t, x.shape[0], x.device)
    half, shift = self.cfg.block_out_channels[0] // 2, self.cfg.freq_shift
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=x.device) / (half - shift))
    args = t[:, None].to(x.dtype) * freqs[None, :].to(x.dtype)  # the bug: t * freqs rounded to the low dtype
    cos, sin = torch.cos(args), torch.sin(args)
    emb = torch.cat([cos, sin] if self.cfg.flip_sin_to_cos else [sin, cos], dim=-1)
    return self.time_mlp(emb.to(x.dtype))


def _linear_lowp(chunk):
    def forward(self, x):
        if x.dtype not in LOW:
            return _ORIG["linear_forward"](self, x)
        k = x.shape[-1]
        y = None
        for i in range(0, k, chunk):  # partial sums rounded to the low dtype, added in it
            part = F.linear(x[..., i:i + chunk], self.weight[:, i:i + chunk])
            y = part if y is None else y + part
        return y if self.bias is None else y + self.bias
    return forward


_ORIG = {"attention": layers.attention, "gn_forward": layers.GroupNorm.forward,
         "time_embedding": unet_mod.UNet.time_embedding, "linear_forward": layers.Linear.forward}
BUGS = {
    "none": [],
    "attn": [(layers, "attention", _attention_lowp)],
    "gn_twopass": [(layers.GroupNorm, "forward", _gn_lowp(False))],
    "gn_onepass": [(layers.GroupNorm, "forward", _gn_lowp(True))],
    "temb": [(unet_mod.UNet, "time_embedding", _time_embedding_lowp)],
    "gn_accum16": [(layers.GroupNorm, "forward", _gn_accumulated(16))],
    "linear16": [(layers.Linear, "forward", _linear_lowp(16))],
    "linear8": [(layers.Linear, "forward", _linear_lowp(8))],
}


@contextlib.contextmanager
def injected(bug: str):
    """The scratch code with `bug` patched in for the duration of the block (restored after)."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in BUGS[bug]]
    try:
        for obj, name, fn in BUGS[bug]:
            setattr(obj, name, fn)
        yield
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)


# --------------------------------------------------------------------------- one gate seed
def run_seed(seed: int, dtypes: tuple[str, ...], bugs: list[str], components: str, num_seeds: int) -> list[dict]:
    """The direct checks of one gate seed, every bug, every dtype: the CSV lines."""
    from parity import network_check
    from parity.gate import GateSettings, Recorder, load_candidates
    from parity.lowp import SUFFIX, Pool
    from parity.references import quiet_libraries, references_for
    from parity.run_context import GateRun
    from parity.tolerances import Table

    settings = GateSettings.make(components=components, dtypes=",".join(dtypes), seed=seed, num_seeds=num_seeds)
    quiet_libraries()
    refs = references_for(settings)
    table = Table.load()
    cache: dict = {}
    orig_reference = network_check._reference

    def cached_reference(run, name, refs_, inp, s, dtype, layers_=False):  # the reference is bug-independent
        key = (name, s, dtype, layers_)
        if key not in cache:
            cache[key] = orig_reference(run, name, refs_, inp, s, dtype, layers_)
        return cache[key]

    out = []
    network_check._reference = cached_reference
    try:
        truths = None
        for bug in bugs:
            (g,) = load_candidates(settings)
            rec = Recorder(f"calib-{seed}-{bug}", "tiny", "cpu", table, lowp=Pool())
            run = GateRun(settings, refs, rec, lambda _m: None)
            if truths is None:
                network_check.reference_truths(run)
                truths = dict(run.truths)
            run.truths = dict(truths)
            with injected(bug):
                for dtype in dtypes:
                    t0 = time.time()
                    with run.candidate_at(g, dtype) as built:
                        network_check.check_networks(run, g, built, dtype)
                    print(f"  seed {seed} {bug} {dtype}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
            direct = [r for r in rec.rows if r.status == "compared"]
            for dtype in dtypes:
                for row in rec.lowp.rows(rec, dtype):
                    tensor = row.tensor[:-len(SUFFIX)]
                    per = [r for r in direct if r.dtype == dtype and r.component == row.component and r.tensor == tensor]
                    ratios = [float(r.error_ratio) for r in per if r.error_ratio != ""]
                    point = float(row.case.split()[0].split("=")[1]) if row.case else math.nan
                    out.append(dict(seed=seed, dtype=dtype, component=row.component, tensor=tensor, bug=bug,
                                    tensors=len(per), rms_ratio=point,
                                    bound=float(row.error_ratio) if row.error_ratio != "" else math.nan,
                                    pooled_passed=row.passed, row_worst_ratio=max(ratios) if ratios else math.nan,
                                    rows=len(per), rows_failed=sum(not r.passed for r in per)))
    finally:
        network_check._reference = orig_reference
    return out


# --------------------------------------------------------------------------- the table
def summary(path: Path) -> str:
    """Per (bug, dtype, component): pooled bound min/max over seeds (the worst tensor kind of each
    seed), seeds the pooled rule at the table's bar fails, seeds the per-row rule fails."""
    from parity.lowp import bars
    from parity.tolerances import Table

    table = Table.load()
    rows = list(csv.DictReader(path.open()))
    by = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0]))  # (bug, dtype, comp) -> seed -> [bound, ratio, fails]
    for r in rows:
        cell = by[(r["bug"], r["dtype"], r["component"])][int(r["seed"])]
        cell[0] = max(cell[0], float(r["bound"]))
        cell[1] = max(cell[1], float(r["row_worst_ratio"]))
        cell[2] += int(r["rows_failed"])
    lines = ["| bug | dtype | component | seeds | pooled bound min-max | seeds over the pooled bar "
             "| per-row worst ratio min-max | seeds the per-row rule fails |", "|" + "---|" * 8]
    for (bug, dtype, comp), seeds in sorted(by.items()):
        b = [v[0] for v in seeds.values()]
        w = [v[1] for v in seeds.values()]
        bar = bars(table, comp, "", dtype)
        over = sum(x > bar.max_rms_ratio for x in b) if bar else "-"
        lines.append(f"| {bug} | {dtype} | {comp} | {len(seeds)} | {min(b):.3f}-{max(b):.3f} | {over} | "
                     f"{min(w):.3f}-{max(w):.3f} | {sum(v[2] > 0 for v in seeds.values())} |")
    return "\n".join(lines)


def _seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0-19", help="gate seeds: 0-19 or 0,3,5")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--bug", default="none," + ",".join(b for b in BUGS if b != "none"),
                   help=f"comma list of {', '.join(BUGS)}")
    p.add_argument("--components", default="text_encoder,vae,unet")
    p.add_argument("--num-seeds", type=int, default=2, help="input seeds per gate seed (the gate's default: 2)")
    p.add_argument("--out", type=Path, default=Path("reports/lowp_calibration.csv"))
    p.add_argument("--summary", type=Path, help="print the table of an existing CSV and exit")
    a = p.parse_args(argv)
    if a.summary:
        print(summary(a.summary))
        return 0
    bugs = [b for b in a.bug.split(",") if b]
    unknown = [b for b in bugs if b not in BUGS]
    if unknown:
        p.error(f"unknown bug {unknown[0]!r}; known: {', '.join(BUGS)}")
    dtypes = tuple(d for d in a.dtypes.split(",") if d)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    new = not a.out.exists()
    with a.out.open("a", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        if new:
            w.writeheader()
        for s in _seeds(a.seeds):
            t0 = time.time()
            lines = run_seed(s, dtypes, bugs, a.components, a.num_seeds)
            w.writerows(lines)
            f.flush()
            print(f"seed {s}: {len(lines)} lines in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    print(summary(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
