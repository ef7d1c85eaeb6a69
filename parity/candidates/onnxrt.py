"""The `onnxruntime` candidate: each network exported to ONNX from the reference module, run by
ONNX Runtime.

Export: `torch.onnx.export(..., dynamo=True, opset_version=18)` (the torch.export-based exporter,
onnxscript's translation and graph optimiser) of the diffusers / transformers module itself, with
dynamic batch and spatial sizes. Four graphs:

    text_encoder: input_ids (B, T) int64                                  -> last_hidden_state (B, T, D)
    unet:         sample (B, C, h, w), timestep (B,) float32, encoder_hidden_states (B, T, D) -> noise_pred
    vae encode:   image (B, 3, H, W)  -> moments (B, 2 * latent_channels, h, w)  (encoder + quant_conv)
    vae decode:   latents (B, C, h, w) -> image (B, 3, H, W)                      (post_quant_conv + decoder)

Run: an `InferenceSession` on the CPU execution provider (the CUDA provider for `--device cuda`
when onnxruntime-gpu provides it), intra-op threads = torch's. Inputs and outputs cross as numpy
arrays, so a CUDA run pays a host round trip per call (the numbers, not the speed, are the point).

Cache: `<cache_dir>/onnx/<graph>-<key>/model.onnx` (+ `model.onnx.data` past 2 GB), where the key
hashes the reference's config and weights, the dtype, the opset and the torch / onnxscript / onnx
versions. Each entry is written in a temporary folder and renamed into place (never half-written);
an entry ONNX Runtime cannot load is removed and exported again, once.

Localize: the exporter records, on every node, the module scopes it came from
(`pkg.torch.onnx.name_scopes`). The output of the last node inside a module's scope is that
module's output; the tap adds those values as graph outputs (Polygraphy's "mark all", by module)
and reports them under the reference's module names, in graph order.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from parity.candidates.base import BuildRequest, Built, CandidateBase, CandidateError
from parity.candidates.onnx_tap import MODEL_FILE, LazyTap, tapped_model
from scratch_sd.names import NETWORKS, dtype_name

OPSET = 18
GRAPHS = {"text_encoder": ("text_encoder",), "unet": ("unet",), "vae": ("vae_encode", "vae_decode")}


# --------------------------------------------------------------------------- what is exported
class _TextEncoderGraph(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, input_ids):
        return self.net(input_ids, return_dict=False)[0]


class _UNetGraph(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _VAEEncodeGraph(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image):
        moments = self.net.encoder(image)
        return moments if self.net.quant_conv is None else self.net.quant_conv(moments)


class _VAEDecodeGraph(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, latents):
        if self.net.post_quant_conv is not None:
            latents = self.net.post_quant_conv(latents)
        return self.net.decoder(latents)


def _down_factor(block_out_channels) -> int:
    return 2 ** (len(block_out_channels) - 1)


def _graph_specs(component: str, reference: nn.Module, dtype: torch.dtype) -> list[tuple]:
    """[(graph name, wrapper, example inputs, dynamic shapes, input names, output name)]."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1024)
    c = reference.config
    if component == "text_encoder":
        ids = torch.zeros(2, c.max_position_embeddings, dtype=torch.int64)
        return [("text_encoder", _TextEncoderGraph(reference), (ids,), ({0: batch},), ["input_ids"],
                 "last_hidden_state")]
    if component == "unet":
        f = _down_factor(c.block_out_channels)  # the sample's sides are multiples of it
        h, w = Dim("h", min=1, max=512), Dim("w", min=1, max=512)
        x = torch.randn(2, c.in_channels, 2 * f, 2 * f, dtype=dtype)  # 2 * f: a side of f specialises
        t = torch.full((2,), 500.0)
        ctx = torch.randn(2, 7, c.cross_attention_dim, dtype=dtype)
        tokens = Dim("tokens", min=1, max=4096)
        return [("unet", _UNetGraph(reference), (x, t, ctx), ({0: batch, 2: f * h, 3: f * w}, {0: batch},
                 {0: batch, 1: tokens}), ["sample", "timestep", "encoder_hidden_states"], "noise_pred")]
    f = _down_factor(c.block_out_channels)
    h, w = Dim("h", min=1, max=1024), Dim("w", min=1, max=1024)
    image = torch.randn(2, c.in_channels, 2 * f, 2 * f, dtype=dtype)  # sizes of 1 would specialise
    latents = torch.randn(2, c.latent_channels, 3, 3, dtype=dtype)
    lh, lw = Dim("lh", min=2, max=1024), Dim("lw", min=2, max=1024)
    return [("vae_encode", _VAEEncodeGraph(reference), (image,), ({0: batch, 2: f * h, 3: f * w},), ["image"],
             "moments"),
            ("vae_decode", _VAEDecodeGraph(reference), (latents,), ({0: batch, 2: lh, 3: lw},), ["latents"], "image")]


# --------------------------------------------------------------------------- the on-disk cache
def _versions() -> dict:
    import onnx
    import onnxscript

    return {"torch": torch.__version__, "onnxscript": onnxscript.__version__, "onnx": onnx.__version__}


def cache_key(weights_hash: str, graph: str, dtype: torch.dtype) -> str:
    what = {"weights": weights_hash, "graph": graph, "dtype": dtype_name(dtype), "opset": OPSET,
            "exporter": "torch.onnx dynamo", **_versions()}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def _export_into(folder: Path, spec, say) -> None:
    graph, wrapper, args, dynamic, in_names, out_name = spec
    say(f"onnxruntime: exporting {graph} (torch.onnx dynamo, opset {OPSET}) ...")
    with warnings.catch_warnings(), _quiet_torch_logs(), open(os.devnull, "w") as null, \
            contextlib.redirect_stdout(null):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(wrapper.eval(), args, dynamo=True, opset_version=OPSET,
                                    dynamic_shapes=dynamic, input_names=in_names, output_names=[out_name],
                                    verbose=False)
        program.save(str(folder / MODEL_FILE))  # initializers go to model.onnx.data past 2 GB


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch.export logs the guards it tried at ERROR level even when it succeeds: silence them."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch", "torch._dynamo", "torch._guards", "torch.export",
                                               "torch.onnx", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def cached_export(cache: Path, key: str, graph_name: str, specs, say=lambda _t: None, fresh: bool = False) -> Path:
    """The folder holding graph `graph_name`'s export under `key`, exported first (`specs(graph_name)`:
    its export spec) when absent, or when `fresh`."""
    root = cache / "onnx"
    final = root / f"{graph_name}-{key}"
    if fresh and final.exists():
        shutil.rmtree(final)
    if (final / MODEL_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{graph_name}-", dir=root))
    try:
        with torch.no_grad():
            _export_into(tmp, specs(graph_name), say)
        (tmp / "export.json").write_text(json.dumps({"graph": graph_name, "opset": OPSET, **_versions()}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same export first: keep theirs
            if not (final / MODEL_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- running a graph
class _Graph:
    """One exported graph in an InferenceSession (and, for localize, a tapped copy of it)."""

    def __init__(self, folder: Path, providers: list[str], threads: int):
        import onnxruntime as ort

        self.folder, self.providers = folder, providers
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = threads
        self.options.inter_op_num_threads = 1
        self.options.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), self.options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        self._tapped = None  # (session, {value name: reference module name}) once asked for
        self.recording: dict | None = None  # a localize tap is active: values land here

    def run(self, *arrays) -> torch.Tensor:
        feed = dict(zip(self.inputs, (a.detach().cpu().contiguous().numpy() for a in arrays)))
        if self.recording is None:
            return torch.from_numpy(self.session.run([self.output], feed)[0])
        session, names = self.tapped()
        values = list(names)
        outs = session.run([self.output] + values, feed)
        for value, out in zip(values, outs[1:]):
            self.recording.setdefault(names[value], torch.from_numpy(out).float())
        return torch.from_numpy(outs[0])

    def tapped(self):
        if self._tapped is None:
            import onnxruntime as ort

            path, names = tapped_model(self.folder)
            self._tapped = (ort.InferenceSession(str(path), self.options, providers=self.providers), names)
        return self._tapped


class _Timestep:
    @staticmethod
    def batch(t, n: int) -> torch.Tensor:
        """The pipelines' timestep (a number, a 0-d or a (B,) tensor) as the graph's (B,) float32."""
        t = torch.as_tensor(t).detach().to("cpu", torch.float32).reshape(-1)
        return t.expand(n).contiguous() if t.numel() == 1 else t


class OnnxTextEncoder:
    def __init__(self, graph: _Graph, device: torch.device):
        self.graph, self.device = graph, device

    def __call__(self, input_ids):
        return self.graph.run(input_ids.to(torch.int64)).to(self.device)


class OnnxUNet:
    def __init__(self, graph: _Graph, device: torch.device, dtype: torch.dtype):
        self.graph, self.device, self.dtype = graph, device, dtype

    def __call__(self, sample, timestep, encoder_hidden_states):
        t = _Timestep.batch(timestep, sample.shape[0])
        return self.graph.run(sample.to(self.dtype), t, encoder_hidden_states.to(self.dtype)).to(self.device)


class OnnxVAE:
    """encode(x) -> moments (the harness makes diffusers' posterior of them), decode(z) -> image."""

    def __init__(self, encoder: _Graph, decoder: _Graph, device: torch.device, dtype: torch.dtype):
        self.encoder, self.decoder, self.device, self.dtype = encoder, decoder, device, dtype

    def encode(self, x):
        return self.encoder.run(x.to(self.dtype)).to(self.device)

    def decode(self, z):
        return self.decoder.run(z.to(self.dtype)).to(self.device)


# --------------------------------------------------------------------------- the candidate
class OnnxRuntimeCandidate(CandidateBase):
    name = "onnxruntime"
    components = NETWORKS
    profile = "exact"

    def __init__(self, say=None):
        self.say = say if say is not None else _stderr

    def unavailable(self) -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            return f"{e.name} is not installed (pip install -e '.[onnx]')"
        return None

    def providers(self, device: str) -> list[str] | str:
        import onnxruntime as ort

        if device == "cpu":
            return ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return (f"this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                        "(pip install onnxruntime-gpu)")
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return f"no onnxruntime execution provider for device {device!r}"

    def supports(self, component: str, dtype: str, device: str) -> str | None:
        p = self.providers(device)
        if isinstance(p, str):
            return p
        if dtype == "bf16":  # measured: the graphs do not even load
            return ("ONNX's Conv takes no bfloat16 (opset 18 type constraint), so onnxruntime rejects the "
                    "bf16 UNet and VAE graphs, and its CPU provider has no bf16 Add for the text encoder")
        return None

    def build(self, request: BuildRequest) -> Built:
        providers = self.providers(str(request.device.type))
        if isinstance(providers, str):
            raise CandidateError(providers)
        threads = max(1, torch.get_num_threads())
        specs = _LazySpecs(request)  # the reference is copied and cast only if something must be exported
        graphs = []
        for graph_name in GRAPHS[request.component]:
            key = cache_key(request.weights_hash, graph_name, request.dtype)
            folder = cached_export(request.cache_dir, key, graph_name, specs, self.say)
            try:
                graph = _Graph(folder, providers, threads)
            except Exception as e:  # a corrupt or truncated entry: export once more
                self.say(f"onnxruntime: cached {folder.name} does not load ({' '.join(str(e).split())[:120]}); "
                         "exporting again")
                folder = cached_export(request.cache_dir, key, graph_name, specs, self.say, fresh=True)
                graph = _Graph(folder, providers, threads)
            graphs.append(graph)
        device, dt = request.device, request.dtype
        module = {"text_encoder": lambda: OnnxTextEncoder(graphs[0], device),
                  "unet": lambda: OnnxUNet(graphs[0], device, dt),
                  "vae": lambda: OnnxVAE(graphs[0], graphs[1], device, dt)}[request.component]()
        import onnxruntime as ort

        return Built(module, "plain", tap=LazyTap(graphs),
                     notes=f"torch.onnx.export(dynamo=True, opset {OPSET}), onnxruntime {ort.__version__} "
                           f"{providers[0]}")


class _LazySpecs:
    """graph name -> its export spec, over one copy of the reference cast to the run's dtype (made on
    first use: a cached export needs neither)."""

    def __init__(self, request: BuildRequest):
        self.request, self._specs = request, None

    def __call__(self, graph_name: str):
        if self._specs is None:
            import copy

            r = self.request
            reference = copy.deepcopy(r.reference).to(dtype=r.dtype).eval()
            self._specs = {spec[0]: spec for spec in _graph_specs(r.component, reference, r.dtype)}
        return self._specs[graph_name]


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def candidate() -> OnnxRuntimeCandidate:
    return OnnxRuntimeCandidate()
