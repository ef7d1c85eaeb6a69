"""The gate's direct checks: each network a candidate builds against its reference on the same
weights and inputs; the standalone scheduler checks and the training step (scratch candidates).

Per-layer rows (issue 21): a network's final output dilutes an error made inside it (a wrong
LayerNorm eps, a skipped block), so on the first seed of each fp32 direct check the reference's
layers and a scratch candidate's corresponding layers (the converter's module pairs, as
`parity.localize` pairs them) are recorded and each pair is one row, tensor
"layer:<reference module name>", judged by the same fp32 bars as the outputs. A layer the reference
ran and the candidate never did is a failing row (reason: skipped). Candidates outside the scratch
family (compiled, ONNX Runtime, plug-ins) get no layer rows: their layers are not tapped here.
"""
from __future__ import annotations

import contextlib
import math

import torch

from parity.adapters import as_plain
from parity.run_context import calling
from scratch_sd.config import TINY_PRESETS
from scratch_sd.names import DTYPES, NETWORKS

UNET_TIMESTEPS = (0, 1, 250, 500, 745.3, 999)
TEXT_PROMPTS = ["a photo of an astronaut riding a horse on mars", ""]


def _inputs(name: str, cfg, seed: int, dtype: str, device: str, tokenizer) -> dict:
    """The direct check's inputs, drawn from one generator in a fixed order (the same for every candidate)."""
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]
    if name == "text_encoder":
        ids = tokenizer(TEXT_PROMPTS, padding="max_length", max_length=cfg.text.max_positions, truncation=True,
                        return_tensors="pt").input_ids
        rand = torch.randint(0, cfg.text.vocab_size, (2, cfg.text.max_positions), generator=g)
        return {"ids": torch.cat([ids, rand]).to(device)}
    if name == "vae":
        size = min(cfg.image_size, 128) if cfg.name not in TINY_PRESETS else cfg.image_size
        x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(device, dt)
        lat = size // cfg.vae.downsample_factor
        z = torch.randn(1, cfg.vae.latent_channels, lat, lat, generator=g).to(device, dt) / cfg.vae.scaling_factor
        return {"x": x, "z": z}
    lat = min(cfg.latent_size, 16)
    x = torch.randn(2, cfg.unet.in_channels, lat, lat, generator=g).to(device, dt)
    ctx = torch.randn(2, cfg.text.max_positions, cfg.unet.cross_attention_dim, generator=g).to(device, dt)
    return {"x": x, "ctx": ctx}


def _reference_outputs(name: str, ref, inp: dict, seed: int) -> list:
    """(tensor kind, case, reference output) in the order `_candidate_outputs` yields them."""
    if name == "text_encoder":
        return [("text_embeddings", f"seed={seed}", ref(inp["ids"])[0])]
    if name == "vae":
        d = ref.encode(inp["x"]).latent_dist
        return [("posterior_mean", f"seed={seed}", d.mean), ("posterior_logvar", f"seed={seed}", d.logvar),
                ("latent_sample", f"seed={seed}", d.sample(torch.Generator().manual_seed(seed))),
                ("image", f"seed={seed},decode", ref.decode(inp["z"]).sample)]
    return [("noise_pred", f"seed={seed},t={t}", ref(inp["x"], t, encoder_hidden_states=inp["ctx"]).sample)
            for t in UNET_TIMESTEPS]


def _candidate_outputs(name: str, ours, inp: dict, seed: int) -> list:
    if name == "text_encoder":
        return [ours(inp["ids"])]
    if name == "vae":
        d = ours.encode(inp["x"])
        return [d.mean, d.logvar, d.sample(generator=torch.Generator().manual_seed(seed)), ours.decode(inp["z"])]
    return [ours(inp["x"], t, inp["ctx"]) for t in UNET_TIMESTEPS]


def layer_case(name: str, seed: int) -> str:
    """The case of a network's per-layer rows: its first seed's input (the UNet's first timestep:
    the hooks keep each layer's first output)."""
    return f"seed={seed},t={UNET_TIMESTEPS[0]}" if name == "unet" else f"seed={seed}"


def layers_wanted(dtype: str, seed: int, first_seed: int) -> bool:
    """Per-layer rows: fp32, the first seed of the run (one input per network)."""
    return dtype == "fp32" and seed == first_seed


def reference_run(name: str, ref, inp: dict, seed: int, cfg, layers: bool) -> tuple[list, dict]:
    """(`_reference_outputs`, the output of every paired reference layer in completion order, or {})."""
    if not layers:
        return _reference_outputs(name, ref, inp, seed), {}
    from parity.candidates.base import _hooks
    from parity.localize import reference_layer_names

    with _hooks(ref, [(n, n) for n in reference_layer_names(name, cfg)]) as seen:
        outs = _reference_outputs(name, ref, inp, seed)
    return outs, dict(seen)


def _reference(run, name: str, refs: dict, inp: dict, seed: int, dtype: str, layers: bool = False) -> tuple:
    """(outputs, layer outputs) of one direct check's reference: the live reference network's, or
    a golden record's (parity.record) when the run has one (its layers: {} if it stored none)."""
    record = getattr(run, "record", None)
    if record is not None:
        return (record.direct(name, dtype, seed, run.device),
                record.direct_layers(name, dtype, seed) if layers else {})
    return reference_run(name, refs[name], inp, seed, run.refs.cfg, layers)


def _candidate_layers(g, built, name: str, cfg):
    """(tap factory, reference name -> candidate name) of a scratch-family candidate's network, or (None, {})."""
    if not g.scratch_family or g.profile != "exact":
        return None, {}
    from parity.localize import candidate_tap, reference_layer_names

    return candidate_tap(built, reference_layer_names(name, cfg))


@torch.no_grad()
def reference_truths(run) -> None:
    """The fp32 reference outputs of every direct check, for runs that judge low precision only."""
    refs = run.refs_at("fp32")
    for name in NETWORKS:
        if name not in run.settings.components:
            continue
        for s in range(run.settings.seed, run.settings.seed + run.settings.num_seeds):
            inp = _inputs(name, run.refs.cfg, s, "fp32", run.device, run.refs.tokenizer)
            run.truths[(name, s)] = [o[2].float().cpu() for o in _reference(run, name, refs, inp, s, "fp32")[0]]


@torch.no_grad()
def check_networks(run, g, built: dict, dtype: str) -> None:
    st, refs = run.settings, run.refs_at(dtype)
    for name in NETWORKS:
        if name not in st.components or name not in built:
            continue
        run.say(f"{g.name} {name} {dtype}: direct comparison on {st.num_seeds} seeds")
        ours = as_plain(name, built[name], run.refs.networks[name])
        for s in range(st.seed, st.seed + st.num_seeds):
            inp = _inputs(name, run.refs.cfg, s, dtype, run.device, run.refs.tokenizer)
            tap, cand_names = _candidate_layers(g, built[name], name, run.refs.cfg)
            layers = tap is not None and layers_wanted(dtype, s, st.seed)
            ref_outs, ref_layers = _reference(run, name, refs, inp, s, dtype, layers)
            with (tap() if layers else contextlib.nullcontext({})) as seen, calling(g.name, f"{name} ({dtype})"):
                outs = _candidate_outputs(name, ours, inp, s)
            if dtype == "fp32":
                run.truths[(name, s)] = [o[2].float().cpu() for o in ref_outs]
            truths = run.truths.get((name, s))
            for i, ((kind, case, r), o) in enumerate(zip(ref_outs, outs)):
                check_output(g, name, kind, r, o)
                run.rec.compare(g, name, dtype, kind, r, o, None if dtype == "fp32" else truths[i], case=case)
            if layers:
                check_layers(run, g, name, ref_layers, dict(seen), cand_names, layer_case(name, s))


def check_layers(run, g, name: str, ref_layers: dict, cand_layers: dict, cand_names: dict, case: str) -> None:
    """One fp32 row per paired layer, in the reference's completion order (see the module docstring)."""
    for ref_name, a in ref_layers.items():
        tensor = f"layer:{ref_name}"
        b = cand_layers.get(ref_name)
        if b is not None and tuple(a.shape) == tuple(b.shape):
            run.rec.compare(g, name, "fp32", tensor, a.to(b.device), b, case=case)
            continue
        if b is None and ref_name not in cand_names:
            continue  # a layer the candidate's map does not name
        tol = run.rec.table.lookup(name, tensor, "fp32")
        why = (f"the reference ran this layer, the candidate never did (`{cand_names[ref_name]}` skipped)"
               if b is None else f"shape {tuple(b.shape)} (candidate `{cand_names.get(ref_name, ref_name)}`), "
               f"expected {tuple(a.shape)}")
        row = run.rec.add(g, dict(component=name, dtype="fp32", device=run.device, mode="direct", case=case,
                                  tensor=tensor, shape="x".join(map(str, a.shape)), max_abs=math.nan,
                                  mean_abs=math.nan, rel_l2=math.nan, cosine_distance=math.nan, psnr_db=math.nan,
                                  atol=tol.atol, rtol=tol.rtol, min_psnr_db=tol.min_psnr_db,
                                  max_rel_l2=tol.max_rel_l2, passed=False, status="compared", reason=why))
        row.reference = run.rec.reference


def check_output(g, component: str, tensor: str, ref, out) -> None:
    """A candidate output of the wrong type, shape or dtype: one line naming what was expected."""
    from parity.candidates import CandidateError

    if not isinstance(out, torch.Tensor):
        raise CandidateError(f"candidate {g.name!r}: {component} returned {type(out).__name__} for {tensor}, "
                             "expected a tensor")
    if tuple(out.shape) != tuple(ref.shape):
        raise CandidateError(f"candidate {g.name!r}: {component} {tensor} has shape {tuple(out.shape)}, expected "
                             f"{tuple(ref.shape)}")
    if out.dtype != ref.dtype:
        raise CandidateError(f"candidate {g.name!r}: {component} {tensor} is {out.dtype}, expected {ref.dtype}")


def check_schedulers(run, g, dtype: str) -> None:
    """Our schedulers against diffusers' (fp32 arithmetic in both: other dtypes are a skipped row)."""
    if dtype != "fp32":
        run.rec.skip(g, "scheduler", dtype, "scheduler arithmetic is fp32 in both libraries (latents are cast by the "
                     "pipeline); its low-precision effect is measured by the pipeline swap rows")
        return
    from parity.scheduler_check import run_scheduler_checks

    names = "all"  # every scheduler's standalone checks, always (issue 21); --scheduler picks the pipeline swaps
    run.say(f"schedulers {names}: timesteps, sigmas, sampling loops vs diffusers")
    for r in run_scheduler_checks(names, seed=run.settings.seed):
        note = r.get("note", "")
        row = run.rec.add(g, r, dtype="fp32", device="cpu", mode="loop", preset=run.rec.preset,
                          status="skipped" if note.startswith("skipped") else "compared", passed=bool(r["passed"]),
                          reason=note)
        if not row.passed and not note:
            row.reason = f"max_abs {r['max_abs']:.3g} > atol {r['atol']}"


def check_training(run, g, dtype: str) -> None:
    """Training-step parity: loss, every gradient, AdamW state and parameters after 3 steps with
    accumulation and clipping, on the tiny preset's UNet (training sd15 here is not a CPU case)."""
    if "train" not in run.settings.components or not g.scratch_family:
        return
    from parity.train_check import run_train_checks

    run.say(f"training step {dtype}: scratch vs diffusers UNet")
    for r in run_train_checks(dtype, preset="tiny", seed=run.settings.seed, table=run.rec.table,
                              exact=g.net_mode == "exact"):
        run.rec.add(g, r, preset="tiny")
