"""Opt-in acceleration of the scratch networks: torch.compile and CUDA graphs.

    unet_c = compile_network(unet)                          # torch.compile (CPU: inductor + a C++ compiler)
    step = CudaGraphRunner(lambda x, t, c: unet(x, t, c))   # CUDA: capture once per input signature, replay after
    with torch.no_grad():
        eps = step(x, t, context)
    pipe.accelerate(compile=True)                           # the same, for ScratchPipeline's UNet call
    pipe.accelerate(cuda_graphs=True)                       # (pipeline on CUDA)

Neither changes a weight or a module; both are wrappers around a call. Both change numerics only
as far as the kernels they run differ: inductor fuses and reorders fp32 arithmetic (the tiny UNet
moves by ~1e-6 on CPU, tests/test_accel.py), while a CUDA graph replays the very kernels it
captured, on the same addresses, so it gives eager's bits (on the GPU eager ran on).

CUDA graphs (PyTorch docs, "CUDA Graphs"): a graph records the kernels of one call together
with the addresses of every tensor they touch; `replay()` relaunches them with one CPU call. So:
- inputs are copied into static buffers captured with the graph (one graph per input signature:
  shapes, dtypes, devices, and the values of non-tensor arguments, which are baked in);
- outputs live in the graph's private memory and are overwritten by the next replay
  (`clone_outputs=True`, the default, returns copies);
- the weights are read from where they were at capture: moving or re-creating them (`.to()`,
  assigning new Parameters) needs `reset()`; copying into them in place (`load_state_dict`) does not;
- nothing may synchronise with the CPU inside the call (`.item()`, printing a tensor, a python
  branch on a tensor's value): capture raises.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- torch.compile
def compile_modes() -> tuple[str, ...]:
    """torch.compile's modes, as this torch lists them (2.13: default, lite, reduce-overhead,
    max-autotune-no-cudagraphs, max-autotune)."""
    try:
        from torch._inductor import list_mode_options  # the list torch.compile's docstring points to

        return tuple(list_mode_options())
    except ImportError:  # pragma: no cover - older torch
        return ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def mode_uses_cuda_graphs(mode: str) -> bool:
    """Whether a torch.compile mode runs inductor's own CUDA graphs (reduce-overhead, max-autotune)."""
    try:
        from torch._inductor import list_mode_options

        return bool(list_mode_options(mode).get("triton.cudagraphs", False))
    except ImportError:  # pragma: no cover - older torch
        return mode in ("reduce-overhead", "max-autotune")


def check_compile_mode(mode: str) -> str:
    modes = compile_modes()
    if mode not in modes:
        raise ValueError(f"unknown torch.compile mode {mode!r}; known: {', '.join(modes)}")
    return mode


def compile_network(net: Callable, *, mode: str = "default", dynamic: bool | None = False,
                    fullgraph: bool = False) -> Callable:
    """torch.compile of a scratch network or of one of its calls.

    `net`: a module (UNet, CLIPTextModel: its forward is compiled, and the result shares the
    module's parameters) or any callable of tensors (`vae.decode`, `vae.encode`, a lambda around a
    network call). dynamic=False (the default) specialises on the input shapes: a new shape
    recompiles. fullgraph=True raises where dynamo would break the graph instead of falling back
    to python between graphs. The first call compiles (minutes at sd15 size on a CPU); later calls
    with the same shapes and grad mode reuse the compiled code."""
    check_compile_mode(mode)
    if not callable(net):
        raise TypeError(f"compile_network needs a module or a callable, got {type(net).__name__}")
    if dynamic not in (True, False, None):
        raise ValueError(f"dynamic must be True, False or None, got {dynamic!r}")
    return torch.compile(net, mode=mode, dynamic=dynamic, fullgraph=fullgraph)


# --------------------------------------------------------------------------- CUDA graphs
class CudaBackend:
    """The CUDA calls CudaGraphRunner makes, in one place: a test hands the runner a fake with the
    same methods and runs its logic on the CPU (tests/test_accel.py)."""

    device_type = "cuda"

    def available(self) -> bool:
        return torch.cuda.is_available()

    def new_graph(self):
        return torch.cuda.CUDAGraph()

    def new_stream(self):
        return torch.cuda.Stream()

    def current_stream(self):
        return torch.cuda.current_stream()

    def stream(self, stream):
        return torch.cuda.stream(stream)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def capture(self, graph, fn: Callable[[], Any]) -> Any:
        """Record fn's kernels into `graph`; returns fn's outputs (graph memory, not yet computed)."""
        with torch.cuda.graph(graph):
            return fn()


class _Captured:
    """One captured graph: its static inputs (positional and keyword) and static outputs."""

    def __init__(self, graph, args: list, kwargs: dict, outputs):
        self.graph, self.args, self.kwargs, self.outputs = graph, args, kwargs, outputs

    def load(self, args: tuple, kwargs: dict) -> None:
        """Copy a call's tensors into the static input buffers (the graph reads them there)."""
        for static, new in zip(self.args, args):
            if isinstance(static, Tensor):
                static.copy_(new)
        for name, static in self.kwargs.items():
            if isinstance(static, Tensor):
                static.copy_(kwargs[name])


class CudaGraphRunner:
    """Run `fn(*args, **kwargs)` as a CUDA graph: captured on the first call for each input
    signature, replayed after that.

    fn takes tensors (and python numbers, strings, None, which become part of the signature and are
    baked into the graph) and returns a tensor or a tuple/list of tensors. Inference only: call it
    under torch.no_grad() or torch.inference_mode() (under autograd it raises: a replay records
    nothing for backward). Its buffers and outputs are ordinary tensors in either mode.

    A first call: static input buffers (copies of the inputs), `warmup` eager runs on a side
    stream (lazy initialisation, cuDNN/cuBLAS workspaces, torch.compile's compilation: none of it
    may happen during capture), capture, then one replay for the result. A later call with the same
    signature: copy_ the inputs into the buffers, replay. At most `max_graphs` graphs are kept (the
    least recently used is dropped). Each graph has its own memory pool: sharing one is only safe
    when graphs replay in capture order. clone_outputs=False returns the graph's own output tensors,
    which the next replay overwrites."""

    def __init__(self, fn: Callable, *, warmup: int = 3, max_graphs: int = 8, clone_outputs: bool = True,
                 backend: CudaBackend | None = None):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
        self.fn, self.warmup, self.max_graphs, self.clone_outputs = fn, warmup, max_graphs, clone_outputs
        self.backend = backend or CudaBackend()
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.captures = 0  # graphs captured so far (a re-capture after eviction counts again)

    @property
    def num_graphs(self) -> int:
        """Graphs held now."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every graph (after the weights moved: `.to()`, new Parameters)."""
        self._graphs.clear()

    def __call__(self, *args, **kwargs):
        if not self.backend.available():
            raise RuntimeError("CUDA graphs need a CUDA device, and torch.cuda.is_available() is False")
        if torch.is_grad_enabled():
            raise RuntimeError("CudaGraphRunner is inference-only: call it under torch.no_grad() or "
                               "torch.inference_mode()")
        key = self.signature(args, kwargs)
        # Ordinary (not inference) tensors, whether the caller is in inference_mode or no_grad: a
        # buffer made in one mode must accept copy_ in the other.
        with torch.inference_mode(False), torch.no_grad():
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(key, args, kwargs)
            else:
                self._graphs.move_to_end(key)
                entry.load(args, kwargs)
                entry.graph.replay()
            return _map_tensors(entry.outputs, Tensor.clone) if self.clone_outputs else entry.outputs

    def signature(self, args: tuple, kwargs: dict) -> tuple:
        """The cache key: per argument, a tensor's (shape, dtype, device), or a plain value itself."""
        key = []
        for name, v in [*enumerate(args), *sorted(kwargs.items())]:
            if isinstance(v, Tensor):
                if v.device.type != self.backend.device_type:
                    raise ValueError(f"CUDA graphs need {self.backend.device_type} tensors; argument {name!r} "
                                     f"is on {v.device}")
                key.append((name, tuple(v.shape), v.dtype, v.device))
            elif v is None or isinstance(v, (bool, int, float, str)):
                key.append((name, type(v), v))
            else:
                raise TypeError(f"CudaGraphRunner takes tensors, numbers, strings and None; argument {name!r} "
                                f"is a {type(v).__name__}")
        return tuple(key)

    def _capture(self, key: tuple, args: tuple, kwargs: dict) -> _Captured:
        be = self.backend
        static_args = [_static(v) for v in args]
        static_kwargs = {k: _static(v) for k, v in kwargs.items()}

        def run():
            return self.fn(*static_args, **static_kwargs)

        side = be.new_stream()  # warm-up on a side stream, as the PyTorch docs' recipe
        side.wait_stream(be.current_stream())
        with be.stream(side):
            for _ in range(self.warmup):
                _check_outputs(run())
        be.current_stream().wait_stream(side)
        be.synchronize()
        graph = be.new_graph()
        entry = _Captured(graph, static_args, static_kwargs, be.capture(graph, run))
        self._graphs[key] = entry
        self.captures += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)  # the least recently used graph and its memory pool
        graph.replay()  # capture only recorded the kernels: this computes the first result
        return entry


def _static(v):
    return v.clone() if isinstance(v, Tensor) else v  # clone keeps the input's strides


def _check_outputs(out) -> None:
    if not (isinstance(out, Tensor) or isinstance(out, (tuple, list)) and all(isinstance(t, Tensor) for t in out)):
        raise TypeError(f"CudaGraphRunner needs fn to return a tensor or a tuple/list of tensors, got "
                        f"{type(out).__name__}")


def _map_tensors(out, fn: Callable[[Tensor], Tensor]):
    return fn(out) if isinstance(out, Tensor) else type(out)(fn(t) for t in out)


# --------------------------------------------------------------------------- one call, accelerated
def accelerator(*, compile: bool = False, compile_mode: str = "default", cuda_graphs: bool = False,
                device: torch.device | str = "cpu",
                backend: CudaBackend | None = None) -> Callable[[Callable], Callable]:
    """A function that wraps a network call: torch.compile'd, then (cuda_graphs) run as CUDA graphs.
    Checks the options first (ValueError / RuntimeError, one line): a CUDA graph needs a CUDA device
    and the call's tensors on it, and a compile mode that runs its own CUDA graphs
    (reduce-overhead, max-autotune) does not nest inside ours."""
    check_compile_mode(compile_mode)
    if cuda_graphs:
        be = backend or CudaBackend()
        if not be.available():
            raise RuntimeError("CUDA graphs need a CUDA device, and torch.cuda.is_available() is False")
        if torch.device(device).type != be.device_type:
            raise ValueError(f"CUDA graphs need the networks on {be.device_type}; they are on {device} "
                             f"(move them first, e.g. pipe.to('cuda'))")
        if compile and mode_uses_cuda_graphs(compile_mode):
            raise ValueError(f"compile mode {compile_mode!r} already runs inductor's CUDA graphs; with "
                             "cuda_graphs=True use compile_mode 'default' or 'max-autotune-no-cudagraphs'")

    def wrap(fn: Callable) -> Callable:
        if compile:
            fn = compile_network(fn, mode=compile_mode)
        if cuda_graphs:
            fn = CudaGraphRunner(fn, backend=backend)
        return fn

    return wrap


__all__ = ["compile_network", "compile_modes", "mode_uses_cuda_graphs", "CudaGraphRunner", "CudaBackend",
           "accelerator"]
