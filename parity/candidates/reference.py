"""The `diffusers` candidate: the installed diffusers / transformers networks themselves.

Against the live reference it is equal by construction (a sanity row); its use is against a
golden record (`sdparity check --against DIR --candidates diffusers`): did an upgrade of diffusers,
transformers or torch, or another machine, change the numbers?"""
from __future__ import annotations

import copy

from parity.candidates.base import BuildRequest, Built, CandidateBase
from scratch_sd.names import NETWORKS


class ReferenceCandidate(CandidateBase):
    name = "diffusers"
    components = NETWORKS + ("scheduler",)
    profile = "exact"

    def build(self, request: BuildRequest) -> Built:
        module = copy.deepcopy(request.reference).to(device=request.device, dtype=request.dtype).eval()
        return Built(module, "diffusers", same_names=True, notes="the installed diffusers / transformers modules")

    def scheduler(self, name: str, config: dict):
        from parity.pipelines import diffusers_scheduler

        return diffusers_scheduler(name, config)


def candidate() -> ReferenceCandidate:
    return ReferenceCandidate()
