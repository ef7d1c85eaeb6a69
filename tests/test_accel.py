"""scratch_sd.accel: torch.compile and CUDA graphs as options (issue 7, the CUDA path on paper).

This machine has no GPU. CudaGraphRunner's logic runs on the CPU through a fake backend that
keeps a CUDA graph's semantics: capture records the call and computes nothing (its outputs are
NaN until a replay), and a replay re-runs the recorded call on the static input buffers, writing
into the same output tensors. A runner that forgot to copy new inputs in, or to replay after
capture, or that handed out the graph's outputs as if they were fresh, fails here. The one test
on a real GPU is skipped without one; no GPU number is claimed.
"""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

from conftest import scratch_from
from sdparity.main import main as cli_main
from scratch_sd import accel
from scratch_sd.accel import CudaGraphRunner


# --------------------------------------------------------------------------- a fake CUDA backend
def _tensors(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


class FakeGraph:
    def __init__(self):
        self.fn, self.outputs, self.replays = None, None, 0

    def replay(self):
        self.replays += 1
        for static, new in zip(_tensors(self.outputs), _tensors(self.fn())):
            static.copy_(new)


class FakeStream:
    def wait_stream(self, other):
        pass


class FakeBackend(accel.CudaBackend):
    """CUDA graph semantics on the CPU (see the module docstring); `log` records what ran where."""

    device_type = "cpu"

    def __init__(self):
        self.log, self.graphs, self.on_side_stream = [], [], False

    def available(self):
        return True

    def new_graph(self):
        self.graphs.append(FakeGraph())
        return self.graphs[-1]

    def new_stream(self):
        return FakeStream()

    def current_stream(self):
        return FakeStream()

    @contextlib.contextmanager
    def stream(self, stream):
        self.on_side_stream = True
        try:
            yield
        finally:
            self.on_side_stream = False

    def synchronize(self):
        self.log.append("sync")

    def capture(self, graph, fn):
        self.log.append("capture")
        graph.fn, graph.outputs = fn, fn()
        for t in _tensors(graph.outputs):
            t.fill_(float("nan"))  # a capture records kernels; it computes nothing
        return graph.outputs


def recording(fn, backend: FakeBackend):
    """fn, noting each call in the backend's log: 'warmup' on the side stream, else 'run'."""

    def wrapped(*args, **kwargs):
        backend.log.append("warmup" if backend.on_side_stream else "run")
        return fn(*args, **kwargs)

    return wrapped


W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))


def affine(x, y):
    return x @ W + y


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- CudaGraphRunner logic
def test_first_call_warms_up_on_a_side_stream_captures_and_replays():
    be = FakeBackend()
    runner = CudaGraphRunner(recording(affine, be), warmup=2, backend=be)
    x, y = randn(4, 8), randn(4, 8, seed=1)
    with torch.no_grad():
        out = runner(x, y)
    # two warm-up runs on the side stream, a sync, the capture (which calls fn once), one replay
    assert be.log == ["warmup", "warmup", "sync", "capture", "run", "run"]
    assert runner.captures == 1 and runner.num_graphs == 1 and be.graphs[0].replays == 1
    assert torch.equal(out, affine(x, y))


def test_same_signature_replays_on_the_new_inputs():
    be = FakeBackend()
    runner = CudaGraphRunner(recording(affine, be), backend=be)
    with torch.no_grad():
        first = runner(randn(4, 8), randn(4, 8, seed=1))
        be.log.clear()
        x2, y2 = randn(4, 8, seed=2), randn(4, 8, seed=3)
        second = runner(x2, y2)
    assert be.log == ["run"], be.log  # a replay only: no warm-up, no capture
    assert runner.captures == 1 and be.graphs[0].replays == 2
    assert torch.equal(second, affine(x2, y2))
    assert not torch.equal(first, second)


def test_a_new_shape_captures_a_new_graph_and_the_cache_is_bounded_lru():
    be = FakeBackend()
    runner = CudaGraphRunner(affine, max_graphs=2, backend=be)
    xs = {n: (randn(n, 8, seed=n), randn(n, 8, seed=10 + n)) for n in (1, 2, 3)}
    with torch.no_grad():
        for n in (1, 2, 1):
            assert torch.equal(runner(*xs[n]), affine(*xs[n]))
        assert runner.captures == 2
        runner(*xs[3])  # a third shape: the least recently used graph (n=2) is dropped
        assert runner.captures == 3 and runner.num_graphs == 2
        runner(*xs[1])  # still held: replayed
        assert runner.captures == 3
        assert torch.equal(runner(*xs[2]), affine(*xs[2]))  # dropped: captured again
        assert runner.captures == 4 and runner.num_graphs == 2
        runner.reset()
        assert runner.num_graphs == 0


def test_non_tensor_arguments_are_part_of_the_signature():
    be = FakeBackend()
    runner = CudaGraphRunner(lambda x, scale, shift=None: x * scale if shift is None else x * scale + shift,
                             backend=be)
    x = randn(3, 4)
    with torch.no_grad():
        assert torch.equal(runner(x, 2.0), x * 2.0)
        assert torch.equal(runner(x, 3.0), x * 3.0)  # a baked-in value: another graph
        assert torch.equal(runner(x, 3), x * 3)  # int 3 is not float 3.0
        assert runner.captures == 3
        assert torch.equal(runner(x, 2.0, shift=x), x * 2.0 + x)  # keyword tensors are inputs too
        x2 = randn(3, 4, seed=5)
        assert torch.equal(runner(x2, 2.0, shift=x2), x2 * 2.0 + x2)
        assert runner.captures == 4
    assert runner.signature((x, 2.0), {}) != runner.signature((x, 2), {})


def test_outputs_are_clones_unless_asked_for_the_static_ones():
    x1, x2 = randn(4, 8), randn(4, 8, seed=1)
    with torch.no_grad():
        cloning = CudaGraphRunner(lambda x: (x + 1, x * 2), backend=FakeBackend())
        a1, b1 = cloning(x1)
        cloning(x2)
        assert torch.equal(a1, x1 + 1) and torch.equal(b1, x1 * 2)  # kept their values

        static = CudaGraphRunner(lambda x: x + 1, clone_outputs=False, backend=FakeBackend())
        s1 = static(x1)
        s2 = static(x2)
        assert s1.data_ptr() == s2.data_ptr()  # the graph's own output tensor
        assert torch.equal(s1, x2 + 1)  # overwritten by the second replay


def test_buffers_and_outputs_are_ordinary_tensors_in_inference_mode_and_no_grad():
    runner = CudaGraphRunner(affine, backend=FakeBackend())
    with torch.inference_mode():
        x, y = randn(4, 8), randn(4, 8, seed=1)
        out = runner(x, y)  # captured with inference tensors as inputs
    assert not out.is_inference()
    with torch.no_grad():
        x2, y2 = randn(4, 8, seed=2), randn(4, 8, seed=3)
        assert torch.equal(runner(x2, y2), affine(x2, y2))  # copy_ into the buffers outside inference mode


def test_refuses_autograd_and_bad_arguments():
    runner = CudaGraphRunner(affine, backend=FakeBackend())
    x = randn(4, 8)
    with pytest.raises(RuntimeError, match=r"inference-only: call it under torch.no_grad\(\)"):
        runner(x, x)
    with torch.no_grad():
        with pytest.raises(ValueError, match="CUDA graphs need cpu tensors; argument 1 is on meta"):
            runner(x, torch.empty(4, 8, device="meta"))
        with pytest.raises(TypeError, match="argument 1 is a list"):
            runner(x, [1, 2])
        with pytest.raises(TypeError, match="return a tensor or a tuple/list of tensors, got dict"):
            CudaGraphRunner(lambda x: {"y": x}, backend=FakeBackend())(x)
    with pytest.raises(ValueError, match="warmup must be an integer >= 1"):
        CudaGraphRunner(affine, warmup=0)
    with pytest.raises(ValueError, match="max_graphs must be an integer >= 1"):
        CudaGraphRunner(affine, max_graphs=0)


def test_the_real_backend_refuses_cpu_tensors():
    runner = CudaGraphRunner(affine)  # torch.cuda underneath
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError), match="CUDA graphs need") as info:
        runner(randn(4, 8), randn(4, 8))
    assert len(str(info.value).splitlines()) == 1
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in str(info.value)
    else:
        assert "argument 0 is on cpu" in str(info.value)


# --------------------------------------------------------------------------- on a scratch network
@pytest.fixture(scope="module")
def tiny_unet():
    from scratch_sd.config import tiny
    from scratch_sd.unet import UNet

    torch.manual_seed(0)
    return UNet(tiny().unet).eval()


def unet_inputs(seed: int, batch: int = 2, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor(999 - seed),
            torch.randn(batch, 77, 32, generator=g))


def test_fake_graphs_of_the_tiny_unet_give_eager_bits(tiny_unet):
    runner = CudaGraphRunner(tiny_unet, backend=FakeBackend())
    with torch.no_grad():
        for seed in (0, 1, 2):  # one capture, then replays on new latents, timestep and context
            inputs = unet_inputs(seed)
            assert torch.equal(runner(*inputs), tiny_unet(*inputs)), seed
    assert runner.captures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here: no GPU figure is claimed)")
def test_cuda_graph_of_the_tiny_unet_matches_eager_on_a_gpu(tiny_unet):
    """A replay launches the kernels eager ran, on the same values: expected bit-identical. The
    bound allows cuBLAS/cuDNN choosing another algorithm on the capture stream (TF32 is off here,
    so that would be an fp32 reordering, ~1e-6 at these magnitudes)."""
    import copy

    unet = copy.deepcopy(tiny_unet).cuda()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runner = CudaGraphRunner(unet)
        worst = 0.0
        with torch.no_grad():
            for seed in (0, 1):
                inputs = [t.cuda() for t in unet_inputs(seed)]
                ref, out = unet(*inputs), runner(*inputs)
                worst = max(worst, float((out - ref).abs().max()))
        print(f"CUDA graph vs eager, tiny UNet fp32: max_abs {worst:.3g}")
        assert runner.captures == 1 and worst <= 1e-5, worst
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --------------------------------------------------------------------------- torch.compile
def test_compile_modes_are_torchs():
    modes = accel.compile_modes()
    assert {"default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"} <= set(modes)
    assert accel.mode_uses_cuda_graphs("reduce-overhead") and accel.mode_uses_cuda_graphs("max-autotune")
    assert not accel.mode_uses_cuda_graphs("default")
    assert not accel.mode_uses_cuda_graphs("max-autotune-no-cudagraphs")


def test_compile_network_checks_its_arguments_and_compiles_lazily(tiny_unet):
    with pytest.raises(ValueError, match=r"unknown torch.compile mode 'fast'; known: default, .*reduce-overhead"):
        accel.compile_network(tiny_unet, mode="fast")
    with pytest.raises(ValueError, match="dynamic must be True, False or None"):
        accel.compile_network(tiny_unet, dynamic="yes")
    with pytest.raises(TypeError, match="needs a module or a callable"):
        accel.compile_network(42)
    compiled = accel.compile_network(tiny_unet)  # nothing is compiled before the first call
    assert compiled._orig_mod is tiny_unet
    assert [p.data_ptr() for p in compiled.parameters()] == [p.data_ptr() for p in tiny_unet.parameters()]


@pytest.mark.slow
def test_compiled_tiny_unet_matches_eager_on_cpu(tiny_unet):
    """Inductor fuses and reorders fp32 arithmetic: the bound is the fp32 reordering level (outputs
    ~1 in size; measured 1.1e-6 / 1.5e-6 here). fullgraph=True: one graph, no python fallback.
    Compile time of the first call on this 2-core CPU: ~100 s with a cold inductor cache, ~8 s warm."""
    compiled = accel.compile_network(tiny_unet, fullgraph=True)
    worst = 0.0
    with torch.no_grad():
        for seed in (0, 1):  # the second call reuses the compiled code (same shapes)
            inputs = unet_inputs(seed)
            start = time.perf_counter()
            out = compiled(*inputs)
            seconds = time.perf_counter() - start
            worst = max(worst, float((out - tiny_unet(*inputs)).abs().max()))
            print(f"compiled tiny UNet call {seed}: {seconds:.3g} s")
    print(f"compiled vs eager, tiny UNet fp32 CPU: max_abs {worst:.3g}")
    assert worst <= 1e-5, worst


# --------------------------------------------------------------------------- the pipeline option
@pytest.fixture(scope="module")
def tiny_nets(tiny_refs):
    """Scratch networks holding the tiny references' weights (built once for the module)."""
    return scratch_from(tiny_refs)


@pytest.fixture
def make_pipe(tiny_refs, tiny_nets):
    """A fresh scratch pipeline by scheduler name, over the module's scratch networks."""
    from parity.pipelines import scratch_pipeline

    return lambda scheduler: scratch_pipeline(tiny_nets, tiny_refs.tokenizer, scheduler, tiny_refs.scheduler_config,
                                              tiny_refs.cfg)


def _image(pipe, **kwargs):
    return pipe("a red fox", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt",
                progress=False, **kwargs).images


def test_accelerate_default_keeps_the_pipeline_bit_identical(make_pipe):
    plain = _image(make_pipe("euler"))
    pipe = make_pipe("euler").accelerate(cuda_graphs=True, vae_decode=True,
                                                             graph_backend=FakeBackend())
    assert pipe.accelerate() is pipe and pipe._unet_call is None and pipe._decode_call is None  # back to eager
    assert torch.equal(_image(pipe), plain)


def test_accelerate_with_cuda_graphs_on_a_cpu_pipeline_raises(make_pipe):
    pipe = make_pipe("euler")
    with pytest.raises((RuntimeError, ValueError), match="CUDA graphs need") as info:
        pipe.accelerate(cuda_graphs=True)
    assert len(str(info.value).splitlines()) == 1
    assert pipe._unet_call is None  # nothing was changed
    with pytest.raises(ValueError, match="already runs inductor's CUDA graphs"):
        pipe.accelerate(compile=True, compile_mode="reduce-overhead", cuda_graphs=True, graph_backend=FakeBackend())
    with pytest.raises(ValueError, match="unknown torch.compile mode"):
        pipe.accelerate(compile=True, compile_mode="turbo")


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_accelerate_with_fake_cuda_graphs_gives_the_eager_image(make_pipe, scheduler):
    plain = _image(make_pipe(scheduler), negative_prompt="blurry")
    be = FakeBackend()
    pipe = make_pipe(scheduler).accelerate(cuda_graphs=True, vae_decode=True, graph_backend=be)
    assert torch.equal(_image(pipe, negative_prompt="blurry"), plain)
    unet_graph, decode_graph = be.graphs  # one UNet graph for every step (t is a tensor input), one decode
    assert pipe._unet_call.captures == 1 and unet_graph.replays == 3 and decode_graph.replays == 1
    assert torch.equal(_image(pipe, negative_prompt="blurry"), plain)  # a second call: replays only
    assert pipe._unet_call.captures == 1 and unet_graph.replays == 6


@pytest.mark.slow
def test_accelerate_compile_matches_eager_image(make_pipe):
    plain = _image(make_pipe("euler"))
    out = _image(make_pipe("euler").accelerate(compile=True))
    max_abs = float((out - plain).abs().max())
    print(f"pipeline with compiled UNet vs eager, tiny, [0, 1] pixels: max_abs {max_abs:.3g}")
    assert max_abs <= 1e-5, max_abs


# --------------------------------------------------------------------------- sdparity generate
@pytest.mark.parametrize("args, words", [
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs --device cuda"),
    (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    (["--compile", "--impl", "diffusers"], "--compile and --cuda-graphs accelerate the scratch pipeline"),
    (["--compile", "turbo"], "invalid choice: 'turbo'"),
])
def test_generate_bad_acceleration_exits_2_with_one_line_and_no_file(tmp_path, capsys, args, words):
    out = tmp_path / "out.png"
    rc = cli_main(["generate", "--prompt", "a", "--steps", "1", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_generate_device_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    out = tmp_path / "out.png"
    assert cli_main(["generate", "--prompt", "a", "--device", "cuda", "--cuda-graphs", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_generate_compile_flag_reaches_the_scratch_pipeline(tiny_refs, tmp_path, capsys, monkeypatch):
    """--compile MODE goes to ScratchPipeline.accelerate -> accel.compile_network (spied: the real
    compile is the slow test above)."""
    import parity.pipelines
    import parity.references

    monkeypatch.setattr(parity.references, "build_references",
                        lambda preset_name="tiny", model=None, components=None, seed=0, **_: tiny_refs)
    built = []  # the scratch pipeline the CLI builds: its UNet is what must be compiled
    real_build = parity.pipelines.scratch_pipeline_from_references

    def build_spy(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(parity.pipelines, "scratch_pipeline_from_references", build_spy)
    seen = []

    def spy(fn, *, mode="default", **kw):
        seen.append((getattr(fn, "__self__", fn), mode))
        return fn

    monkeypatch.setattr(accel, "compile_network", spy)
    out = tmp_path / "fox.png"
    rc = cli_main(["generate", "--prompt", "a", "--steps", "1", "--compile", "max-autotune-no-cudagraphs",
                   "--no-progress", "--out", str(out)])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert len(built) == 1 and seen == [(built[0].unet, "max-autotune-no-cudagraphs")]
    assert out.is_file() and "scratch with compile max-autotune-no-cudagraphs" in text.out


# --------------------------------------------------------------------------- benchmarks
def test_bench_cudagraph_impl_is_a_cuda_case_and_networks_only():
    from benchmarks.cases import IMPLS, Case
    from benchmarks.workload import unsupported

    assert "scratch_cudagraph" in IMPLS
    for comp in ("text_encoder", "unet", "vae_decode", "vae_encode", "scheduler_step", "pipeline"):
        why = unsupported(Case(comp, "fp32", 1, 64), "scratch_cudagraph", "cpu")
        assert why and "CUDA case (--device cuda)" in why, comp
    assert unsupported(Case("unet", "fp16", 1, 64), "scratch_cudagraph", "cuda") is None
    assert "graphs the networks only" in unsupported(Case("pipeline", "fp16", 1, 64), "scratch_cudagraph", "cuda")
    assert "compiles the networks only" in unsupported(Case("scheduler_step", "fp32", 1, 64), "scratch_compiled")


def test_bench_compiled_impl_goes_through_accel(tiny_refs, tiny_nets, monkeypatch):
    from benchmarks.cases import Case
    from benchmarks.workload import Workload

    seen = []

    def spy(fn, *, mode="default", **kw):
        seen.append(mode)
        return fn

    monkeypatch.setattr(accel, "compile_network", spy)
    work = Workload(tiny_refs, impls=("scratch", "scratch_compiled"), device="cpu", scheduler="ddim", steps=2,
                    scratch=tiny_nets)
    work.to("fp32")  # where the models are already
    case = Case("unet", "fp32", 1, 64)
    with torch.no_grad():
        out = work.call(case, "scratch_compiled").fn()
        ref = work.call(case, "scratch").fn()
    assert seen == ["default"] and torch.equal(out, ref)
