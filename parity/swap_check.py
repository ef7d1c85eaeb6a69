"""The gate's swap matrix and the scratch pipeline end to end.

Swap matrix: diffusers' StableDiffusionPipeline / Img2ImgPipeline with all its own components
(the baseline), with one candidate component swapped in at a time, and with every component the
candidate provides (`all_swapped`); two prompts with negative prompts, CFG 7.5, one seed; every
traced tensor (text embeddings, the encoded init image, each step's noise prediction and latents,
the decoded image) compared with the baseline at the same precision and, for fp16/bf16, both with
the fp32 baseline. The scratch pipeline (scratch candidates): ScratchPipeline on the candidate's
networks and scheduler against diffusers' pipeline, per-step latents and the image.
"""
from __future__ import annotations

import torch

from parity.adapters import as_diffusers, clip_skip_unsupported
from parity.run_context import calling
from scratch_sd.names import DTYPES, NETWORKS

SWAPPABLE = NETWORKS + ("scheduler",)


def baseline(run, sched: str, mode: str, dtype: str):
    """The all-diffusers traced pipeline run at `dtype`, cached for the run."""
    key = (sched, mode, dtype)
    if key not in run.traces:
        record = getattr(run, "record", None)  # a golden record (parity.record) stands in for diffusers
        run.say(f"baseline {dtype} {mode} [{sched}]" + (f" from record {record.id}" if record else ""))
        run.traces[key] = record.trace(sched, mode, dtype, run.device) if record else _trace(run, sched, mode, dtype)
    return run.traces[key]


def _trace(run, sched: str, mode: str, dtype: str, networks: dict | None = None, scheduler_of=None):
    """A traced diffusers pipeline run: the reference networks at `dtype` with `networks` swapped in,
    and the scheduler of the candidate `scheduler_of` (else diffusers')."""
    from parity.trace import run_pipeline

    st = run.settings
    parts = {"tokenizer": run.refs.tokenizer, **run.refs_at(dtype), **(networks or {})}
    ref_sched, cand_sched = run.schedulers_for(sched, scheduler_of)
    return run_pipeline(parts, cand_sched if scheduler_of is not None else ref_sched, mode, st.seed, st.steps,
                        st.size, device=st.device, clip_skip=st.clip_skip)


def case_of(settings) -> str:
    """The rows' `case` of a pipeline run: its seed, and clip_skip when set."""
    return f"seed={settings.seed}" + (f" clip_skip={settings.clip_skip}" if settings.clip_skip is not None else "")


def swap_sets(run, g, built: dict) -> dict[str, set[str]]:
    """Swap label -> the components swapped: each one asked for, and all the candidate has."""
    comps = run.settings.components
    have = [c for c in SWAPPABLE if (c in built or (c == "scheduler" and g.provides("scheduler")))]
    sets = {c: {c} for c in have if c in comps}
    if "pipeline" in comps and len(have) > 1:
        sets["all_swapped"] = set(have)
    return sets


def check_swaps(run, g, built: dict, dtype: str) -> None:
    sets = swap_sets(run, g, built)
    if not sets:
        return
    st = run.settings
    for sched in st.schedulers:
        for mode in st.modes:
            truth = baseline(run, sched, mode, "fp32")
            base = baseline(run, sched, mode, dtype)
            images = run.rec.images.setdefault((g.name, dtype, mode, sched), {})
            images["diffusers"] = base.image
            for label, swap in sets.items():
                why = clip_skip_unsupported(built["text_encoder"]) if (
                    st.clip_skip is not None and "text_encoder" in swap) else None
                if why:
                    run.rec.skip(g, label, dtype, f"--clip-skip: {why}", mode=mode, scheduler=sched)
                    continue
                run.say(f"{g.name}: swap {','.join(sorted(swap))} {dtype} {mode} [{sched}]")
                modules = {n: as_diffusers(n, built[n], run.refs.networks[n], DTYPES[dtype], torch.device(run.device))
                           for n in swap if n in NETWORKS}
                with calling(g.name, f"the pipeline with its {label} swapped in ({dtype} {mode})"):
                    out = _trace(run, sched, mode, dtype, modules, g if "scheduler" in swap else None)
                images[label] = out.image
                for (kind, step, r), (_, _, o), (_, _, t) in zip(base.tensors(), out.tensors(), truth.tensors()):
                    run.rec.compare(g, label, dtype, kind, r, o, None if dtype == "fp32" else t, mode=mode,
                                    case=case_of(st), step=step, scheduler=sched)


def check_scratch_pipeline(run, g, built: dict, dtype: str) -> None:
    """ScratchPipeline over the candidate's networks against diffusers' pipeline (scratch candidates)."""
    if "pipeline" not in run.settings.components or not g.scratch_family or set(NETWORKS) - set(built):
        return
    from parity.pipeline_check import compare_pipelines

    st = run.settings
    for sched in st.schedulers:
        for mode in st.modes:
            truth = baseline(run, sched, mode, "fp32")
            base = baseline(run, sched, mode, dtype)
            run.say(f"{g.name}: scratch pipeline {dtype} {mode} [{sched}]")
            nets = {n: built[n].module for n in NETWORKS}
            for kind, step, ref, out, t in compare_pipelines(nets, run.refs, sched, mode, st, base, truth):
                run.rec.compare(g, "pipeline", dtype, kind, ref, out, None if dtype == "fp32" else t, mode=mode,
                                case=case_of(st), step=step, scheduler=sched)
