"""What a candidate is: any implementation of SD's networks that the gate runs against diffusers.

A candidate supplies one or more of the networks `text_encoder`, `vae`, `unet` (and optionally
the `scheduler`), each built from the reference component (its weights and config) for one dtype
and one device. The harness then runs the direct network checks, the swap matrix inside
diffusers' pipelines and `localize` on whatever it built.

    class MyUNet:                                 # the whole protocol
        name = "my-unet"
        components = ("unet",)
        profile = "exact"                         # or a lossy profile of tolerances.toml
        def unavailable(self): return None        # or a reason ("onnxruntime is not installed")
        def supports(self, component, dtype, device): return None   # or a reason (a skipped row)
        def build(self, request: BuildRequest):   # -> Built, or the module / function itself
            return Built(my_unet_from(request.reference), interface="plain")

What `build` may return (the harness wraps it in parity/adapters.py):
- interface "plain" (our own networks use it): a callable / nn.Module with
    text_encoder: f(input_ids (B, T) int64) -> last_hidden_state (B, T, width); if it accepts
                  `output_hidden_states=True` it returns (last_hidden_state, hidden_states tuple)
                  as transformers does (embeddings, then each layer's output), for clip_skip
    unet:         f(sample (B, C, h, w), timestep (a number or 0-d / (B,) tensor),
                    encoder_hidden_states (B, T, D)) -> noise_pred (B, C, h, w)
    vae:          an object with .encode(x (B, 3, H, W)) -> either a posterior (.mean, .logvar,
                  .std, .sample(generator), .mode()) or the moments tensor (B, 2 * latent_channels,
                  h, w) that diffusers' DiagonalGaussianDistribution takes; and .decode(z) -> image
                  (B, 3, H, W). An attribute `scaling_factor` (or `.cfg.scaling_factor`) replaces
                  the reference config's latent scale, so that a wrong constant shows.
- interface "diffusers": a module with the diffusers / transformers component's own call signature
  and outputs (a torch.compile of the reference module, a quantised copy of it, ...).
A bare return value is taken as "diffusers" when it is an instance of the reference's class (or
a torch.compile wrapper of one), else as "plain".

`Built.tap` lets `localize` see inside: a context manager that, while active, records the outputs
of layers named in the REFERENCE's module names, in the order they completed. nn.Module candidates
get one from `module_tap(module, [(candidate_name, reference_name), ...])`; candidates whose
module names equal the reference's need nothing (`same_names=True`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from scratch_sd.config import SDConfig

INTERFACES = ("plain", "diffusers")


class CandidateError(ValueError):
    """A candidate could not be loaded, built or run as the protocol says: exit 2, naming the candidate."""


@dataclass(frozen=True)
class BuildRequest:
    """What the harness hands `Candidate.build`: one network, one dtype, one device."""

    component: str  # "text_encoder" | "vae" | "unet"
    reference: nn.Module  # the diffusers / transformers module, float32 on the CPU, eval; do not modify it
    cfg: SDConfig  # the whole model's scratch config
    dtype: torch.dtype
    device: torch.device
    cache_dir: Path  # a folder the candidate may keep artefacts in (exports), shared across runs
    model_path: Path | None = None  # the local model the reference was read from (None for a preset)
    hasher: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    @property
    def weights_hash(self) -> str:
        """sha256 of the reference component's config and tensors (a cache key; computed on first use)."""
        if self.hasher is None:
            from parity.references import module_hash

            return module_hash(self.reference)
        return self.hasher()


@dataclass
class Built:
    module: Any
    interface: str = "plain"  # see the module docstring
    tap: Callable[[], ContextManager[dict[str, torch.Tensor]]] | None = None  # localize's view inside
    same_names: bool = False  # module names equal the reference's (localize hooks them directly)
    notes: str = ""  # one line the reports carry (e.g. "exported with torch.onnx dynamo, opset 18")

    def __post_init__(self):
        if self.interface not in INTERFACES:
            raise ValueError(f"Built.interface must be one of {', '.join(INTERFACES)}, got {self.interface!r}")


@runtime_checkable
class Candidate(Protocol):
    name: str
    components: tuple[str, ...]  # a subset of text_encoder, vae, unet, scheduler
    profile: str  # "exact", or the lossy profile in tolerances.toml that judges its rows

    def unavailable(self) -> str | None: ...

    def supports(self, component: str, dtype: str, device: str) -> str | None: ...

    def build(self, request: BuildRequest) -> Built | Any: ...


class CandidateBase:
    """Defaults for the optional parts of the protocol; subclass and set name, components, build."""

    name = "candidate"
    components: tuple[str, ...] = ()
    profile = "exact"

    def unavailable(self) -> str | None:
        return None

    def supports(self, component: str, dtype: str, device: str) -> str | None:
        return None

    def scheduler(self, name: str, config: dict):  # only when "scheduler" is in components
        raise NotImplementedError


# --------------------------------------------------------------------------- taps (localize)
def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("sample", "last_hidden_state"):
        if isinstance(getattr(out, attr, None), torch.Tensor):
            return getattr(out, attr)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(getattr(out, "mean", None), torch.Tensor):  # a posterior
        return out.mean
    return None


@contextlib.contextmanager
def _hooks(module: nn.Module, pairs: Sequence[tuple[str, str]]) -> Iterator[dict[str, torch.Tensor]]:
    modules = dict(module.named_modules())
    missing = [m for m, _ in pairs if m not in modules]
    if missing:
        raise CandidateError(f"layer map names modules the candidate does not have: {', '.join(missing[:5])}")
    seen: dict[str, torch.Tensor] = {}  # insertion order = completion order

    def hook_for(ref_name: str):
        def hook(_module, _args, out):
            t = _first_tensor(out)
            if t is not None and ref_name not in seen:
                seen[ref_name] = t.detach().float().cpu().clone()  # a copy: in-place ops reuse memory
        return hook

    handles = [modules[m].register_forward_hook(hook_for(r)) for m, r in pairs]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


class ModuleTap:
    """A `Built.tap` for an nn.Module: forward hooks on the candidate's modules, recorded under the
    reference's names; `names` maps each reference name to the candidate's."""

    def __init__(self, module: nn.Module, pairs: Sequence[tuple[str, str]]):
        self.module, self.pairs = module, list(pairs)
        self.names = {r: m for m, r in self.pairs}

    def __call__(self) -> ContextManager[dict[str, torch.Tensor]]:
        return _hooks(self.module, self.pairs)


def module_tap(module: nn.Module, pairs: Sequence[tuple[str, str]]) -> ModuleTap:
    """A tap over `module`. `pairs`: (candidate module name, reference module name)."""
    return ModuleTap(module, pairs)
