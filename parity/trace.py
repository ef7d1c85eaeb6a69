"""Run diffusers' StableDiffusion(Img2Img)Pipeline with any components swapped, tracing
every intermediate tensor: text embeddings, each step's noise prediction (the UNet's raw
output at the CFG batch) and latents, the init latents (img2img) and the decoded image."""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a watercolor painting of a red fox in snow"]
NEGATIVE = ["blurry, low quality", "monochrome"]
STRENGTH = 0.75  # img2img strength of the traced runs


@dataclass
class Trace:
    text_embeddings: list[torch.Tensor] = field(default_factory=list)  # the pipeline's prompt embeddings
    noise_pred: list[torch.Tensor] = field(default_factory=list)  # per step
    latents: list[torch.Tensor] = field(default_factory=list)  # per step, after the scheduler
    image_latents: list[torch.Tensor] = field(default_factory=list)  # img2img: encoded init image
    image: torch.Tensor | None = None  # (B, H, W, 3) in [0, 1]

    def tensors(self):
        """(tensor kind, step or None, tensor) in a fixed order."""
        if self.text_embeddings:
            yield "text_embeddings", None, torch.cat(self.text_embeddings)
        for t in self.image_latents:
            yield "image_latents", None, t
        for i, t in enumerate(self.noise_pred):
            yield "noise_pred", i, t
        for i, t in enumerate(self.latents):
            yield "latents", i, t
        if self.image is not None:
            yield "image", None, self.image


def init_image(size: int, batch: int = 1) -> torch.Tensor:
    """A deterministic synthetic RGB picture in [0, 1], (B, 3, size, size): gradients and a disc."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.08).astype(np.float64)
    img = np.stack([0.2 + 0.6 * x, 0.3 + 0.5 * y * (1 - disc), 0.5 * (1 - x) + 0.5 * disc], 0)
    return torch.from_numpy(img).float().clamp(0, 1).unsqueeze(0).repeat(batch, 1, 1, 1)


def _record_method(obj, name: str, sink: list, pick):
    """Record `pick(result)` of obj.name(...) on this one object (instance attribute, undone by `del`)."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        sink.append(pick(result).detach().clone())
        return result

    setattr(obj, name, wrapper)
    return lambda: delattr(obj, name)


def _old_text_model_name(encoder):
    """diffusers' clip_skip reads `text_encoder.text_model.final_layer_norm`; transformers >= 5.6
    flattened CLIPTextModel (the norm is `final_layer_norm` on the model itself), so with
    diffusers 0.42 + transformers 5.x every pipeline call with clip_skip raises AttributeError
    (huggingface/diffusers#14124, open). Hand the pipeline the same LayerNorm under the old name
    for the run (no arithmetic changes); undone after. Returns the undo."""
    if hasattr(encoder, "text_model") or not hasattr(encoder, "final_layer_norm"):
        return lambda: None
    encoder.__dict__["text_model"] = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
    return lambda: encoder.__dict__.pop("text_model", None)


def run_pipeline(components: dict, scheduler, mode: str, seed: int, steps: int, size: int,
                 guidance_scale: float = 7.5, strength: float = STRENGTH, prompts=PROMPTS, negative=NEGATIVE,
                 device: str = "cpu", clip_skip: int | None = None) -> Trace:
    """One traced run. `components`: text_encoder, vae, unet (reference or adapters), tokenizer.
    `clip_skip` as diffusers' pipeline takes it. The text embeddings are what the pipeline's
    `encode_prompt` returns (prompt, then negative prompt): with clip_skip, that is the final
    LayerNorm over an inner layer's hidden states, not the encoder's own output."""
    from parity.pipelines import diffusers_pipeline

    pipe = diffusers_pipeline(components, scheduler, mode)
    trace = Trace()
    hooks = [
        components["unet"].register_forward_hook(lambda m, a, out: trace.noise_pred.append(out[0].detach().clone())),
    ]
    undo = [_record_method(components["vae"], "encode", trace.image_latents, lambda r: r.latent_dist.mean),
            _record_method(pipe, "encode_prompt", trace.text_embeddings,
                           lambda r: r[0] if r[1] is None else torch.cat([r[0], r[1]]))]
    if clip_skip is not None:
        undo.append(_old_text_model_name(components["text_encoder"]))

    def on_step_end(pipe_, i, t, kwargs):
        trace.latents.append(kwargs["latents"].detach().clone())
        return kwargs

    kwargs = dict(prompt=list(prompts), negative_prompt=list(negative), num_inference_steps=steps,
                  guidance_scale=guidance_scale, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="pt", callback_on_step_end=on_step_end)
    if clip_skip is not None:
        kwargs.update(clip_skip=clip_skip)
    if mode == "txt2img":
        kwargs.update(height=size, width=size)
    else:
        kwargs.update(image=init_image(size, len(prompts)).to(device), strength=strength)
    try:
        with torch.no_grad():
            out = pipe(**kwargs).images  # (B, 3, H, W) in [0, 1]
    finally:
        for h in hooks:
            h.remove()
        for u in undo:
            u()
    trace.image = out.permute(0, 2, 3, 1).detach().float().cpu()
    return trace
