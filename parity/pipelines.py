"""The one place pipelines are built: diffusers' StableDiffusion(Img2Img)Pipeline over any
components, and the scratch pipeline over scratch networks, each with the scheduler of the same
registry name built from the same config.

    pipe = diffusers_pipeline({"text_encoder": te, "vae": vae, "unet": unet, "tokenizer": tok}, scheduler)
    ours = scratch_pipeline(networks, tokenizer, "pndm", scheduler_config, cfg)
"""
from __future__ import annotations

from pathlib import Path

import torch

from scratch_sd.names import NETWORKS
from scratch_sd.pipeline import ScratchPipeline, make_scheduler

MODES = ("txt2img", "img2img")


def diffusers_scheduler(name: str, config: dict):
    """diffusers' scheduler class of our registry name, from the same config (its own from_config)."""
    import diffusers
    from scratch_sd.schedulers import DIFFUSERS_CLASS_NAMES

    make_scheduler(name, config)  # same name check and message as the scratch side
    return getattr(diffusers, DIFFUSERS_CLASS_NAMES[name]).from_config(config)


def diffusers_pipeline(parts: dict, scheduler, mode: str = "txt2img"):
    """diffusers' pipeline for `mode` over `parts` (text_encoder, vae, unet: reference modules or
    candidates in diffusers' interface; tokenizer), no safety checker, progress bar off."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    if mode not in MODES:
        raise ValueError(f"unknown pipeline mode {mode!r}; known: {', '.join(MODES)}")
    cls = StableDiffusionPipeline if mode == "txt2img" else StableDiffusionImg2ImgPipeline
    pipe = cls(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"], unet=parts["unet"],
               scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_pipeline(refs, scheduler: str = "pndm", mode: str = "txt2img"):
    """diffusers' pipeline over a References' own networks and tokenizer."""
    parts = {**{n: refs.networks[n] for n in NETWORKS}, "tokenizer": refs.tokenizer}
    return diffusers_pipeline(parts, diffusers_scheduler(scheduler, refs.scheduler_config), mode)


def scratch_pipeline(networks: dict, tokenizer, scheduler: str, scheduler_config: dict, cfg) -> ScratchPipeline:
    """The scratch pipeline over scratch networks {text_encoder, vae, unet}."""
    return ScratchPipeline(networks["text_encoder"], networks["vae"], networks["unet"], tokenizer,
                           make_scheduler(scheduler, dict(scheduler_config)), cfg)


def scratch_networks(refs, exact: bool = False) -> dict:
    """Scratch networks holding a References' weights (the `scratch` candidate's conversion), float32:
    one for each reference network it holds."""
    from parity.candidates.scratch import network_from_reference

    nets = {n: network_from_reference(n, refs.networks[n], refs.cfg) for n in NETWORKS if n in refs.networks}
    for net in nets.values():
        net.set_exact(exact)
    return nets


def scratch_pipeline_from_references(refs, scheduler: str = "pndm", exact: bool = False) -> ScratchPipeline:
    return scratch_pipeline(scratch_networks(refs, exact), refs.tokenizer, scheduler, refs.scheduler_config, refs.cfg)


def scratch_pipeline_from_preset(name: str = "tiny", scheduler: str = "pndm", seed: int = 0) -> ScratchPipeline:
    """A preset's scratch pipeline on the zoo's seeded weights: the SAME weights as diffusers' on
    `build_references(name, seed=seed)`, so both give the same images."""
    from parity.references import build_references

    make_scheduler(scheduler)  # fail before seconds of model building
    return scratch_pipeline_from_references(build_references(name, seed=seed), scheduler)


def diffusers_from_folder(path: Path, scheduler: str | None = None, mode: str = "txt2img"):
    """diffusers' own pipeline read from a local diffusers folder (float32), `scheduler` by our name."""
    import json

    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionPipeline if mode == "txt2img" else StableDiffusionImg2ImgPipeline
    pipe = cls.from_pretrained(str(path), local_files_only=True, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False, torch_dtype=torch.float32)
    if scheduler is not None:
        config = json.loads((Path(path) / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        pipe.scheduler = diffusers_scheduler(scheduler, config)
    return pipe
