"""Reference and scratch components side by side, on the same weights.

`build_pair(...)` is the one place the harness, the benchmarks and the CLI get their
models from: the reference from the zoo (seeded preset) or a local model, and the
scratch network with the reference's weights converted by the key tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from scratch_sd import loading
from scratch_sd.config import SDConfig, preset
from scratch_sd.loading import converter, sub_config  # noqa: F401 (re-exported for the harness)

NETWORKS = ("text_encoder", "vae", "unet")


def quiet_libraries() -> None:
    """diffusers warns on every `.to(dtype)` of a VAE; our reports say what matters."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


def scratch_from_reference(name: str, reference: nn.Module, cfg: SDConfig) -> nn.Module:
    """The scratch network holding the reference's weights, converted by the key table (strict)."""
    state = converter(name).from_diffusers(reference.state_dict(), sub_config(name, cfg))
    return loading.network(name, cfg, state)


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
                 seed: int = 0, **local) -> Models:
    """Reference + scratch for each network: from a preset (seeded) or a local model
    (`local`: ema, tokenizer, variant — see parity.local_model.build_models)."""
    from parity import zoo

    if model is not None:
        from parity import local_model

        return local_model.build_models(model, components, **local)
    cfg = preset(preset_name)
    refs = zoo.reference_components(cfg, seed, components)
    pairs = {n: Pair(n, refs[n], scratch_from_reference(n, refs[n], cfg)) for n in components}
    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG

    return Models(cfg, pairs, zoo.preset_tokenizer(cfg), dict(SD15_SCHEDULER_CONFIG), f"preset:{preset_name}")
