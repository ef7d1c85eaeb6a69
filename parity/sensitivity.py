"""How small a change in one layer does the default gate see?

For one network and a candidate: perturb each paired layer's output in turn (a forward hook on the
candidate's module) by a known relative amount d, run the default gate's direct check for that
network (the same inputs, seeds and tolerance bars: `parity.network_check` and
`parity.tolerances.judge`, exactly as the gate's Recorder judges a row), and find by bisection in
log d the smallest d the gate detects (any row fails). Two perturbations:

- scale:  the first of SCALE_GROUPS equal channel groups multiplied by (1 + d);
- offset: d x the output's standard deviation added to every element.

Each evaluation is one pass of the candidate over the gate's inputs; the reference outputs (and,
at bf16/fp16, the fp32 truths) are computed once. The sweep itself (`floor`, `sweep`) takes any
`detects(layer, kind, d) -> bool`, so a synthetic network tests it against analytical floors.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from parity.adapters import as_plain
from parity.candidates import BuildRequest
from parity.network_check import _candidate_outputs, _inputs, _reference_outputs
from parity.run_context import cache_dir, calling, normalise
from parity.tolerances import Table, judge
from scratch_sd.names import DTYPES, NETWORKS

KINDS = ("scale", "offset")
SCALE_GROUPS = 8  # the scaled channel group is 1/8 of the channels (at least one channel)
D_LO, D_HI = 1e-7, 1.0  # the searched range of d: below fp32 rounding of a sum, up to doubling
BLIND_AT = 1e-3  # a layer whose 1e-3 change goes unseen is a blind spot
STEPS = 6  # bisection steps in log d: 7 decades / 2^6 -> d* within a factor 10^(7/64) ~ 1.29
SEEDS = 2  # the default gate's --num-seeds


@dataclass(frozen=True)
class SensitivitySettings:
    component: str
    preset: str = "tiny"
    candidate: str = "scratch"
    dtype: str = "fp32"
    kinds: tuple[str, ...] = KINDS
    d_lo: float = D_LO
    d_hi: float = D_HI
    steps: int = STEPS
    seed: int = 0
    num_seeds: int = SEEDS
    device: str = "cpu"
    layers: str = ""  # only layers whose reference or candidate name contains this text ("" = all)
    tolerances: Path | None = None

    def __post_init__(self):
        if self.component not in NETWORKS:
            raise ValueError(f"unknown component {self.component!r}; sensitivity takes one of {', '.join(NETWORKS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        bad = [k for k in self.kinds if k not in KINDS]
        if not self.kinds or bad:
            raise ValueError(f"unknown perturbation kind {(bad or [''])[0]!r}; known: {', '.join(KINDS)}")
        if not (math.isfinite(self.d_lo) and math.isfinite(self.d_hi) and 0 < self.d_lo < self.d_hi):
            raise ValueError(f"d range must be 0 < d_lo < d_hi, finite (got {self.d_lo:g}..{self.d_hi:g})")
        if self.steps < 1 or self.num_seeds < 1:
            raise ValueError("steps and num_seeds must be >= 1")


@dataclass
class Layer:
    candidate: str  # the candidate's module name
    reference: str  # the reference's module name
    kind: str  # conv, linear, groupnorm, layernorm, attention, resnet, transformer, ...
    module: nn.Module | None = None


@dataclass
class Floor:
    d_star: float  # smallest d seen detected (inf: never detected up to d_hi; d_lo: already at d_lo)
    d_pass: float  # largest d seen undetected (0 when d_lo is already detected)
    evals: int

    @property
    def blind(self) -> bool:
        return not self.d_star <= BLIND_AT


@dataclass
class SensitivityRow:
    candidate_layer: str
    reference_layer: str
    layer_kind: str
    perturbation: str
    d_star: float
    d_pass: float
    evaluations: int
    blind_spot: bool


@dataclass
class SensitivityResult:
    settings: SensitivitySettings
    rows: list[SensitivityRow]
    elapsed_s: float
    baseline_evals: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return self.baseline_evals + sum(r.evaluations for r in self.rows)


# --------------------------------------------------------------------------- the search
def floor(detects: Callable[[float], bool], d_lo: float = D_LO, d_hi: float = D_HI, steps: int = STEPS) -> Floor:
    """Smallest detected d in [d_lo, d_hi] by bisection in log d (detection assumed monotone in d)."""
    if not detects(d_hi):
        return Floor(math.inf, d_hi, 1)
    if detects(d_lo):
        return Floor(d_lo, 0.0, 2)
    lo, hi, n = math.log(d_lo), math.log(d_hi), 2
    for _ in range(steps):
        mid = (lo + hi) / 2
        n += 1
        if detects(math.exp(mid)):
            hi = mid
        else:
            lo = mid
    return Floor(math.exp(hi), math.exp(lo), n)


def sweep(layers: list[Layer], detects: Callable[[Layer, str, float], bool], kinds=KINDS, d_lo: float = D_LO,
          d_hi: float = D_HI, steps: int = STEPS, say: Callable[[str], None] | None = None) -> list[SensitivityRow]:
    rows = []
    for i, layer in enumerate(layers):
        for kind in kinds:
            f = floor(lambda d: detects(layer, kind, d), d_lo, d_hi, steps)
            rows.append(SensitivityRow(layer.candidate, layer.reference, layer.kind, kind, f.d_star, f.d_pass,
                                       f.evals, f.blind))
        if say:
            got = ", ".join(f"{r.perturbation} d*={r.d_star:.3g}" for r in rows[-len(kinds):])
            say(f"{i + 1}/{len(layers)} {layer.reference}: {got}")
    return rows


# --------------------------------------------------------------------------- perturbations
def perturbed(t: torch.Tensor, kind: str, d: float, channel_dim: int) -> torch.Tensor:
    """`t` with one perturbation of relative size d (a new tensor)."""
    if kind == "offset":
        return t + d * t.float().std().to(t.dtype)
    c = t.shape[channel_dim]
    shape = [1] * t.dim()
    shape[channel_dim] = c
    scale = torch.ones(c, dtype=torch.float32, device=t.device)
    scale[: max(1, c // SCALE_GROUPS)] += d
    return t * scale.view(shape).to(t.dtype)


def channel_dim(t: torch.Tensor) -> int:
    """Channels: dim 1 of an image-shaped tensor (N, C, H, W), the last one of a sequence (N, L, C)."""
    return 1 if t.dim() == 4 else t.dim() - 1


def _hook(kind: str, d: float):
    def hook(_module, _args, out):
        if isinstance(out, torch.Tensor):
            return perturbed(out, kind, d, channel_dim(out))
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (perturbed(out[0], kind, d, channel_dim(out[0])),) + out[1:]
        return None
    return hook


LAYER_KINDS = (("conv", "conv"), ("linear", "linear"), ("groupnorm", "groupnorm"), ("layernorm", "layernorm"),
               ("attention", "attention"), ("resnet", "resnet"), ("resblock", "resnet"),
               ("transformer", "transformer"), ("embedding", "embedding"), ("geglu", "geglu"),
               ("upsample", "upsample"), ("downsample", "downsample"), ("mlp", "mlp"))


def layer_kind(module: nn.Module) -> str:
    name = type(module).__name__.lower()
    return next((k for key, k in LAYER_KINDS if key in name), name)


# --------------------------------------------------------------------------- the network
def candidate_layers(built, names: list[str]) -> list[Layer]:
    """The candidate's modules paired with the reference's names (its tap, or the reference's own names)."""
    tap = built.tap
    if tap is not None and hasattr(tap, "module") and hasattr(tap, "pairs"):
        module, pairs = tap.module, list(tap.pairs)
    elif built.same_names:
        module = getattr(built.module, "_orig_mod", built.module)
        have = dict(module.named_modules())
        pairs = [(n, n) for n in names if n in have]
    else:
        raise ValueError("the candidate gives no module layer map (Built.tap from module_tap, or same_names): "
                         "its layers cannot be perturbed")
    have = dict(module.named_modules())
    order = {n: i for i, n in enumerate(names)}
    layers = [Layer(c, r, layer_kind(have[c]), have[c]) for c, r in pairs if c in have]
    return sorted(layers, key=lambda x: order.get(x.reference, len(order)))


class DirectCheck:
    """The default gate's direct check of one network, the reference side computed once."""

    def __init__(self, settings: SensitivitySettings, refs, cand):
        from parity.gate import Gated

        st = self.settings = settings
        self.component, self.dtype, dt = st.component, st.dtype, DTYPES[st.dtype]
        self.gated = Gated(st.candidate, cand)
        self.table = Table.load(st.tolerances)
        net = refs.networks[st.component]
        reference = net if st.dtype == "fp32" and st.device == "cpu" else \
            copy.deepcopy(net).to(device=st.device, dtype=dt).eval()
        request = BuildRequest(st.component, net, refs.cfg, dt, torch.device(st.device), cache_dir(), refs.path,
                               hasher=lambda: refs.weights_hash(st.component))
        with calling(st.candidate, f"build({st.component}, {st.dtype})"):
            self.built = normalise(cand.build(request), net)
        self.ours = as_plain(st.component, self.built, net)
        self.cases = []  # (inputs, [(tensor, case, reference output)], fp32 truths or None)
        with torch.no_grad():
            for s in range(st.seed, st.seed + st.num_seeds):
                inp = _inputs(st.component, refs.cfg, s, st.dtype, st.device, refs.tokenizer)
                ref_outs = _reference_outputs(st.component, reference, inp, s)
                truths = None
                if st.dtype != "fp32":
                    inp32 = _inputs(st.component, refs.cfg, s, "fp32", st.device, refs.tokenizer)
                    net32 = net.to(st.device)
                    truths = [o[2].float().cpu() for o in _reference_outputs(st.component, net32, inp32, s)]
                self.cases.append((s, inp, ref_outs, truths))

    def failures(self, stop_at_first: bool = True) -> list[str]:
        """The reasons of the gate rows this candidate fails now ([] = the gate passes)."""
        out = []
        with torch.no_grad(), calling(self.settings.candidate, f"{self.component} ({self.dtype})"):
            for s, inp, ref_outs, truths in self.cases:
                outs = _candidate_outputs(self.component, self.ours, inp, s)
                for i, ((tensor, case, r), o) in enumerate(zip(ref_outs, outs)):
                    if self.gated.profile == "exact":
                        tol = self.table.lookup(self.component, tensor, self.dtype)
                        v = judge(r, o, tol, self.dtype, None if truths is None else truths[i])
                        ok, reason = v.passed, v.reason
                    else:
                        f = self.table.judge_profile(self.gated.profile, self.component, tensor, r, o)
                        ok, reason = f["passed"], f["reason"]
                    if not ok:
                        out.append(f"{tensor} {case}: {reason}")
                        if stop_at_first:
                            return out
        return out

    def detects(self, layer: Layer, kind: str, d: float) -> bool:
        handle = layer.module.register_forward_hook(_hook(kind, d))
        try:
            return bool(self.failures())
        finally:
            handle.remove()


def run_sensitivity(settings: SensitivitySettings, refs=None, say: Callable[[str], None] | None = None
                    ) -> SensitivityResult:
    from parity import candidates
    from parity.localize import reference_layer_names
    from parity.references import build_references, quiet_libraries

    st, t0 = settings, time.time()
    cand = candidates.load(st.candidate)
    if st.component not in cand.components:
        raise ValueError(f"candidate {st.candidate!r} does not provide {st.component} (it has "
                         f"{', '.join(cand.components)})")
    reason = cand.unavailable() or cand.supports(st.component, st.dtype, st.device)
    if reason:
        raise ValueError(f"candidate {st.candidate!r} cannot run {st.component} at {st.dtype} on {st.device}: {reason}")
    quiet_libraries()
    if refs is None:
        if say:
            say(f"building {st.preset} references ({st.component})")
        refs = build_references(st.preset, None, (st.component,), seed=st.seed)
    check = DirectCheck(st, refs, cand)
    base = check.failures(stop_at_first=False)
    if base:
        raise ValueError(f"candidate {st.candidate!r} already fails the gate's {st.component} {st.dtype} check "
                         f"unperturbed ({base[0]}): a detection floor needs a passing baseline")
    layers = candidate_layers(check.built, reference_layer_names(st.component, refs.cfg))
    if st.layers:
        layers = [x for x in layers if st.layers in x.reference or st.layers in x.candidate]
    if not layers:
        raise ValueError(f"no layer of {st.component} matches --layers {st.layers!r}")
    if say:
        say(f"{len(layers)} layers x {len(st.kinds)} perturbations, d in [{st.d_lo:g}, {st.d_hi:g}], "
            f"{st.steps} bisection steps, gate seeds {st.seed}..{st.seed + st.num_seeds - 1}")
    rows = sweep(layers, check.detects, st.kinds, st.d_lo, st.d_hi, st.steps, say)
    return SensitivityResult(st, rows, time.time() - t0)


# --------------------------------------------------------------------------- reports
COLUMNS = ("candidate_layer", "reference_layer", "layer_kind", "perturbation", "d_star", "d_pass", "evaluations",
           "blind_spot")


def by_kind(rows: list[SensitivityRow]) -> dict[tuple[str, str], list[float]]:
    out: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        out.setdefault((r.layer_kind, r.perturbation), []).append(r.d_star)
    return out


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def summary_md(res: SensitivityResult) -> str:
    st = res.settings
    lines = [f"# sensitivity: {st.candidate} {st.component} {st.dtype} ({st.preset})", "",
             f"The default gate's {st.component} direct check (seeds {st.seed}..{st.seed + st.num_seeds - 1}, the "
             f"tolerance bars of {'the default table' if st.tolerances is None else st.tolerances}) with one layer's "
             f"output perturbed: `scale` multiplies 1/{SCALE_GROUPS} of its channels by (1 + d), `offset` adds "
             f"d x its std. d* is the smallest d the gate detects (bisection in log d over "
             f"[{st.d_lo:g}, {st.d_hi:g}], {st.steps} steps; inf = unseen up to {st.d_hi:g}).", "",
             f"{len({r.reference_layer for r in res.rows})} layers, {len(res.rows)} rows, {res.evaluations} gate "
             f"evaluations, {res.elapsed_s:.1f} s.", "",
             "## Detection floor per layer kind", "",
             "| layer kind | perturbation | layers | min d* | median d* | max d* |", "|---|---|---:|---:|---:|---:|"]
    for (kind, pert), ds in sorted(by_kind(res.rows).items()):
        lines.append(f"| {kind} | {pert} | {len(ds)} | {min(ds):.3g} | {_median(ds):.3g} | {max(ds):.3g} |")
    blind = [r for r in res.rows if r.blind_spot]
    lines += ["", f"## Blind spots (a {BLIND_AT:g} change goes unseen): {len(blind)}", ""]
    if blind:
        lines += ["| candidate layer | reference layer | kind | perturbation | d* |", "|---|---|---|---|---:|"]
        lines += [f"| {r.candidate_layer} | {r.reference_layer} | {r.layer_kind} | {r.perturbation} | "
                  f"{r.d_star:.3g} |" for r in blind]
    else:
        lines.append(f"none: every layer's {BLIND_AT:g} change fails the gate.")
    return "\n".join(lines) + "\n"


def plot(res: SensitivityResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = res.settings.kinds
    layers = list(dict.fromkeys(r.reference_layer for r in res.rows))
    fig, ax = plt.subplots(figsize=(max(8, len(layers) * 0.12), 4.5))
    for kind, marker in zip(kinds, "o^"):
        ys = {r.reference_layer: r.d_star for r in res.rows if r.perturbation == kind}
        xs = [i for i, n in enumerate(layers) if n in ys]
        vals = [ys[layers[i]] if math.isfinite(ys[layers[i]]) else res.settings.d_hi * 3 for i in xs]
        ax.scatter(xs, vals, marker=marker, s=14, label=kind)
    ax.axhline(BLIND_AT, color="red", lw=0.8, ls="--", label=f"blind-spot line ({BLIND_AT:g})")
    ax.set_yscale("log")
    ax.set_xlabel("layer (reference order)")
    ax.set_ylabel("detection floor d*")
    st = res.settings
    ax.set_title(f"{st.candidate} {st.component} {st.dtype}: smallest change the default gate detects")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
