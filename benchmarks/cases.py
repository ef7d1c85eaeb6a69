"""What is timed: one call of a component, per implementation, on fixed seeded inputs.

Components (the tensor batch each runs at, for `images` images per call):
- text_encoder   CLIP text tower on 2*images token rows (cond + uncond, as classifier-free guidance)
- unet           one denoising step at the CFG batch 2*images
- vae_decode     latents -> image, `images` images
- vae_encode     image -> posterior sample, `images` images
- scheduler_step scale_model_input + step over one whole schedule of `steps` steps on fixed
                 model outputs; reported per step (time of the loop / number of steps)
- pipeline       txt2img end to end, `steps` steps, guidance 7.5, output_type "pt", with the
                 time spent in each stage (text_encoder, unet x steps, vae_decode)

Implementations:
- diffusers          the reference modules (transformers CLIPTextModel, diffusers AutoencoderKL /
                     UNet2DConditionModel / schedulers / StableDiffusionPipeline)
- scratch            the scratch_sd modules with the same weights; ScratchPipeline for the pipeline
- scratch_compiled   torch.compile of the scratch network call (networks only; scratch_sd.accel)
- scratch_cudagraph  the scratch network call as a CUDA graph, replayed (networks only, CUDA only;
                     scratch_sd.accel.CudaGraphRunner)
- any candidate      by name (`sdparity candidates`: onnxruntime, compiled, int8, a plug-in), its
                     networks built from the reference for each dtype; its pipeline is diffusers'
                     with the candidate's networks swapped in
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from scratch_sd.names import DTYPES

CASE_COMPONENTS = ("text_encoder", "unet", "vae_decode", "vae_encode", "scheduler_step", "pipeline")
IMPLS = ("scratch", "diffusers", "scratch_compiled", "scratch_cudagraph")  # built in; candidates add theirs
# The scratch networks wrapped by scratch_sd.accel: their first call compiles or captures.
ACCELERATED = ("scratch_compiled", "scratch_cudagraph")
# The order a run moves its networks through (in place): each step an exact conversion of the fp32
# weights, bf16 being a subset of fp16's mantissa.
DTYPE_ORDER = ("fp32", "bf16", "fp16")
# Networks each component needs.
NETWORKS_OF = {"text_encoder": ("text_encoder",), "unet": ("unet",), "vae_decode": ("vae",),
               "vae_encode": ("vae",), "scheduler_step": (), "pipeline": ("text_encoder", "vae", "unet")}
GUIDANCE_SCALE = 7.5
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Case:
    component: str
    dtype: str
    images: int  # images per call (the unet and text encoder run at 2 * images: CFG)
    resolution: int  # pixels per side (latents are resolution / 8); unused by text_encoder
    sweeps: tuple[str, ...] = field(default=("main",), compare=False)

    @property
    def key(self) -> tuple:
        return (self.component, self.dtype, self.images, self.resolution)

    @property
    def batch_size(self) -> int:
        """The tensor batch the component runs at."""
        return 2 * self.images if self.component in ("text_encoder", "unet") else self.images

    def label(self) -> str:
        res = "" if self.component in ("text_encoder",) else f" {self.resolution}px"
        return f"{self.component} {self.dtype} b{self.batch_size}{res}"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- inputs
def make_inputs(case: Case, cfg, device, steps: int = 1) -> dict:
    """Seeded inputs (drawn on the CPU, then moved) in the case's dtype; shapes only on 'meta'."""
    dtype = DTYPES[case.dtype]
    g = _gen(0)
    latent = case.resolution // cfg.vae.downsample_factor
    b = case.batch_size

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    if case.component == "text_encoder":
        ids = torch.randint(0, cfg.text.vocab_size, (b, cfg.text.max_positions), generator=g)
        return {"ids": ids.to(device)}
    if case.component == "unet":
        return {"x": randn(b, cfg.unet.in_channels, latent, latent), "t": torch.tensor(999, device=device),
                "context": randn(b, cfg.text.max_positions, cfg.text.width)}
    if case.component == "vae_decode":
        return {"z": randn(b, cfg.vae.latent_channels, latent, latent)}
    if case.component == "vae_encode":
        return {"image": randn(b, cfg.vae.in_channels, case.resolution, case.resolution).clamp_(-1, 1)}
    if case.component == "scheduler_step":
        return {"x": randn(b, cfg.unet.in_channels, latent, latent),
                "eps": randn(b, cfg.unet.in_channels, latent, latent)}
    raise ValueError(f"no direct inputs for {case.component!r}")


# --------------------------------------------------------------------------- network calls
def network_call(component: str, style: str, nets: dict, inputs: dict) -> Callable[[], object]:
    """One call of a network component on `inputs`; `nets` maps network name -> module, called in
    diffusers' interface (`style` "diffusers") or the plain one (parity/candidates/base.py)."""
    if component == "text_encoder":
        te, ids = nets["text_encoder"], inputs["ids"]
        if style == "diffusers":
            return lambda: te(ids)[0]
        return lambda: te(ids)
    if component == "unet":
        unet, x, t, c = nets["unet"], inputs["x"], inputs["t"], inputs["context"]
        if style == "diffusers":
            return lambda: unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        return lambda: unet(x, t, c)
    if component == "vae_decode":
        vae, z = nets["vae"], inputs["z"]
        if style == "diffusers":
            return lambda: vae.decode(z, return_dict=False)[0]
        return lambda: vae.decode(z)
    if component == "vae_encode":
        vae, image = nets["vae"], inputs["image"]
        if style == "diffusers":
            return lambda: vae.encode(image).latent_dist.sample()
        return lambda: vae.encode(image).sample()
    raise ValueError(f"{component!r} is not a network component")


# --------------------------------------------------------------------------- schedulers
def make_scheduler(impl: str, name: str, config: dict):
    """diffusers' scheduler for the diffusers impl (and candidates without their own), ours otherwise."""
    if impl == "diffusers":
        from parity.pipelines import diffusers_scheduler

        return diffusers_scheduler(name, config)
    from scratch_sd.schedulers import get_scheduler

    return get_scheduler(name, config)


def scheduler_loop(scheduler, steps: int, x0: torch.Tensor, eps: torch.Tensor) -> Callable[[], object]:
    """One whole schedule: set_timesteps, then scale_model_input + step per timestep."""

    def run():
        scheduler.set_timesteps(steps, device=x0.device)
        x = x0
        for t in scheduler.timesteps:
            scheduler.scale_model_input(x, t)
            x = scheduler.step(eps, t, x, return_dict=False)[0]
        return x

    return run


def scheduler_calls(scheduler, steps: int) -> int:
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


# --------------------------------------------------------------------------- pipelines
def make_pipeline(impl: str, nets: dict, tokenizer, scheduler, cfg):
    """diffusers' pipeline over diffusers-interface networks (impl "diffusers" or a candidate's,
    adapted), ScratchPipeline over the scratch networks."""
    from parity import pipelines

    if impl == "scratch":
        return pipelines.ScratchPipeline(nets["text_encoder"], nets["vae"], nets["unet"], tokenizer, scheduler, cfg)
    return pipelines.diffusers_pipeline({**nets, "tokenizer": tokenizer}, scheduler)


def pipeline_call(impl: str, pipe, case: Case, steps: int) -> Callable[[], object]:
    kwargs = dict(prompt=[PROMPT] * case.images, height=case.resolution, width=case.resolution,
                  num_inference_steps=steps, guidance_scale=GUIDANCE_SCALE, output_type="pt")
    if impl != "scratch":
        return lambda: pipe(generator=_gen(0), return_dict=False, **kwargs)[0]
    return lambda: pipe(generator=_gen(0), progress=False, **kwargs).images


@contextlib.contextmanager
def staged(timer, text_encoder, unet, vae):
    """Time the stages of a pipeline call: forward hooks on the text encoder and the UNet, and the
    VAE's `decode` wrapped on that one instance (restored on exit)."""
    handles = []
    for stage, module in (("text_encoder", text_encoder), ("unet", unet)):
        handles.append(module.register_forward_pre_hook(lambda m, a, s=stage: timer.start(s)))
        handles.append(module.register_forward_hook(lambda m, a, o, s=stage: timer.stop(s)))
    original = vae.decode

    @functools.wraps(original)
    def decode(*args, **kwargs):
        timer.start("vae_decode")
        try:
            return original(*args, **kwargs)
        finally:
            timer.stop("vae_decode")

    vae.decode = decode
    try:
        yield timer
    finally:
        for h in handles:
            h.remove()
        del vae.decode  # the class's method shows through again
