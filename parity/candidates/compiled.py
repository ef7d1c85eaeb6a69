"""The `compiled` candidate: torch.compile (inductor) of diffusers' / transformers' own modules.

"Does compiling change my numbers?" Each network is a copy of the reference module, cast to the
run's dtype and device, wrapped by `torch.compile(backend="inductor", dynamic=True)`. It keeps the
reference's call signature (interface "diffusers") and its module names (`same_names`), so the
swap matrix drops it straight into diffusers' pipelines and `localize` hooks the original module's
layers (forward hooks make dynamo break the graph around each hooked layer: localize then sees the
compiled pieces between them, which is what it can see).

The first call at each new input shape compiles (seconds at tiny size on a CPU, minutes at sd15
size); inductor on a CPU needs a C++ compiler, and `unavailable()` says so when there is none.
"""
from __future__ import annotations

import copy
import shutil

import torch

from parity.candidates.base import BuildRequest, Built, CandidateBase
from scratch_sd.names import NETWORKS


class CompiledCandidate(CandidateBase):
    name = "compiled"
    components = NETWORKS
    profile = "exact"
    backend = "inductor"

    def unavailable(self) -> str | None:
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
            return "torch.compile's inductor backend needs a C++ compiler on the CPU (none on PATH)"
        return None

    def build(self, request: BuildRequest) -> Built:
        module = copy.deepcopy(request.reference).to(device=request.device, dtype=request.dtype).eval()
        if request.component == "vae":  # the pipelines call encode / decode, not forward
            module.encode = torch.compile(module.encode, backend=self.backend, dynamic=True)
            module.decode = torch.compile(module.decode, backend=self.backend, dynamic=True)
            compiled = module
        else:
            compiled = torch.compile(module, backend=self.backend, dynamic=True)
        return Built(compiled, "diffusers", same_names=True,
                     notes=f"torch.compile(backend={self.backend!r}, dynamic=True) of the reference module, "
                           f"torch {torch.__version__}")


def candidate() -> CompiledCandidate:
    return CompiledCandidate()
