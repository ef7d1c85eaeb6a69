"""The reference set's type: diffusers' / transformers' networks, the tokenizer and the scheduler
config of one model, with content hashes. Built by parity.references.build_references (a preset,
parity.zoo) or parity.local_model (a local model)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from scratch_sd.config import SDConfig


def quiet_libraries() -> None:
    """diffusers warns on every `.to(dtype)` of a VAE; our reports say what matters."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()


@dataclass
class References:
    cfg: SDConfig
    networks: dict[str, nn.Module]  # name -> reference module, float32 on the CPU, eval
    tokenizer: object
    scheduler_config: dict
    source: str  # "preset:tiny" or the model path
    path: Path | None = None  # the local model, None for a preset
    notes: list[str] = field(default_factory=list)
    _hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def weights_hash(self, name: str) -> str:
        """sha256 over the network's config and every tensor (name, dtype, shape, bytes), cached."""
        if name not in self._hashes:
            self._hashes[name] = module_hash(self.networks[name])
        return self._hashes[name]


@torch.no_grad()
def module_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
