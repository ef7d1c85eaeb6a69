"""Where does a candidate's network first stop matching its reference?

Runs the reference and the candidate on the same input, recording the output of every layer the
pairing names (the reference's module names: for scratch, the converter's `module_pairs(cfg)`;
for a candidate with the reference's own module names, those names; for ONNX Runtime, graph
values mapped back to the module that made them), compares each pair, orders the pairs by when
the candidate's layer finished (an inner layer comes before the block that holds it), and names
the first layer over the threshold, in both naming schemes. A layer the reference ran but the
candidate never did (skipped, not changed) is named as missing at the place it belongs.

At bf16/fp16 two correct implementations round in different places, so a fixed threshold on their
difference alone would flag layers of a correct candidate. There a layer is over only when it is
both over the threshold against the reference at the same dtype and, against the reference at fp32
on the same inputs, more than `max_ratio` times as wrong as the reference is (the gate's
error-ratio rule, per layer; `error_ratio` in the rows).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from parity.adapters import as_plain
from parity.candidates import BuildRequest, module_tap
from parity.candidates.base import _hooks
from parity.metrics import compare
from parity.run_context import cache_dir, calling, normalise
from scratch_sd import loading
from scratch_sd.names import DTYPES, NETWORKS


@dataclass
class LayerRow:
    order: float
    candidate: str  # the layer's name on the candidate's side
    reference: str
    shape: str
    max_abs: float
    rel_l2: float
    psnr_db: float
    over: bool
    missing: bool = False  # the reference ran this layer, the candidate never did
    error_ratio: float = float("nan")  # bf16/fp16: rel_l2(candidate, ref@fp32) / rel_l2(ref@dtype, ref@fp32)


def reference_layer_names(component: str, cfg) -> list[str]:
    return [r for _, r in loading.converter(component).module_pairs(loading.sub_config(component, cfg))]


def _inputs(component: str, cfg, seed: int, dtype, device):
    g = torch.Generator().manual_seed(seed)
    if component == "text_encoder":
        return {"ids": torch.randint(0, cfg.text.vocab_size, (2, cfg.text.max_positions), generator=g).to(device)}
    if component == "vae":
        size = min(cfg.image_size, 64)
        return {"x": (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype), "g": g}
    lat = min(cfg.latent_size, 16)
    x = torch.randn(1, cfg.unet.in_channels, lat, lat, generator=g).to(device, dtype)
    ctx = torch.randn(1, cfg.text.max_positions, cfg.unet.cross_attention_dim, generator=g).to(device, dtype)
    return {"x": x, "ctx": ctx}


@torch.no_grad()
def _run(component: str, net, inp: dict, timestep: float, dtype, device, reference: bool):
    """(output, extra pseudo-layers) of one side; `net` is the reference module or a plain candidate."""
    if component == "text_encoder":
        return (net(inp["ids"])[0] if reference else net(inp["ids"])), []
    if component == "vae":
        d = net.encode(inp["x"]).latent_dist if reference else net.encode(inp["x"])
        scale = net.config.scaling_factor if reference else net.scaling_factor
        # The latent scaling constant is no layer, but a wrong one moves every latent: a pseudo-layer.
        extra = [("latents (posterior mean x scaling_factor)", "latent_dist.mean x config.scaling_factor",
                  d.mean * scale)]
        if "z" not in inp:
            inp["z"] = torch.randn(d.mean.shape, generator=inp["g"]).to(device, dtype)
        return (net.decode(inp["z"]).sample if reference else net.decode(inp["z"])), extra
    if reference:
        return net(inp["x"], timestep, encoder_hidden_states=inp["ctx"]).sample, []
    return net(inp["x"], timestep, inp["ctx"]), []


def candidate_tap(built, names: list[str]):
    """(tap factory, reference name -> candidate name) for a built network, or (None, {})."""
    if built.tap is not None:
        return built.tap, dict(getattr(built.tap, "names", {}))
    if built.same_names:
        module = getattr(built.module, "_orig_mod", built.module)
        have = dict(module.named_modules())
        pairs = [(n, n) for n in names if n in have]
        return module_tap(module, pairs), {n: n for _, n in pairs}
    return None, {}


def localize(component: str, dtype: str, refs, cand, seed: int = 0, timestep: float = 745.3,
             threshold: float = 1e-5, device: str = "cpu", *, max_ratio: float) -> tuple[list[LayerRow], str]:
    """Per-layer rows in the candidate's completion order, and a note on what could be paired.
    At bf16/fp16 a layer is over only if also `max_ratio` times as wrong against fp32 as the reference."""
    if component not in NETWORKS:
        raise ValueError(f"unknown component {component!r}; localize takes one of {', '.join(NETWORKS)}")
    if component not in cand.candidate.components:
        raise ValueError(f"candidate {cand.name!r} does not provide {component} (it has "
                         f"{', '.join(cand.candidate.components)})")
    reason = cand.candidate.unavailable() or cand.candidate.supports(component, dtype, device)
    if reason:
        raise ValueError(f"candidate {cand.name!r} cannot run {component} at {dtype} on {device}: {reason}")
    cfg, dt = refs.cfg, DTYPES[dtype]
    reference = copy.deepcopy(refs.networks[component]).to(device=device, dtype=dt).eval()
    request = BuildRequest(component, refs.networks[component], cfg, dt, torch.device(device), cache_dir(), refs.path,
                           hasher=lambda: refs.weights_hash(component))
    with calling(cand.name, f"build({component}, {dtype})"):
        built = normalise(cand.candidate.build(request), refs.networks[component])
    names = reference_layer_names(component, cfg)
    tap, cand_names = candidate_tap(built, names)
    ours = as_plain(component, built, refs.networks[component])
    seen_32, finals_32 = None, None
    if dt != torch.float32:  # the same inputs (drawn in fp32, then cast), through the reference at fp32
        reference_32 = copy.deepcopy(refs.networks[component]).to(device=device, dtype=torch.float32).eval()
        inp_32 = _inputs(component, cfg, seed, torch.float32, device)
        with _hooks(reference_32, [(n, n) for n in names]) as seen_32:
            r_32, extras_32 = _run(component, reference_32, inp_32, timestep, torch.float32, device, True)
        finals_32 = [x[2] for x in extras_32] + [r_32]
        del reference_32
    inp = _inputs(component, cfg, seed, dt, device)
    with _hooks(reference, [(n, n) for n in names]) as seen_ref:
        r, extras_r = _run(component, reference, inp, timestep, dt, device, True)
    with (tap() if tap is not None else contextlib.nullcontext({})) as seen_ours, \
            calling(cand.name, f"{component} ({dtype})"):
        o, extras_o = _run(component, ours, inp, timestep, dt, device, False)
    judge = _Judge(threshold, max_ratio)
    rows = _pair_rows(seen_ref, seen_ours, cand_names, judge, tap is not None, seen_32)
    n = len(rows)
    finals = [(a[0], a[1], a[2], b[2]) for a, b in zip(extras_r, extras_o)]
    for i, (c_name, r_name, a, b) in enumerate(finals + [("(network output)", "(network output)", r, o)]):
        e, ratio, over = judge(a, b, finals_32[i] if finals_32 is not None else None)
        rows.append(LayerRow(n + i, c_name, r_name, "x".join(map(str, b.shape)), e.max_abs, e.rel_l2, e.psnr_db,
                             over, error_ratio=ratio))
    note = (f"{len(set(seen_ours) & set(names))} of {len(names)} paired layers seen" if tap is not None else
            f"candidate {cand.name!r} gives no layer map (Built.tap / same_names): only its output is compared")
    return rows, note


@dataclass(frozen=True)
class _Judge:
    """Is one layer over? fp32: rel_l2 against the reference over `threshold`. bf16/fp16 (`ref_32` given):
    that, and rel_l2 against the fp32 reference over `max_ratio` x the reference's own."""
    threshold: float
    max_ratio: float

    def __call__(self, ref: torch.Tensor, out: torch.Tensor, ref_32: torch.Tensor | None):
        e = compare(ref, out)
        if not e.finite:
            return e, float("nan"), True
        if ref_32 is None:
            return e, float("nan"), e.rel_l2 > self.threshold
        ours, theirs = compare(ref_32, out).rel_l2, compare(ref_32, ref).rel_l2
        ratio = ours / theirs if theirs > 0 else (0.0 if ours == 0 else float("inf"))
        return e, ratio, e.rel_l2 > self.threshold and ours > self.max_ratio * theirs


def _pair_rows(seen_ref: dict, seen_ours: dict, cand_names: dict, judge: _Judge, tapped: bool,
               seen_32: dict | None = None) -> list[LayerRow]:
    rows: list[LayerRow] = []
    order = {name: i for i, name in enumerate(seen_ours)}  # the candidate's completion order
    last = -1.0
    for ref_name in seen_ref:  # the reference's order places the layers the candidate skipped
        a = seen_ref[ref_name]
        if ref_name in seen_ours:
            b = seen_ours[ref_name]
            if a.shape != b.shape:
                raise ValueError(f"paired layers disagree in shape: {cand_names.get(ref_name, ref_name)} "
                                 f"{tuple(b.shape)} vs {ref_name} {tuple(a.shape)}")
            e, ratio, over = judge(a, b, seen_32[ref_name] if seen_32 is not None else None)
            last = float(order[ref_name])
            rows.append(LayerRow(last, cand_names.get(ref_name, ref_name), ref_name, "x".join(map(str, b.shape)),
                                 e.max_abs, e.rel_l2, e.psnr_db, over, error_ratio=ratio))
        elif tapped and ref_name in cand_names:
            rows.append(LayerRow(last + 0.5, cand_names[ref_name], ref_name, "x".join(map(str, a.shape)),
                                 float("nan"), float("nan"), float("nan"), True, missing=True))
    rows.sort(key=lambda x: x.order)
    return rows


def first_divergence(rows: list[LayerRow]) -> LayerRow | None:
    return next((r for r in rows if r.over), None)


def format_table(rows: list[LayerRow], show_all: bool) -> str:
    first = first_divergence(rows)
    cut = len(rows) if show_all or first is None else min(len(rows), rows.index(first) + 6)
    lines = [f"{'#':>4}  {'candidate layer':<42} {'reference layer':<58} {'max_abs':>10} {'rel_l2':>10} {'psnr':>7}"]
    for i, r in enumerate(rows[:cut]):
        mark = "  <-- first over tolerance" if r is first else ("  over" if r.over else "")
        if r.missing:
            mark = "  <-- never ran on the candidate (skipped)" + (" [first]" if r is first else "")
        lines.append(f"{i:>4}  {r.candidate:<42} {r.reference:<58} {r.max_abs:>10.3g} {r.rel_l2:>10.3g} "
                     f"{r.psnr_db:>7.1f}{mark}")
    if cut < len(rows):
        lines.append(f"... {len(rows) - cut} more layers (--all to show)")
    return "\n".join(lines)


def verdict(rows: list[LayerRow], component: str, dtype: str, threshold: float, max_ratio: float) -> str:
    first = first_divergence(rows)
    rule = f"rel_l2 {threshold:g}" + ("" if dtype == "fp32" else f" and {max_ratio:g}x the reference's error vs fp32")
    if first is None:
        return f"no layer of {component} ({dtype}) is over {rule}: {len(rows)} layers compared"
    if first.missing:
        return (f"first divergence: candidate `{first.candidate}` = reference `{first.reference}` never ran on the "
                "candidate (the layer is skipped, not changed)")
    ratio = "" if dtype == "fp32" else f", {first.error_ratio:.3g}x the reference's error vs fp32"
    return (f"first layer over {rule}: candidate `{first.candidate}` = reference `{first.reference}` "
            f"(rel_l2 {first.rel_l2:.3g}, max_abs {first.max_abs:.3g}{ratio})")
