"""The models of one benchmark run and the calls timed on them, per case and implementation.

`Workload` holds both sides' networks (the same weights: parity.models converts the
reference's weights into the scratch networks), moves them between dtypes in place, and hands
out for a (case, impl) a `Call`: the zero-argument function to time, how many units one call
covers (scheduler_step: the number of steps), and for pipelines the stage timers of each call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from benchmarks import cases as C
from benchmarks.flops import count_gflop, meta_clone
from scratch_sd import accel


@dataclass
class Call:
    fn: Callable[[], object]
    units: int = 1  # the time of one call is divided by this (scheduler_step: per step)
    stage_timers: list = field(default_factory=list)  # pipeline: one StageTimer per call
    unet_calls: int = 0  # pipeline: UNet calls per pipeline call


def unsupported(case: C.Case, impl: str, device: str = "cpu") -> str | None:
    """Why (case, impl) is not a meaningful case on `device`, or None."""
    if impl == "scratch_cudagraph" and torch.device(device).type != "cuda":
        return "scratch_cudagraph replays CUDA graphs: a CUDA case (--device cuda)"
    if impl in C.ACCELERATED and case.component in ("scheduler_step", "pipeline"):
        what = "compiles" if impl == "scratch_compiled" else "graphs"
        return f"{impl} {what} the networks only (text_encoder, unet, vae_decode, vae_encode)"
    return None


class Workload:
    def __init__(self, models, device: str, scheduler: str, steps: int, clock=None):
        self.models, self.cfg, self.device = models, models.cfg, torch.device(device)
        self.scheduler_name, self.steps, self.clock = scheduler, steps, clock
        self.dtype: str | None = None
        self._accelerated: dict = {}  # (impl, component) -> the compiled / graphed network call
        self._meta: dict = {}  # (impl, network) -> meta copy, for counting FLOPs
        self._gflop: dict = {}

    # ---- modules
    def nets(self, impl: str) -> dict[str, nn.Module]:
        side = "reference" if impl == "diffusers" else "scratch"
        return {name: getattr(pair, side) for name, pair in self.models.pairs.items()
                if getattr(pair, side, None) is not None}

    def to(self, dtype: str) -> None:
        """Move every network to `dtype` in place (run dtypes in the order fp32, bf16, fp16: each
        step is then an exact conversion of the fp32 weights, bf16 being a subset of fp16's mantissa)."""
        for pair in self.models.pairs.values():
            for module in (pair.reference, pair.scratch):
                if module is not None:
                    module.to(device=self.device, dtype=C.DTYPES[dtype])
        self.dtype = dtype
        self._accelerated.clear()  # compiled code guards on the dtype; CUDA graphs hold the old weights' addresses

    def weights_mb(self, case: C.Case, impl: str) -> float:
        nets = self.nets(impl)
        total = sum(t.numel() * t.element_size() for name in C.NETWORKS_OF[case.component]
                    for t in list(nets[name].parameters()) + list(nets[name].buffers()))
        return total / 2**20

    # ---- calls
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
        return Call(C.network_call(case.component, impl, self.nets(impl), inputs))

    def _accelerated_fn(self, case: C.Case, impl: str, inputs: dict) -> Callable[[], object]:
        """The scratch network call through scratch_sd.accel: torch.compile (dynamic=False: one
        compilation per shape) or a CUDA graph (one capture per shape); the first call pays it."""
        key = (impl, case.component)
        if key not in self._accelerated:
            nets = self.nets("scratch")

            def network(**kw):
                return C.network_call(case.component, "scratch", nets, kw)()

            wrap = accel.accelerator(compile=impl == "scratch_compiled", cuda_graphs=impl == "scratch_cudagraph",
                                     device=self.device)
            self._accelerated[key] = wrap(network)
        fn = self._accelerated[key]
        return lambda: fn(**inputs)

    def _scheduler_call(self, case: C.Case, impl: str) -> Call:
        sched = C.make_scheduler(impl, self.scheduler_name, self.models.scheduler_config)
        inputs = C.make_inputs(case, self.cfg, self.device)
        return Call(C.scheduler_loop(sched, self.steps, inputs["x"], inputs["eps"]), units=C.scheduler_calls(sched, self.steps))

    def _pipeline_call(self, case: C.Case, impl: str) -> Call:
        from benchmarks.timing import CpuClock

        nets = self.nets(impl)
        sched = C.make_scheduler(impl, self.scheduler_name, self.models.scheduler_config)
        unet_calls = C.scheduler_calls(sched, self.steps)
        pipe = C.make_pipeline(impl, nets, self.models.tokenizer, sched, self.cfg)
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
        """GFLOP of one call, counted on meta copies (None: nothing countable, scheduler_step)."""
        impl = "scratch" if impl in C.ACCELERATED else impl  # the same network, the same work
        if case.component == "scheduler_step":
            return None
        if case.component == "pipeline":
            sched = C.make_scheduler(impl, self.scheduler_name, self.models.scheduler_config)
            n = C.scheduler_calls(sched, self.steps)
            part = lambda comp, images: self.gflop(C.Case(comp, case.dtype, images, case.resolution), impl)  # noqa: E731
            return part("text_encoder", case.images) + n * part("unet", case.images) + part("vae_decode", case.images)
        key = (case.component, impl, case.batch_size, case.resolution)
        if key not in self._gflop:
            nets = {name: self._meta_net(impl, name) for name in C.NETWORKS_OF[case.component]}
            inputs = C.make_inputs(case, self.cfg, "meta")
            self._gflop[key] = count_gflop(C.network_call(case.component, impl, nets, inputs))
        return self._gflop[key]

    def _meta_net(self, impl: str, name: str) -> nn.Module:
        if (impl, name) not in self._meta:
            self._meta[impl, name] = meta_clone(self.nets(impl)[name])
        return self._meta[impl, name]
