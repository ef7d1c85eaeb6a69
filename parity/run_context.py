"""What one gate run shares between its checks: settings, references, the recorder, the reference
networks cast per precision, the candidates' built networks, and the caches (fp32 truths, traced
all-diffusers pipeline runs)."""
from __future__ import annotations

import contextlib
import copy
import gc
import os
from pathlib import Path
from typing import Iterator

import torch

from parity.candidates import BuildRequest, Built, CandidateError
from scratch_sd.names import DTYPES, NETWORKS


def cache_dir() -> Path:
    """Where candidates keep artefacts across runs: $SDPARITY_CACHE, else ~/.cache/sd-parity."""
    env = os.environ.get("SDPARITY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sd-parity"


def one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


@contextlib.contextmanager
def calling(cand_name: str, what: str) -> Iterator[None]:
    """Exceptions raised by a candidate's code become one-line CandidateErrors naming it."""
    try:
        yield
    except CandidateError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the candidate's own failure, reported as bad input
        raise CandidateError(f"candidate {cand_name!r}: {what} raised {type(exc).__name__}: {one_line(exc)}") from None


def normalise(built, reference) -> Built:
    """A candidate's return value as a Built (see parity/candidates/base.py for the rule)."""
    if isinstance(built, Built):
        return built
    inner = getattr(built, "_orig_mod", built)  # torch.compile's OptimizedModule
    return Built(built, "diffusers" if isinstance(inner, type(reference)) else "plain")


class GateRun:
    def __init__(self, settings, refs, rec, say):
        self.settings, self.refs, self.rec, self.say = settings, refs, rec, say
        self.truths: dict = {}  # (network, seed) -> the fp32 reference outputs of the direct checks
        self.traces: dict = {}  # (scheduler, mode, dtype) -> the all-diffusers pipeline Trace
        self._refs_at: dict[str, dict] = {}

    @property
    def device(self) -> str:
        return self.settings.device

    def refs_at(self, dtype: str) -> dict:
        """The reference networks at `dtype` on the run's device (fp32 on the CPU: the references
        themselves, which no check modifies; otherwise cast copies)."""
        if dtype not in self._refs_at:
            if dtype == "fp32" and self.device == "cpu":
                self._refs_at[dtype] = dict(self.refs.networks)
            else:
                self._refs_at[dtype] = {n: copy.deepcopy(m).to(device=self.device, dtype=DTYPES[dtype]).eval()
                                        for n, m in self.refs.networks.items()}
        return self._refs_at[dtype]

    def networks_needed(self, g) -> list[str]:
        """The candidate's networks this run uses: those asked for, and all it has when the swap
        matrix swaps them all (`pipeline` in the components)."""
        comps = self.settings.components
        return [n for n in NETWORKS if g.provides(n) and (n in comps or "pipeline" in comps)]

    @contextlib.contextmanager
    def candidate_at(self, g, dtype: str) -> Iterator[dict[str, Built]]:
        """The candidate's networks built at `dtype` (a network it cannot run there is a skipped row)."""
        built: dict[str, Built] = {}
        for name in self.networks_needed(g):
            reason = g.candidate.supports(name, dtype, self.device)
            if reason:
                self.rec.skip(g, name, dtype, reason)
                continue
            ref = self.refs.networks[name]
            request = BuildRequest(name, ref, self.refs.cfg, DTYPES[dtype], torch.device(self.device), cache_dir(),
                                   self.refs.path, hasher=lambda n=name: self.refs.weights_hash(n))
            self.say(f"{g.name}: building {name} {dtype}")
            with calling(g.name, f"build({name}, {dtype})"):
                built[name] = normalise(g.candidate.build(request), ref)
        try:
            yield built
        finally:
            built.clear()
            gc.collect()

    def schedulers_for(self, name: str, g=None):
        """(diffusers' scheduler, the candidate's) of one registry name, from the run's config."""
        from parity.pipelines import diffusers_scheduler

        ref = diffusers_scheduler(name, self.refs.scheduler_config)
        if g is None:
            return ref, None
        with calling(g.name, f"scheduler({name})"):
            return ref, g.candidate.scheduler(name, dict(ref.config))

    def drop(self, dtype: str) -> None:
        """Free what only `dtype` used (fp32 traces stay: they are the truth of the later dtypes)."""
        if dtype != "fp32":
            self._refs_at.pop(dtype, None)
            for key in [k for k in self.traces if k[2] == dtype]:
                del self.traces[key]
        gc.collect()
