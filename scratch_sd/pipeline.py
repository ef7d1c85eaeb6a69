"""Stable Diffusion 1.x text-to-image and image-to-image, from scratch.

    pipe = ScratchPipeline.from_pretrained("path/to/sd15")          # a local diffusers folder
    image = pipe("a red fox in the snow", num_inference_steps=25,
                 generator=torch.Generator().manual_seed(0)).images[0]
    image = pipe("a red fox, oil painting", image=image, strength=0.6).images[0]   # img2img

One call, step by step, op for op as diffusers' StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline (so that the same weights and seed give the same pixels):

1. encode the prompts: tokenize (pad/truncate to 77), CLIP text encoder; each prompt's
   embedding repeated num_images_per_prompt times ([p0, p0, p1, p1]); with guidance the
   negative prompts ("" by default) the same way, batched as [uncond, cond];
2. timesteps: scheduler.set_timesteps(n); img2img keeps the last int(n * strength);
3. latents: txt2img draws N(0, 1) noise (on the CPU with a CPU generator, one batch element
   per generator for a list, as diffusers' randn_tensor) times init_noise_sigma; img2img
   encodes the image, samples the posterior with the generator, scales by scaling_factor,
   then draws the noise and calls scheduler.add_noise at the first kept timestep;
4. denoise: per timestep, scale_model_input, one UNet call on the doubled batch, guidance
   uncond + g * (cond - uncond) (only when g > 1, Ho & Salimans 2022), scheduler.step with
   eta and generator where the scheduler's step takes them;
5. decode: latents / scaling_factor -> VAE decoder -> (x * 0.5 + 0.5).clamp(0, 1) -> pt / np / PIL.

Pure torch + numpy + PIL, no transformers: the tokenizer is scratch_sd.tokenizer's CLIP BPE (the
folder's tokenizer/ files, or the shipped CLIP vocabulary) unless another one (anything called as
transformers' CLIPTokenizer is) is passed in.
"""
from __future__ import annotations

import inspect
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from scratch_sd import accel, layers
from scratch_sd.config import SDConfig
from scratch_sd.images import check_size, load_image, postprocess, preprocess_image
from scratch_sd.loading import load_network, load_sd_config, read_json as _read_json
from scratch_sd.names import NETWORKS
from scratch_sd.schedulers import img2img_timesteps
from scratch_sd.tokenizer import CLIPTokenizer

Tensor = torch.Tensor

# The schedulers a Stable Diffusion pipeline runs (sde_ve is a score-SDE sampler with its own loop).
PIPELINE_SCHEDULERS = ("ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "lms")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class PromptTruncated(UserWarning):
    """A prompt was longer than the text encoder's 77 tokens; the message names the dropped text."""


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images, (B, H, W, 3) float32 array, (B, 3, H, W) tensor, or latents
    latents: Tensor  # the final (scaled) latents, before decoding


# --------------------------------------------------------------------------- noise
randn_tensor = layers.randn_tensor  # diffusers' randn_tensor semantics, shared with the VAE and schedulers


# --------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress bar on stderr (no dependency); `enabled=False` prints nothing."""

    def __init__(self, total: int, enabled: bool = True, label: str = "denoising"):
        self.total, self.enabled, self.label, self.n, self.start = total, enabled, label, 0, time.perf_counter()

    def update(self) -> None:
        self.n += 1
        if self.enabled:
            rate = self.n / max(time.perf_counter() - self.start, 1e-9)
            bar = "#" * (20 * self.n // max(self.total, 1))
            end = "\n" if self.n >= self.total else ""
            print(f"\r{self.label} [{bar:<20}] {self.n}/{self.total} {rate:.2f} it/s", end=end, file=sys.stderr,
                  flush=True)


# --------------------------------------------------------------------------- schedulers
def make_scheduler(name: str, config: dict | None = None):
    """A scratch scheduler by name from a diffusers scheduler config (SD 1.5's by default)."""
    from scratch_sd import schedulers

    if name not in PIPELINE_SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(PIPELINE_SCHEDULERS)}")
    return schedulers.get_scheduler(name, config if config is not None else schedulers.SD15_SCHEDULER_CONFIG)


def _scheduler_name(class_name: str) -> str:
    from scratch_sd.schedulers import DIFFUSERS_CLASS_NAMES

    names = {v: k for k, v in DIFFUSERS_CLASS_NAMES.items() if k in PIPELINE_SCHEDULERS}
    if class_name not in names:
        raise ValueError(f"scheduler class {class_name!r} is not supported; known: {', '.join(sorted(names))}")
    return names[class_name]


def sd_scheduler_fixes(scheduler):
    """What StableDiffusionPipeline.__init__ does to an outdated scheduler config: steps_offset
    becomes 1 and clip_sample becomes False, with a warning. Returns the (new) scheduler."""
    fixes = {}
    if scheduler.config.get("steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if scheduler.config.get("clip_sample", False) is True:
        fixes["clip_sample"] = False
    if not fixes:
        return scheduler
    warnings.warn(f"outdated scheduler config: setting {fixes} as diffusers' StableDiffusionPipeline does",
                  stacklevel=3)
    return type(scheduler).from_config({**scheduler.config, **fixes})


def _accepts(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


# --------------------------------------------------------------------------- pipeline
class ScratchPipeline:
    def __init__(self, text_encoder: nn.Module, vae: nn.Module, unet: nn.Module, tokenizer, scheduler,
                 cfg: SDConfig):
        self.text_encoder, self.vae, self.unet = text_encoder, vae, unet
        self.tokenizer = tokenizer if tokenizer is not None else CLIPTokenizer()  # None: the shipped CLIP files
        self.cfg = cfg
        self.scheduler = sd_scheduler_fixes(scheduler)
        self.vae_scale_factor = cfg.vae.downsample_factor
        # Set by accelerate(): wrappers of the UNet call and the VAE decode; None calls the network.
        self._unet_call: Callable | None = None
        self._decode_call: Callable | None = None

    # ---- construction
    @classmethod
    def from_pretrained(cls, path: str | Path, scheduler: str | None = None, tokenizer=None,
                        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        variant: str | None = None) -> "ScratchPipeline":
        """A local diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/).

        Configs are read with json and mapped with *Config.from_reference; weights (safetensors
        or .bin, sharded or not, the fp16 variant when it is the only one or `variant="fp16"`) go
        through the key tables and load strictly. `scheduler` overrides the folder's class by name.
        `tokenizer`: None (scratch_sd.tokenizer over the folder's tokenizer/ vocab.json + merges.txt, or
        CLIP's shipped vocabulary when the folder has no tokenizer/), a tokenizer object, or a loader
        called with the folder (e.g. transformers' `CLIPTokenizer.from_pretrained`).
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(2, "No such model folder", str(root))
        cfg = load_sd_config(root)
        nets = {name: load_network(root, name, cfg, variant).to(device=device, dtype=dtype) for name in NETWORKS}
        sched_cfg = _read_json(root / "scheduler" / "scheduler_config.json")
        name = scheduler or _scheduler_name(sched_cfg.get("_class_name", "PNDMScheduler"))
        if tokenizer is None:
            tokenizer = _folder_tokenizer(root, cfg)
        if callable(tokenizer) and not hasattr(tokenizer, "model_max_length"):
            tokenizer = tokenizer(root)
        return cls(nets["text_encoder"], nets["vae"], nets["unet"], tokenizer, make_scheduler(name, sched_cfg), cfg)

    def set_scheduler(self, name: str, config: dict | None = None) -> "ScratchPipeline":
        """Swap the scheduler by name, keeping the current one's config (as `X.from_config(old.config)`)."""
        self.scheduler = sd_scheduler_fixes(make_scheduler(name, dict(config or self.scheduler.config)))
        return self

    def to(self, device=None, dtype=None) -> "ScratchPipeline":
        for net in (self.text_encoder, self.vae, self.unet):
            net.to(device=device, dtype=dtype)
        for call in (self._unet_call, self._decode_call):
            if isinstance(call, accel.CudaGraphRunner):
                call.reset()  # its graphs read the weights where they were
        return self

    def accelerate(self, *, compile: bool = False, compile_mode: str = "default", cuda_graphs: bool = False,
                   vae_decode: bool = False, graph_backend: accel.CudaBackend | None = None) -> "ScratchPipeline":
        """Opt-in speed-ups of the UNet call in `denoise` (and, with vae_decode=True, of `decode`):
        torch.compile (`compile_mode` one of accel.compile_modes()) and/or CUDA graphs (the pipeline
        must be on CUDA; one graph per batch and latent size, replayed every step). The networks are
        not changed; `accelerate()` with no options goes back to the plain calls (the default, whose
        output is exactly that of a pipeline never accelerated). `graph_backend` replaces the CUDA
        calls of the graphs (tests run them on the CPU with a fake). See scratch_sd/accel.py."""
        wrap = accel.accelerator(compile=compile, compile_mode=compile_mode, cuda_graphs=cuda_graphs,
                                 device=self.device, backend=graph_backend)  # checks the options first
        on = compile or cuda_graphs
        self._unet_call = wrap(self.unet) if on else None
        self._decode_call = wrap(self.vae.decode) if on and vae_decode else None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ---- 1. prompts
    def _tokenize(self, prompts: list[str], max_length: int) -> Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        for prompt in prompts:
            full = self.tokenizer(prompt, truncation=False).input_ids
            if len(full) > max_length:  # keep bos + 75 tokens + eos; name what was dropped
                dropped = self.tokenizer.decode(full[max_length - 1:-1])
                warnings.warn("The following part of your input was truncated because CLIP can only handle "
                              f"sequences up to {max_length} tokens: {dropped!r}", PromptTruncated, stacklevel=4)
        return ids

    def _embed(self, prompts: list[str], num_images_per_prompt: int, max_length: int,
               clip_skip: int | None = None) -> Tensor:
        ids = self._tokenize(prompts, max_length)
        if clip_skip is None:
            emb = self.text_encoder(ids.to(self.device))
        else:  # diffusers: the final LayerNorm over the states clip_skip layers before the last
            _, hidden_states = self.text_encoder(ids.to(self.device), output_hidden_states=True)
            emb = self.text_encoder.norm(hidden_states[-(clip_skip + 1)])
        emb = emb.to(dtype=next(self.text_encoder.parameters()).dtype, device=self.device)
        b, t, _ = emb.shape
        return emb.repeat(1, num_images_per_prompt, 1).view(b * num_images_per_prompt, t, -1)  # [p0, p0, p1, p1]

    def encode_prompt(self, prompts: list[str], num_images_per_prompt: int, guidance: bool,
                      negative_prompts: list[str] | None, clip_skip: int | None = None) -> tuple[Tensor, Tensor | None]:
        """(cond, uncond): (B * n, 77, width) each; uncond is None without guidance. `clip_skip`
        as diffusers: n layers before the last, through the final LayerNorm, for the prompt only;
        the negative prompt keeps the last layer (diffusers 0.42's encode_prompt does so too)."""
        _check_clip_skip(clip_skip, len(self.text_encoder.layers))
        cond = self._embed(prompts, num_images_per_prompt, self.tokenizer.model_max_length, clip_skip)
        if not guidance:
            return cond, None
        negative = negative_prompts if negative_prompts is not None else [""] * len(prompts)
        return cond, self._embed(negative, num_images_per_prompt, cond.shape[1])

    # ---- 2. timesteps (img2img)
    def img2img_timesteps(self, num_inference_steps: int, strength: float) -> tuple[Tensor, int]:
        """The last int(n * strength) steps of the schedule (schedulers.img2img_timesteps)."""
        return img2img_timesteps(self.scheduler, num_inference_steps, strength, self.device)

    # ---- 3. latents
    def prepare_latents(self, batch: int, height: int, width: int, dtype, generator, latents: Tensor | None) -> Tensor:
        shape = (batch, self.cfg.unet.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator, self.device, dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, expected {shape}")
        else:
            latents = latents.to(self.device)
        return latents * self.scheduler.init_noise_sigma

    def prepare_img2img_latents(self, image: Tensor, timestep: Tensor, batch: int, dtype, generator) -> Tensor:
        """Encode, sample the posterior, scale; then noise to `timestep` (diffusers' order of draws)."""
        image = image.to(device=self.device, dtype=dtype)
        if isinstance(generator, list):  # one image (and one generator) per batch element
            if image.shape[0] < batch:
                if batch % image.shape[0]:
                    raise ValueError(f"Cannot duplicate `image` of batch size {image.shape[0]} to effective "
                                     f"batch_size {batch}")
                image = torch.cat([image] * (batch // image.shape[0]), dim=0)
            init = torch.cat([self.vae.encode(image[i:i + 1]).sample(generator[i]) for i in range(batch)])
        else:
            init = self.vae.encode(image).sample(generator)
        init = self.cfg.vae.scaling_factor * init
        if batch > init.shape[0]:
            if batch % init.shape[0]:
                raise ValueError(f"Cannot duplicate `image` of batch size {init.shape[0]} to {batch} text prompts.")
            init = torch.cat([init] * (batch // init.shape[0]), dim=0)  # [i0, i1, i0, i1]: diffusers' order
        elif batch < init.shape[0]:
            raise ValueError(f"{init.shape[0]} init images for a batch of {batch} (prompts x images per prompt)")
        noise = randn_tensor(init.shape, generator, self.device, dtype)
        return self.scheduler.add_noise(init, noise, timestep)

    # ---- 4. denoising
    def denoise(self, latents: Tensor, timesteps: Tensor, num_steps: int, context: Tensor, guidance_scale: float,
                guidance: bool, step_kwargs: dict, progress: bool, callback: Callable | None) -> Tensor:
        order = getattr(self.scheduler, "order", 1)
        warmup = len(timesteps) - num_steps * order
        bar = Progress(num_steps, progress)
        for i, t in enumerate(timesteps):
            x = torch.cat([latents] * 2) if guidance else latents
            x = self.scheduler.scale_model_input(x, t)
            noise_pred = (self.unet if self._unet_call is None else self._unet_call)(x, t, context)
            if guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                callback(i, t, latents, noise_pred)
            if i == len(timesteps) - 1 or ((i + 1) > warmup and (i + 1) % order == 0):
                bar.update()
        return latents

    # ---- 5. decoding
    def decode(self, latents: Tensor) -> Tensor:
        vae_decode = self.vae.decode if self._decode_call is None else self._decode_call
        return vae_decode(latents / self.cfg.vae.scaling_factor)

    # ---- the call
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, image=None,
                 strength: float = 0.8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: Tensor | None = None,
                 eta: float = 0.0, output_type: str = "pil", progress: bool = True,
                 callback: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
                 clip_skip: int | None = None) -> PipelineOutput:
        """txt2img, or img2img when `image` is given. `callback(step_index, t, latents, noise_pred)`
        runs after every scheduler step (latents after the step, noise_pred after guidance).
        `clip_skip`: the prompt embeddings from that many layers before the text encoder's last."""
        prompts, negatives = check_prompts(prompt, negative_prompt)
        batch = _check_count(num_images_per_prompt) * len(prompts)
        _check_call(output_type, guidance_scale, eta, generator, batch)
        guidance = guidance_scale > 1  # Imagen's w: 1 (or less) means no classifier-free guidance
        if image is None:
            if height is None or width is None:
                size = self.cfg.unet.sample_size * self.vae_scale_factor
                height, width = height or size, width or size
            check_size(height, width)
        else:
            check_strength(strength, num_inference_steps)
            if latents is not None:
                raise ValueError("`latents` is for txt2img; img2img starts from the init image's latents")
            if height is not None or width is not None:
                check_size(height or 8, width or 8)

        cond, uncond = self.encode_prompt(prompts, num_images_per_prompt, guidance, negatives, clip_skip)
        context = torch.cat([uncond, cond]) if guidance else cond
        if image is None:
            self.scheduler.set_timesteps(num_inference_steps, device=self.device)
            timesteps, num_steps = self.scheduler.timesteps, num_inference_steps
            latents = self.prepare_latents(batch, height, width, context.dtype, generator, latents)
        else:
            pixels = preprocess_image(image, height, width, self.vae_scale_factor)
            timesteps, num_steps = self.img2img_timesteps(num_inference_steps, strength)
            latents = self.prepare_img2img_latents(pixels, timesteps[:1].repeat(batch), batch, context.dtype,
                                                   generator)
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if _accepts(self.scheduler.step, k)}
        latents = self.denoise(latents, timesteps, num_steps, context, guidance_scale, guidance, step_kwargs,
                               progress, callback)
        if output_type == "latent":
            return PipelineOutput(latents, latents)
        return PipelineOutput(postprocess(self.decode(latents), output_type), latents)


# --------------------------------------------------------------------------- input checks
def check_prompts(prompt, negative_prompt) -> tuple[list[str], list[str] | None]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is None:
        return prompts, None
    # A single negative prompt applies to every prompt (diffusers requires str with str, list with list).
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
    if not isinstance(negatives, list) or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"`negative_prompt` must be a string or a list of strings, got {negative_prompt!r}")
    if len(negatives) != len(prompts):
        raise ValueError(f"`negative_prompt` has {len(negatives)} entries but `prompt` has {len(prompts)}; "
                         "give one negative prompt per prompt (or a single string for all)")
    return prompts, negatives


def _folder_tokenizer(root: Path, cfg: SDConfig) -> CLIPTokenizer:
    if (root / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(root / "tokenizer")
    tok = CLIPTokenizer()
    if cfg.text.vocab_size != len(tok):
        raise ValueError(f"{root} has no tokenizer/ and its {cfg.text.vocab_size}-token text encoder does not take "
                         f"CLIP's {len(tok)}-token vocabulary: pass tokenizer=")
    return tok


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {n!r}")
    return int(n)


def _check_clip_skip(clip_skip, layers: int) -> None:
    """None, or 0..layers (diffusers indexes hidden_states[-(clip_skip + 1)] of layers + 1)."""
    if clip_skip is None:
        return
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 0 <= clip_skip <= layers:
        raise ValueError(f"`clip_skip` must be an integer from 0 to {layers} (the text encoder's layers), "
                         f"got {clip_skip!r}")


def _check_call(output_type: str, guidance_scale, eta, generator, batch: int) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}")
    if not isinstance(eta, (int, float)) or not 0.0 <= eta:
        raise ValueError(f"`eta` must be a number >= 0, got {eta!r}")
    if isinstance(generator, (list, tuple)) and len(generator) != batch:
        raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                         f"effective batch size of {batch}. Make sure the batch size matches the length of the "
                         "generators.")


def check_strength(strength, num_inference_steps) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"`strength` must be in (0, 1], got {strength!r}")
    if isinstance(num_inference_steps, int) and int(num_inference_steps * strength) < 1:
        raise ValueError(f"`strength` {strength} x {num_inference_steps} steps leaves no denoising step; "
                         "raise the strength or the steps")


__all__ = ["ScratchPipeline", "PipelineOutput", "PromptTruncated", "PIPELINE_SCHEDULERS", "randn_tensor",
           "preprocess_image", "postprocess", "load_image", "make_scheduler"]
