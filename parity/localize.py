"""`sdparity localize`: where does a scratch network first stop matching its reference?

Runs the reference and the scratch network on the same input with forward hooks on every
layer the converter pairs (`module_pairs(cfg)`: leaf layers with one-to-one weights and the
blocks around them), compares each pair's output, orders the pairs by when the scratch
layer finished (forward hooks fire on completion, so an inner layer comes before the block
that holds it), and names the first layer over the threshold, in both naming schemes.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from parity.tolerances import DTYPES, Table

NETWORKS = ("text_encoder", "vae", "unet")


def add_parser(sub) -> None:
    p = sub.add_parser("localize", help="per-layer divergence table of one network, first layer over tolerance")
    p.add_argument("--component", required=True, help="text_encoder | vae | unet")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    p.add_argument("--preset", default="tiny", help="tiny | sd15 (default tiny)")
    p.add_argument("--model", default=None, help="a local diffusers folder or single checkpoint file")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timestep", type=float, default=745.3, help="UNet timestep (default 745.3)")
    p.add_argument("--threshold", type=float, default=None, help="rel_l2 over which a layer diverges "
                   "(default: [localize] in the tolerance file)")
    p.add_argument("--tolerances", default=None, help="tolerance TOML file")
    p.add_argument("--out", default=None, help="folder for localize.csv and localize.md")
    p.add_argument("--all", action="store_true", help="print every layer, not only up to the first divergence")
    p.set_defaults(func=run)


@dataclass
class LayerRow:
    order: int
    scratch: str
    reference: str
    shape: str
    max_abs: float
    rel_l2: float
    psnr_db: float
    over: bool


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("sample", "last_hidden_state"):
        if hasattr(out, attr) and isinstance(getattr(out, attr), torch.Tensor):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "mean") and isinstance(out.mean, torch.Tensor):  # a posterior
        return out.mean
    return None


class Recorder:
    """Forward hooks on named submodules; keeps the first output of each and its completion order."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"module_pairs names modules that do not exist: {missing[:5]}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.order: dict[str, int] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(module, args, out):
            t = _first_tensor(out)
            if t is not None and name not in self.outputs:
                self.outputs[name] = t.detach().float().cpu().clone()  # a copy: later in-place ops reuse the memory
                self.order[name] = len(self.order)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _run_both(component: str, ref, ours, cfg, seed: int, timestep: float, dtype, device):
    """Same input through both; return the pair of final outputs (and extra named pseudo-layers)."""
    g = torch.Generator().manual_seed(seed)
    extras = []
    if component == "text_encoder":
        ids = torch.randint(0, cfg.text.vocab_size, (2, cfg.text.max_positions), generator=g).to(device)
        r, o = ref(ids)[0], ours(ids)
    elif component == "vae":
        size = min(cfg.image_size, 64)
        x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dtype)
        rd, od = ref.encode(x).latent_dist, ours.encode(x)
        # The latent scaling constant is no layer, but a wrong one moves every latent: a pseudo-layer.
        extras.append(("latents (posterior mean x scaling_factor)", "latent_dist.mean x config.scaling_factor",
                       rd.mean * ref.config.scaling_factor, od.mean * ours.cfg.scaling_factor))
        z = torch.randn(rd.mean.shape, generator=g).to(device, dtype)
        r, o = ref.decode(z).sample, ours.decode(z)
    else:
        lat = min(cfg.latent_size, 16)
        x = torch.randn(1, cfg.unet.in_channels, lat, lat, generator=g).to(device, dtype)
        ctx = torch.randn(1, cfg.text.max_positions, cfg.unet.cross_attention_dim, generator=g).to(device, dtype)
        r, o = ref(x, timestep, encoder_hidden_states=ctx).sample, ours(x, timestep, ctx)
    return r, o, extras


def localize(component: str, dtype: str, models, seed: int = 0, timestep: float = 745.3, threshold: float = 1e-5,
             device: str = "cpu") -> list[LayerRow]:
    from parity.metrics import compare
    from parity.models import converter, sub_config

    pair = models.pairs[component]
    cfg = models.cfg
    pairs = converter(component).module_pairs(sub_config(component, cfg))
    ref = copy.deepcopy(pair.reference).to(device=device, dtype=DTYPES[dtype]).eval()
    ours = copy.deepcopy(pair.scratch).to(device=device, dtype=DTYPES[dtype]).eval()
    rec_ref = Recorder(ref, [p[1] for p in pairs])
    rec_ours = Recorder(ours, [p[0] for p in pairs])
    try:
        r, o, extras = _run_both(component, ref, ours, cfg, seed, timestep, DTYPES[dtype], device)
    finally:
        rec_ref.close()
        rec_ours.close()
    rows = []
    for s_name, r_name in pairs:
        if s_name not in rec_ours.outputs or r_name not in rec_ref.outputs:
            continue  # a paired layer this input does not reach
        a, b = rec_ref.outputs[r_name], rec_ours.outputs[s_name]
        if a.shape != b.shape:
            raise ValueError(f"paired layers disagree in shape: {s_name} {tuple(b.shape)} vs {r_name} {tuple(a.shape)}")
        e = compare(a, b)
        over = (not e.finite) or e.rel_l2 > threshold
        rows.append(LayerRow(rec_ours.order[s_name], s_name, r_name, "x".join(map(str, b.shape)), e.max_abs,
                             e.rel_l2, e.psnr_db, over))
    rows.sort(key=lambda x: x.order)
    n = len(rows)
    for i, (s_name, r_name, a, b) in enumerate(extras + [("(network output)", "(network output)", r, o)]):
        e = compare(a, b)
        rows.append(LayerRow(n + i, s_name, r_name, "x".join(map(str, b.shape)), e.max_abs, e.rel_l2, e.psnr_db,
                             (not e.finite) or e.rel_l2 > threshold))
    return rows


def first_divergence(rows: list[LayerRow]) -> LayerRow | None:
    return next((r for r in rows if r.over), None)


def format_table(rows: list[LayerRow], show_all: bool) -> str:
    first = first_divergence(rows)
    cut = len(rows) if show_all or first is None else min(len(rows), rows.index(first) + 6)
    lines = [f"{'#':>4}  {'scratch layer':<42} {'reference layer':<58} {'max_abs':>10} {'rel_l2':>10} {'psnr':>7}"]
    for r in rows[:cut]:
        mark = "  <-- first over tolerance" if r is first else ("  over" if r.over else "")
        lines.append(f"{r.order:>4}  {r.scratch:<42} {r.reference:<58} {r.max_abs:>10.3g} {r.rel_l2:>10.3g} "
                     f"{r.psnr_db:>7.1f}{mark}")
    if cut < len(rows):
        lines.append(f"... {len(rows) - cut} more layers (--all to show)")
    return "\n".join(lines)


def run(args) -> int:
    from parity.cli import UsageError
    from parity.models import build_models
    from parity.report import rows_to_csv, _write_text

    if args.component not in NETWORKS:
        raise UsageError(f"unknown component {args.component!r}; localize takes one of {', '.join(NETWORKS)}")
    if args.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {args.dtype!r}; known: {', '.join(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to this torch build")
    if args.device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {args.device!r}; known: cpu, cuda")
    from scratch_sd.config import PRESETS

    if args.model is None and args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    if args.model is not None and not Path(args.model).exists():
        raise UsageError(f"--model path does not exist: {args.model}")
    table = Table.load(args.tolerances)
    threshold = args.threshold if args.threshold is not None else table.localize_threshold(args.dtype)
    models = build_models(args.preset, args.model, (args.component,), seed=args.seed)
    rows = localize(args.component, args.dtype, models, args.seed, args.timestep, threshold, args.device)
    text = format_table(rows, args.all)
    print(text)
    first = first_divergence(rows)
    if first is None:
        verdict = f"no layer of {args.component} ({args.dtype}) is over rel_l2 {threshold:g}: {len(rows)} layers compared"
    else:
        verdict = (f"first layer over rel_l2 {threshold:g}: scratch `{first.scratch}` = reference `{first.reference}` "
                   f"(rel_l2 {first.rel_l2:.3g}, max_abs {first.max_abs:.3g})")
    print(verdict)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        cols = ["order", "scratch", "reference", "shape", "max_abs", "rel_l2", "psnr_db", "over"]
        _write_text(out / "localize.csv", rows_to_csv([r.__dict__ for r in rows], cols))
        _write_text(out / "localize.md", f"# localize {args.component} {args.dtype}\n\n{verdict}\n\n```\n"
                    f"{format_table(rows, True)}\n```\n")
    return 1 if first is not None else 0
