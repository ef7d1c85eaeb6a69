"""Reference and scratch components side by side, on the same weights.

`build_pair(...)` is the one place the harness, the benchmarks and the CLI get their
models from: the reference from the zoo (seeded preset) or a local model, and the
scratch network with the reference's weights converted by the key tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from scratch_sd.config import SDConfig, preset
from scratch_sd.convert.common import load_strict

NETWORKS = ("text_encoder", "vae", "unet")


def scratch_network(name: str, cfg: SDConfig) -> nn.Module:
    """An empty (random) scratch network of the given component."""
    if name == "text_encoder":
        from scratch_sd.clip import CLIPTextModel

        return CLIPTextModel(cfg.text)
    if name == "vae":
        from scratch_sd.vae import AutoencoderKL

        return AutoencoderKL(cfg.vae)
    if name == "unet":
        from scratch_sd.unet import UNet

        return UNet(cfg.unet)
    raise ValueError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")


def converter(name: str):
    from scratch_sd.convert import clip, unet, vae

    return {"text_encoder": clip, "vae": vae, "unet": unet}[name]


def sub_config(name: str, cfg: SDConfig):
    return {"text_encoder": cfg.text, "vae": cfg.vae, "unet": cfg.unet}[name]


@torch.no_grad()
def scratch_from_reference(name: str, reference: nn.Module, cfg: SDConfig) -> nn.Module:
    """Build the scratch network and load the reference's weights through the key table (strict)."""
    with torch.device("meta"):
        model = scratch_network(name, cfg)
    model = model.to_empty(device="cpu")
    state = converter(name).from_diffusers(reference.state_dict(), sub_config(name, cfg))
    load_strict(model, state)
    _init_buffers(model)
    return model.eval()


def _init_buffers(model: nn.Module) -> None:
    """Non-persistent buffers are lost by to_empty(); modules rebuild them via reset_buffers()."""
    for m in model.modules():
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()


@dataclass
class Pair:
    """The same network twice: reference (diffusers/transformers) and scratch."""

    name: str
    reference: nn.Module
    scratch: nn.Module


@dataclass
class Models:
    cfg: SDConfig
    pairs: dict[str, Pair] = field(default_factory=dict)
    tokenizer: object = None
    scheduler_config: dict | None = None
    source: str = ""  # "preset:tiny" or the model path

    def to(self, device, dtype=None) -> "Models":
        for p in self.pairs.values():
            p.reference.to(device=device, dtype=dtype)
            p.scratch.to(device=device, dtype=dtype)
        return self


def build_models(preset_name: str = "tiny", model: str | Path | None = None, components=NETWORKS,
                 seed: int = 0) -> Models:
    """Reference + scratch for each network: from a preset (seeded) or a local model."""
    from parity import zoo

    if model is not None:
        from parity import local_model

        return local_model.build_models(model, components)
    cfg = preset(preset_name)
    refs = zoo.reference_components(cfg, seed, components)
    pairs = {n: Pair(n, refs[n], scratch_from_reference(n, refs[n], cfg)) for n in components}
    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG

    return Models(cfg, pairs, zoo.preset_tokenizer(cfg), dict(SD15_SCHEDULER_CONFIG), f"preset:{preset_name}")
