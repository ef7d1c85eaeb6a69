"""The `scratch` and `scratch-exact` candidates: our own networks (scratch_sd) holding the reference's
weights, converted by the key tables (strict), in fast mode (the default) or exact mode
(bit-identical kernels, `set_exact(True)`); and our own schedulers."""
from __future__ import annotations

from parity.candidates.base import BuildRequest, Built, CandidateBase, module_tap
from scratch_sd import loading
from scratch_sd.names import NETWORKS


def network_from_reference(name: str, reference, cfg):
    """The float32 scratch network holding `reference`'s weights (key table, strict load)."""
    state = loading.converter(name).from_diffusers(reference.state_dict(), loading.sub_config(name, cfg))
    return loading.network(name, cfg, state)


class ScratchCandidate(CandidateBase):
    components = NETWORKS + ("scheduler",)
    profile = "exact"

    def __init__(self, exact: bool = False):
        self.exact = exact
        self.name = "scratch-exact" if exact else "scratch"

    @property
    def net_mode(self) -> str:
        return "exact" if self.exact else "fast"

    def build(self, request: BuildRequest) -> Built:
        name, cfg = request.component, request.cfg
        net = network_from_reference(name, request.reference, cfg)
        if hasattr(net, "set_exact"):
            net.set_exact(self.exact)
        net = net.to(device=request.device, dtype=request.dtype).eval()
        pairs = loading.converter(name).module_pairs(loading.sub_config(name, cfg))
        return Built(net, "plain", tap=module_tap(net, pairs), notes=f"scratch_sd, {self.net_mode} mode")

    def scheduler(self, name: str, config: dict):
        from scratch_sd.schedulers import get_scheduler

        return get_scheduler(name, dict(config))


def fast() -> ScratchCandidate:
    return ScratchCandidate(exact=False)


def exact() -> ScratchCandidate:
    return ScratchCandidate(exact=True)
