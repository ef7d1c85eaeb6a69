"""The scratch pipeline end to end (scratch_sd.pipeline.ScratchPipeline: scratch networks,
scratch scheduler, no diffusers) against diffusers' pipeline on the same weights, prompts,
negative prompts, seed and init image: per-step latents and the final image."""
from __future__ import annotations

import torch

from parity.pipelines import scratch_pipeline
from parity.trace import NEGATIVE, PROMPTS, STRENGTH, init_image


def scratch_trace(networks: dict, refs, scheduler_name: str, mode: str, steps: int, size: int, seed: int,
                  device: str = "cpu", clip_skip: int | None = None) -> tuple[list, torch.Tensor]:
    """Per-step latents and the (B, H, W, 3) image of the scratch pipeline over `networks`, with the
    scheduler of that name from the references' scheduler config."""
    pipe = scratch_pipeline(networks, refs.tokenizer, scheduler_name, refs.scheduler_config, refs.cfg)
    latents: list[torch.Tensor] = []
    kwargs = dict(prompt=list(PROMPTS), negative_prompt=list(NEGATIVE), num_inference_steps=steps,
                  guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
                  progress=False, callback=lambda i, t, lat, eps: latents.append(lat.detach().clone()),
                  clip_skip=clip_skip)
    if mode == "txt2img":
        kwargs.update(height=size, width=size)
    else:
        kwargs.update(image=init_image(size, len(PROMPTS)), strength=STRENGTH)
    image = pipe(**kwargs).images
    return latents, image.permute(0, 2, 3, 1).float().cpu()


def compare_pipelines(networks: dict, refs, scheduler_name: str, mode: str, settings, baseline, truth):
    """Yield (tensor kind, step, diffusers@dtype, scratch@dtype, diffusers@fp32) for the gate."""
    latents, image = scratch_trace(networks, refs, scheduler_name, mode, settings.steps, settings.size, settings.seed,
                                   settings.device, settings.clip_skip)
    if len(latents) != len(baseline.latents):
        raise RuntimeError(f"scratch pipeline ran {len(latents)} steps, diffusers {len(baseline.latents)}")
    for i, (r, o, t) in enumerate(zip(baseline.latents, latents, truth.latents)):
        yield "latents", i, r, o, t
    yield "image", None, baseline.image, image, truth.image
