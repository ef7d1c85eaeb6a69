"""The models of one benchmark run and the calls timed on them, per case and implementation.

`Workload` holds every implementation's networks on the same weights: the references (impl
`diffusers`), the scratch networks converted from them (`scratch` and its accelerated wrappers),
and any candidate's (parity.candidates), built from the float32 references for each dtype the run
uses, before the references move. `to(dtype)` moves the references and scratch networks in place;
for a (case, impl) it hands out a `Call`: the zero-argument function to time, how many units one
call covers (scheduler_step: the number of steps), and for pipelines the stage timers of each call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from benchmarks import cases as C
from benchmarks.flops import count_gflop, meta_clone
from scratch_sd import accel
from scratch_sd.names import DTYPES

BUILTIN = ("scratch", "diffusers") + C.ACCELERATED


@dataclass
class Call:
    fn: Callable[[], object]
    units: int = 1  # the time of one call is divided by this (scheduler_step: per step)
    stage_timers: list = field(default_factory=list)  # pipeline: one StageTimer per call
    unet_calls: int = 0  # pipeline: UNet calls per pipeline call


def is_candidate(impl: str) -> bool:
    return impl not in BUILTIN


def unsupported(case: C.Case, impl: str, device: str = "cpu", candidate=None) -> str | None:
    """Why (case, impl) is not a meaningful case on `device`, or None."""
    if impl == "scratch_cudagraph" and torch.device(device).type != "cuda":
        return "scratch_cudagraph replays CUDA graphs: a CUDA case (--device cuda)"
    if impl in C.ACCELERATED and case.component in ("scheduler_step", "pipeline"):
        what = "compiles" if impl == "scratch_compiled" else "graphs"
        return f"{impl} {what} the networks only (text_encoder, unet, vae_decode, vae_encode)"
    if candidate is not None:
        if case.component == "scheduler_step" and "scheduler" not in candidate.components:
            return f"candidate {impl} has no scheduler"
        needed = C.NETWORKS_OF[case.component]
        if case.component == "pipeline":
            needed = tuple(n for n in needed if n in candidate.components) or needed
        missing = [n for n in needed if n not in candidate.components]
        if missing:
            return f"candidate {impl} does not provide {', '.join(missing)}"
        for n in needed:
            reason = candidate.unavailable() or candidate.supports(n, case.dtype, device)
            if reason:
                return f"candidate {impl}: {reason}"
    return None


class Workload:
    def __init__(self, refs, impls=("scratch", "diffusers"), device: str = "cpu", scheduler: str = "ddim",
                 steps: int = 4, clock=None, dtypes=("fp32",), scratch: dict | None = None):
        from parity import candidates

        self.refs, self.cfg, self.device = refs, refs.cfg, torch.device(device)
        self.scheduler_name, self.steps, self.clock = scheduler, steps, clock
        self.dtype: str | None = None
        self.candidates = {i: candidates.load(i) for i in impls if is_candidate(i)}
        self.scratch = scratch
        if self.scratch is None and any(i in ("scratch",) + C.ACCELERATED for i in impls):
            from parity.pipelines import scratch_networks

            self.scratch = scratch_networks(refs)
        self._built: dict = {}  # (impl, dtype, network) -> Built
        self._build_candidates(dtypes)
        self._accelerated: dict = {}  # (impl, component) -> the compiled / graphed network call
        self._meta: dict = {}  # (impl, network) -> meta copy, for counting FLOPs
        self._gflop: dict = {}

    def _build_candidates(self, dtypes) -> None:
        """Every candidate network at every dtype, from the float32 references (before any move)."""
        from parity.candidates import BuildRequest
        from parity.run_context import cache_dir, calling, normalise

        for impl, cand in self.candidates.items():
            if cand.unavailable():
                continue
            for dtype in dtypes:
                for name in (n for n in self.refs.networks if n in cand.components):
                    if cand.supports(name, dtype, self.device.type):
                        continue
                    ref = self.refs.networks[name]
                    req = BuildRequest(name, ref, self.cfg, DTYPES[dtype], self.device, cache_dir(), self.refs.path,
                                       hasher=lambda n=name: self.refs.weights_hash(n))
                    with calling(impl, f"build({name}, {dtype})"):
                        self._built[impl, dtype, name] = normalise(cand.build(req), ref)

    # ---- modules
    def nets(self, impl: str) -> dict[str, nn.Module]:
        if impl == "diffusers":
            return dict(self.refs.networks)
        if not is_candidate(impl):
            return dict(self.scratch or {})
        from parity.adapters import as_plain

        return {name: as_plain(name, b, self.refs.networks[name])
                for (i, dtype, name), b in self._built.items() if i == impl and dtype == self.dtype}

    def _diffusers_nets(self, impl: str) -> dict:
        """A candidate's networks in diffusers' interface, the references where it has none."""
        from parity.adapters import as_diffusers

        nets = self.nets("diffusers")
        for (i, dtype, name), b in self._built.items():
            if i == impl and dtype == self.dtype:
                nets[name] = as_diffusers(name, b, self.refs.networks[name], DTYPES[dtype], self.device)
        return nets

    def to(self, dtype: str) -> None:
        """Move the references and scratch networks to `dtype` in place (run dtypes in the order fp32,
        bf16, fp16: each step is then an exact conversion of the fp32 weights, bf16 being a subset of
        fp16's mantissa); candidates were built per dtype."""
        for module in list(self.refs.networks.values()) + list((self.scratch or {}).values()):
            module.to(device=self.device, dtype=DTYPES[dtype])
        self.dtype = dtype
        self._accelerated.clear()  # compiled code guards on the dtype; CUDA graphs hold the old weights' addresses

    def weights_mb(self, case: C.Case, impl: str) -> float | None:
        nets = self.nets(impl)
        mods = [nets.get(name) for name in C.NETWORKS_OF[case.component]]
        if not all(isinstance(m, nn.Module) for m in mods):
            return None  # e.g. an ONNX Runtime session: its weights live outside torch
        total = sum(t.numel() * t.element_size() for m in mods for t in list(m.parameters()) + list(m.buffers()))
        return total / 2**20

    # ---- calls
    def style(self, impl: str) -> str:
        return "diffusers" if impl == "diffusers" else "plain"

    def call(self, case: C.Case, impl: str) -> Call:
        if case.dtype != self.dtype:
            raise RuntimeError(f"workload is in {self.dtype}, case wants {case.dtype}")
        if case.component == "scheduler_step":
            return self._scheduler_call(case, impl)
        if case.component == "pipeline":
            return self._pipeline_call(case, impl)
        inputs = C.make_inputs(case, self.cfg, self.device)
        if impl in C.ACCELERATED:
            return Call(self._accelerated_fn(case, impl, inputs))
        return Call(C.network_call(case.component, self.style(impl), self.nets(impl), inputs))

    def _accelerated_fn(self, case: C.Case, impl: str, inputs: dict) -> Callable[[], object]:
        """The scratch network call through scratch_sd.accel: torch.compile (dynamic=False: one
        compilation per shape) or a CUDA graph (one capture per shape); the first call pays it."""
        key = (impl, case.component)
        if key not in self._accelerated:
            nets = self.nets("scratch")

            def network(**kw):
                return C.network_call(case.component, "plain", nets, kw)()

            wrap = accel.accelerator(compile=impl == "scratch_compiled", cuda_graphs=impl == "scratch_cudagraph",
                                     device=self.device)
            self._accelerated[key] = wrap(network)
        fn = self._accelerated[key]
        return lambda: fn(**inputs)

    def _scheduler(self, impl: str):
        if is_candidate(impl):
            return self.candidates[impl].scheduler(self.scheduler_name, dict(self.refs.scheduler_config))
        return C.make_scheduler(impl, self.scheduler_name, self.refs.scheduler_config)

    def _scheduler_call(self, case: C.Case, impl: str) -> Call:
        sched = self._scheduler(impl)
        inputs = C.make_inputs(case, self.cfg, self.device)
        return Call(C.scheduler_loop(sched, self.steps, inputs["x"], inputs["eps"]), units=C.scheduler_calls(sched, self.steps))

    def _pipeline_call(self, case: C.Case, impl: str) -> Call:
        from benchmarks.timing import CpuClock

        nets = self._diffusers_nets(impl) if is_candidate(impl) else self.nets(impl)
        cand = self.candidates.get(impl)
        sched = self._scheduler(impl) if cand is not None and "scheduler" in cand.components else \
            C.make_scheduler("diffusers" if is_candidate(impl) else impl, self.scheduler_name, self.refs.scheduler_config)
        unet_calls = C.scheduler_calls(sched, self.steps)
        pipe = C.make_pipeline(impl, nets, self.refs.tokenizer, sched, self.cfg)
        run = C.pipeline_call(impl, pipe, case, self.steps)
        clock = self.clock or CpuClock()
        call = Call(lambda: None, unet_calls=unet_calls)

        def fn():
            timer = clock.stage_timer()
            with C.staged(timer, nets["text_encoder"], nets["unet"], nets["vae"]):
                out = run()
            call.stage_timers.append(timer)
            return out

        call.fn = fn
        return call

    # ---- work
    def gflop(self, case: C.Case, impl: str) -> float | None:
        """GFLOP of one call, counted on meta copies (None: nothing countable, scheduler_step). The
        accelerated and candidate impls do the same network's work: counted on its eager form."""
        impl = "scratch" if impl in C.ACCELERATED else ("diffusers" if is_candidate(impl) else impl)
        if case.component == "scheduler_step":
            return None
        if case.component == "pipeline":
            sched = C.make_scheduler(impl, self.scheduler_name, self.refs.scheduler_config)
            n = C.scheduler_calls(sched, self.steps)
            part = lambda comp, images: self.gflop(C.Case(comp, case.dtype, images, case.resolution), impl)  # noqa: E731
            return part("text_encoder", case.images) + n * part("unet", case.images) + part("vae_decode", case.images)
        key = (case.component, impl, case.batch_size, case.resolution)
        if key not in self._gflop:
            nets = {name: self._meta_net(impl, name) for name in C.NETWORKS_OF[case.component]}
            inputs = C.make_inputs(case, self.cfg, "meta")
            self._gflop[key] = count_gflop(C.network_call(case.component, self.style(impl), nets, inputs))
        return self._gflop[key]

    def _meta_net(self, impl: str, name: str) -> nn.Module:
        if (impl, name) not in self._meta:
            self._meta[impl, name] = meta_clone(self.nets(impl)[name])
        return self._meta[impl, name]
