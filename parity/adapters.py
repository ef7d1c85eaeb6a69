"""A candidate's networks in the two shapes the harness calls them.

`as_diffusers(name, built, reference)`: the interface diffusers' pipelines call, so that
`pipe.unet = as_diffusers("unet", built, ref_unet)` just works in StableDiffusionPipeline and
StableDiffusionImg2ImgPipeline. A "diffusers"-interface module is used as it is; a "plain" one
(parity/candidates/base.py) is wrapped in an adapter: an nn.Module (so `pipe.to(...)` moves it)
exposing `config` (the reference component's: same model, same values), `dtype` and `device`, and
returning the output objects the pipelines index ([0], `.sample`, `.latent_dist`). The adapters add
no arithmetic of their own: every number comes from the candidate.

`as_plain(name, built)`: the plain calls the direct checks and localize make (text_encoder(ids),
unet(x, t, ctx), vae.encode(x) -> posterior, vae.decode(z)), for either interface.
"""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch
from torch import nn

from parity.candidates.base import Built


def _is_module(x) -> bool:
    return isinstance(x, nn.Module)


class _Adapter(nn.Module):
    def __init__(self, inner, config, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        if _is_module(inner):
            self.inner = inner  # a submodule: pipe.to() moves it
        else:
            object.__setattr__(self, "inner", inner)
        self.config = config
        self._dtype, self._device = dtype, device

    def _param(self):
        return next(self.inner.parameters(), None) if _is_module(self.inner) else None

    @property
    def dtype(self) -> torch.dtype:
        p = self._param()
        return p.dtype if p is not None else self._dtype

    @property
    def device(self) -> torch.device:
        p = self._param()
        return p.device if p is not None else self._device


class _Output(tuple):
    """A tuple (what `return_dict=False` gives) that also has the named field."""

    def __new__(cls, name: str, value):
        self = super().__new__(cls, (value,))
        setattr(self, name, value)
        return self


def posterior(encoded):
    """A plain VAE's encode output as a posterior: the candidate's own, or diffusers'
    DiagonalGaussianDistribution over a moments tensor (B, 2 * latent_channels, h, w)."""
    if isinstance(encoded, torch.Tensor):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(encoded)
    return encoded


def final_norm_of(inner):
    """A plain text encoder's final LayerNorm: `final_layer_norm`, else `norm` (ours), else None."""
    for name in ("final_layer_norm", "norm"):
        norm = getattr(inner, name, None)
        if callable(norm):
            return norm
    return None


def clip_skip_unsupported(built: Built) -> str | None:
    """Why a built text encoder cannot serve diffusers' clip_skip (None: it can). diffusers calls
    `encoder(ids, output_hidden_states=True)[-1][-(n + 1)]`, then `encoder.text_model.final_layer_norm`."""
    if built.interface == "diffusers":
        return None
    call = getattr(built.module, "forward", built.module)
    try:
        takes = "output_hidden_states" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        takes = False
    if not takes:
        return "its text encoder does not take output_hidden_states (clip_skip needs the inner layers' states)"
    if final_norm_of(built.module) is None:
        return "its text encoder has no final_layer_norm (or norm) for clip_skip to apply"
    return None


class _TextModel:
    """The `text_model.final_layer_norm` diffusers' clip_skip applies to an inner layer's states."""

    def __init__(self, norm):
        self.final_layer_norm = norm


class _HiddenStatesOutput(tuple):
    """(last_hidden_state, hidden_states) with transformers' field names: diffusers reads [-1]."""

    def __new__(cls, last, hidden_states):
        self = super().__new__(cls, (last, hidden_states))
        self.last_hidden_state, self.hidden_states = last, hidden_states
        return self


class TextEncoderAdapter(_Adapter):
    """transformers.CLIPTextModel interface: `encoder(ids, attention_mask=None)[0]`; with
    `output_hidden_states=True` (diffusers' clip_skip), `[-1]` is the tuple of hidden states
    (embeddings, then each layer's output) and `text_model.final_layer_norm` the final norm."""

    @property
    def text_model(self) -> _TextModel:
        norm = final_norm_of(self.inner)
        if norm is None:
            raise ValueError("the candidate text encoder has no final_layer_norm (or norm): clip_skip needs it")
        return _TextModel(norm)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the candidate text encoder does not take a padding attention mask (SD 1.x does not use one)")
        if output_hidden_states:
            last, hidden_states = self.inner(input_ids.to(self.device), output_hidden_states=True)
            return _HiddenStatesOutput(last, tuple(hidden_states))
        hidden = self.inner(input_ids.to(self.device))
        return _Output("last_hidden_state", hidden)


class LatentDist:
    """diffusers' DiagonalGaussianDistribution interface over a candidate's posterior."""

    def __init__(self, dist):
        self.posterior = dist
        self.mean, self.logvar, self.std = dist.mean, dist.logvar, dist.std

    def sample(self, generator=None):
        return self.posterior.sample(generator=generator)

    def mode(self):
        return self.posterior.mode()


class VAEAdapter(_Adapter):
    """diffusers.AutoencoderKL interface: `encode(x).latent_dist`, `decode(z)[0]` / `.sample`."""

    def encode(self, x, return_dict=True):
        dist = LatentDist(posterior(self.inner.encode(x)))
        return SimpleNamespace(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z, return_dict=True, generator=None):
        image = self.inner.decode(z)
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
            raise ValueError("the candidate UNet takes no timestep_cond / cross_attention_kwargs / added_cond_kwargs")
        out = self.inner(sample, timestep, encoder_hidden_states)
        return _Output("sample", out) if return_dict else (out,)


ADAPTERS = {"text_encoder": TextEncoderAdapter, "vae": VAEAdapter, "unet": UNetAdapter}


def scaling_factor_of(module) -> float | None:
    """The latent scale a plain VAE states itself (`scaling_factor` or `cfg.scaling_factor`), if any."""
    value = getattr(module, "scaling_factor", None)
    if value is None:
        value = getattr(getattr(module, "cfg", None), "scaling_factor", None)
    return value


def as_diffusers(name: str, built: Built, reference: nn.Module, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> nn.Module:
    """The candidate's network in diffusers' interface, with the config of the reference it replaces.

    A plain VAE's own latent scaling constant replaces the reference's (`scaling_factor_of`): the
    pipeline multiplies by it, so a wrong constant on the candidate's side must show.
    """
    if built.interface == "diffusers":
        return built.module
    from diffusers.configuration_utils import FrozenDict

    config = reference.config
    scale = scaling_factor_of(built.module) if name == "vae" else None
    if scale is not None:
        config = FrozenDict({**config, "scaling_factor": scale})
    return ADAPTERS[name](built.module, config, dtype, device)


class PlainVAE:
    """encode(x) -> posterior (.mean, .logvar, .sample(generator), .mode()), decode(z) -> image."""

    def __init__(self, module, interface: str, scaling_factor: float):
        self.module, self.interface, self.scaling_factor = module, interface, scaling_factor

    def encode(self, x):
        if self.interface == "diffusers":
            return self.module.encode(x).latent_dist
        return posterior(self.module.encode(x))

    def decode(self, z):
        if self.interface == "diffusers":
            return self.module.decode(z).sample
        return self.module.decode(z)


def as_plain(name: str, built: Built, reference: nn.Module | None = None):
    """The candidate's network as the plain calls the direct checks make (see the module docstring)."""
    m = built.module
    if name == "vae":
        scale = scaling_factor_of(m) if built.interface == "plain" else None
        if scale is None:
            scale = (reference if reference is not None else m).config.scaling_factor
        return PlainVAE(m, built.interface, scale)
    if built.interface == "plain":
        return m
    if name == "unet":
        return lambda x, t, ctx: m(x, t, encoder_hidden_states=ctx).sample
    return lambda ids: m(ids)[0]
