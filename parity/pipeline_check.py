"""The scratch pipeline end to end (scratch_sd.pipeline.ScratchPipeline: scratch networks,
scratch scheduler, no diffusers) against diffusers' pipeline on the same weights, prompts,
negative prompts, seed and init image: per-step latents and the final image."""
from __future__ import annotations

import copy

import torch

from parity.tolerances import DTYPES
from parity.trace import NEGATIVE, PROMPTS, STRENGTH, init_image


def scratch_trace(models, scheduler_name: str, mode: str, dtype: str, opts) -> tuple[list, torch.Tensor]:
    from scratch_sd.pipeline import ScratchPipeline, make_scheduler

    nets = {n: copy.deepcopy(models.pairs[n].scratch).to(device=opts.device, dtype=DTYPES[dtype]).eval()
            for n in ("text_encoder", "vae", "unet")}
    pipe = ScratchPipeline(nets["text_encoder"], nets["vae"], nets["unet"], models.tokenizer,
                           make_scheduler(scheduler_name, dict(models.scheduler_config)), models.cfg)
    latents: list[torch.Tensor] = []
    kwargs = dict(prompt=list(PROMPTS), negative_prompt=list(NEGATIVE), num_inference_steps=opts.steps,
                  guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(opts.seed), output_type="pt",
                  progress=False, callback=lambda i, t, lat, eps: latents.append(lat.detach().clone()))
    if mode == "txt2img":
        kwargs.update(height=opts.size, width=opts.size)
    else:
        kwargs.update(image=init_image(opts.size, len(PROMPTS)), strength=STRENGTH)
    image = pipe(**kwargs).images
    return latents, image.permute(0, 2, 3, 1).float().cpu()


def compare_pipelines(models, scheduler_name: str, mode: str, dtype: str, opts, baseline, truth):
    """Yield (tensor kind, step, diffusers@dtype, scratch@dtype, diffusers@fp32) for the gate."""
    latents, image = scratch_trace(models, scheduler_name, mode, dtype, opts)
    if len(latents) != len(baseline.latents):
        raise RuntimeError(f"scratch pipeline ran {len(latents)} steps, diffusers {len(baseline.latents)}")
    for i, (r, o, t) in enumerate(zip(baseline.latents, latents, truth.latents)):
        yield "latents", i, r, o, t
    yield "image", None, baseline.image, image, truth.image
