"""Scratch networks in the interfaces diffusers' pipelines call.

`pipe.unet = UNetAdapter(scratch_unet, reference_config)` just works in
StableDiffusionPipeline and StableDiffusionImg2ImgPipeline: each adapter is an
nn.Module (so `pipe.to(...)` moves it), exposes `config` (the reference component's
config: same model, same values), `dtype` and `device`, and returns the output
objects the pipelines index ([0], `.sample`, `.latent_dist`). The adapters add no
arithmetic of their own: every number comes from the scratch network.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class _Adapter(nn.Module):
    def __init__(self, scratch: nn.Module, config):
        super().__init__()
        self.scratch = scratch
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.scratch.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.scratch.parameters()).device


class _Output(tuple):
    """A tuple (what `return_dict=False` gives) that also has the named field."""

    def __new__(cls, name: str, value):
        self = super().__new__(cls, (value,))
        setattr(self, name, value)
        return self


class TextEncoderAdapter(_Adapter):
    """transformers.CLIPTextModel interface: `encoder(ids, attention_mask=None)[0]`."""

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the scratch text encoder does not take a padding attention mask (SD 1.x does not use one)")
        if output_hidden_states:
            raise ValueError("clip_skip / output_hidden_states is not supported by the text encoder adapter")
        hidden = self.scratch(input_ids.to(self.device))
        return _Output("last_hidden_state", hidden)


class LatentDist:
    """diffusers' DiagonalGaussianDistribution interface over the scratch posterior."""

    def __init__(self, posterior):
        self.posterior = posterior
        self.mean, self.logvar, self.std = posterior.mean, posterior.logvar, posterior.std

    def sample(self, generator=None):
        return self.posterior.sample(generator=generator)

    def mode(self):
        return self.posterior.mode()


class VAEAdapter(_Adapter):
    """diffusers.AutoencoderKL interface: `encode(x).latent_dist`, `decode(z)[0]` / `.sample`."""

    def encode(self, x, return_dict=True):
        dist = LatentDist(self.scratch.encode(x))
        return SimpleNamespace(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z, return_dict=True, generator=None):
        image = self.scratch.decode(z)
        return _Output("sample", image) if return_dict else (image,)

    def forward(self, sample, sample_posterior=False, return_dict=True, generator=None):
        dist = self.encode(sample).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mode()
        return self.decode(z, return_dict=return_dict)


class UNetAdapter(_Adapter):
    """diffusers.UNet2DConditionModel interface: `unet(x, t, encoder_hidden_states=...)[0]`."""

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict=True, **kwargs):
        if timestep_cond is not None or cross_attention_kwargs or added_cond_kwargs:
            raise ValueError("the scratch UNet takes no timestep_cond / cross_attention_kwargs / added_cond_kwargs")
        out = self.scratch(sample, timestep, encoder_hidden_states)
        return _Output("sample", out) if return_dict else (out,)


def adapt(name: str, scratch: nn.Module, reference: nn.Module) -> nn.Module:
    """Wrap a scratch network for diffusers, taking the config of the reference it replaces.

    The VAE's latent scaling constant is the scratch model's own (`scratch.cfg.scaling_factor`):
    the pipeline multiplies by it, so a wrong constant on the scratch side must show.
    """
    from diffusers.configuration_utils import FrozenDict

    cls = {"text_encoder": TextEncoderAdapter, "vae": VAEAdapter, "unet": UNetAdapter}[name]
    config = reference.config
    if name == "vae" and hasattr(scratch, "cfg"):
        config = FrozenDict({**config, "scaling_factor": scratch.cfg.scaling_factor})
    return cls(scratch, config)
