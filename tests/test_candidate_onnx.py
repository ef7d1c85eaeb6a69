"""The onnxruntime candidate (parity/candidates/onnxrt.py): a real torch.onnx export of diffusers' /
transformers' tiny networks, run by a real onnxruntime InferenceSession, compared with the reference
modules; the export cache (keys, atomic entries, a corrupt entry re-exported); the tap that lets
localize name a layer inside the graph; and the gate and localize from the command line.

Exports are shared by every test here (one cache folder per module): the tiny UNet exports in
~20 s on this machine, the VAE's two graphs in ~15 s, the text encoder in ~5 s."""
from __future__ import annotations

import csv

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from parity.candidates import BuildRequest  # noqa: E402
from parity.candidates import onnxrt  # noqa: E402
from parity.metrics import compare  # noqa: E402
from sdparity.main import main  # noqa: E402

QUICK = ["--steps", "2", "--num-seeds", "1", "--modes", "txt2img", "--no-plots", "--quiet"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(autouse=True)
def _cache_env(cache, monkeypatch):
    monkeypatch.setenv("SDPARITY_CACHE", str(cache))


class Messages(list):
    def __call__(self, text):
        self.append(text)


def build(refs, component, cache, dtype=torch.float32, say=None):
    cand = onnxrt.OnnxRuntimeCandidate(say=say if say is not None else Messages())
    request = BuildRequest(component, refs.networks[component], refs.cfg, dtype, torch.device("cpu"), cache,
                           hasher=lambda: refs.weights_hash(component))
    return cand.build(request)


def _inputs(cfg, batch=2, side=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = side or cfg.latent_size
    x = torch.randn(batch, cfg.unet.in_channels, side, side, generator=g)
    ctx = torch.randn(batch, cfg.text.max_positions, cfg.unet.cross_attention_dim, generator=g)
    return x, ctx


# --------------------------------------------------------------------------- the runtime's numbers
@pytest.mark.slow
@pytest.mark.ci
@torch.no_grad()
def test_unet_matches_diffusers_at_every_timestep_form_and_size(tiny_refs, cache):
    built = build(tiny_refs, "unet", cache)
    assert built.interface == "plain" and "opset 18" in built.notes and "CPUExecutionProvider" in built.notes
    ref = tiny_refs.networks["unet"]
    for batch, side, t in [(2, None, 741), (1, 16, torch.tensor(3.0)), (2, 24, torch.tensor([999.0, 1.0]))]:
        x, ctx = _inputs(tiny_refs.cfg, batch, side)
        out = built.module(x, t, ctx)
        e = compare(ref(x, t, encoder_hidden_states=ctx).sample, out)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert e.finite and e.rel_l2 < 1e-5, (batch, side, t, e)


@torch.no_grad()
def test_text_encoder_and_vae_match_transformers_and_diffusers(tiny_refs, cache):
    cfg = tiny_refs.cfg
    ids = torch.randint(0, cfg.text.vocab_size, (3, cfg.text.max_positions), generator=torch.Generator().manual_seed(1))
    te = build(tiny_refs, "text_encoder", cache).module
    e = compare(tiny_refs.networks["text_encoder"](ids)[0], te(ids))
    assert e.rel_l2 < 1e-5, e

    vae = build(tiny_refs, "vae", cache).module
    ref = tiny_refs.networks["vae"]
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    moments = vae.encode(x)  # the graph returns the moments; the harness wraps them in diffusers' posterior
    e = compare(ref.encode(x).latent_dist.parameters, moments)
    assert e.rel_l2 < 1e-5, e
    z = torch.randn(2, cfg.vae.latent_channels, cfg.latent_size, cfg.latent_size)
    e = compare(ref.decode(z).sample, vae.decode(z))
    assert e.rel_l2 < 1e-5, e


# --------------------------------------------------------------------------- the cache
def test_exports_are_cached_under_a_key_of_weights_dtype_and_versions(tiny_refs, cache):
    said = Messages()
    build(tiny_refs, "unet", cache, say=said)  # exported by the first test (or now)
    said.clear()
    build(tiny_refs, "unet", cache, say=said)
    assert not [m for m in said if "exporting" in m], said  # the second build loads the cached graph
    h = tiny_refs.weights_hash("unet")
    key = onnxrt.cache_key(h, "unet", torch.float32)
    entry = cache / "onnx" / f"unet-{key}"
    assert (entry / "model.onnx").is_file() and (entry / "export.json").is_file()
    assert key != onnxrt.cache_key(h, "unet", torch.float16)
    assert key != onnxrt.cache_key("0" * 64, "unet", torch.float32)
    assert key != onnxrt.cache_key(h, "vae_decode", torch.float32)
    assert not [p for p in (cache / "onnx").iterdir() if p.name.startswith(".")], "a temporary folder was left"


def test_a_corrupt_cache_entry_is_exported_again(tiny_refs, tmp_path):
    cache = tmp_path / "c"
    build(tiny_refs, "text_encoder", cache)
    (entry,) = (cache / "onnx").iterdir()
    model = entry / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 3])  # a truncated file
    said = Messages()
    built = build(tiny_refs, "text_encoder", cache, say=said)
    assert any("does not load" in m for m in said) and any("exporting" in m for m in said), said
    ids = torch.zeros(1, tiny_refs.cfg.text.max_positions, dtype=torch.int64)
    e = compare(tiny_refs.networks["text_encoder"](ids)[0], built.module(ids))
    assert e.rel_l2 < 1e-5


# --------------------------------------------------------------------------- what it supports, and says
def test_bf16_and_a_missing_cuda_provider_are_skipped_with_the_reason():
    import onnxruntime as ort

    cand = onnxrt.candidate()
    assert cand.supports("unet", "fp32", "cpu") is None and cand.supports("unet", "fp16", "cpu") is None
    assert "bfloat16" in cand.supports("unet", "bf16", "cpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "no CUDAExecutionProvider" in cand.supports("unet", "fp16", "cuda")


def test_unavailable_names_the_missing_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert "onnxruntime is not installed" in onnxrt.candidate().unavailable()


# --------------------------------------------------------------------------- the gate and localize
def test_gate_passes_fp32_and_fp16_and_skips_bf16(tmp_path):
    out, half = tmp_path / "c", tmp_path / "h"
    assert main(["check", "--candidates", "onnxruntime", "--components", "text_encoder,vae,unet,pipeline",
                 "--dtypes", "fp32,bf16", "--out", str(out)] + QUICK) == 0
    # fp16 graphs are exported apart (~5 s for the text encoder, ~20 s for the UNet): one network here
    assert main(["check", "--candidates", "onnxruntime", "--components", "text_encoder", "--dtypes", "fp16",
                 "--out", str(half)] + QUICK) == 0
    rows = list(csv.DictReader(open(out / "parity.csv"))) + list(csv.DictReader(open(half / "parity.csv")))
    compared = [r for r in rows if r["status"] == "compared"]
    assert {r["candidate"] for r in rows} == {"onnxruntime"}
    assert {(r["component"], r["dtype"]) for r in compared} >= {("text_encoder", "fp32"), ("vae", "fp32"),
                                                                ("unet", "fp32"), ("text_encoder", "fp16")}
    assert all(r["passed"] == "True" for r in compared)
    fp32 = [r for r in compared if r["dtype"] == "fp32"]
    assert max(float(r["rel_l2"]) for r in fp32) < 1e-5  # fp32 graphs: float32 rounding only
    bf16 = [r for r in rows if r["dtype"] == "bf16"]
    assert bf16 and all(r["status"] == "skipped" and "bfloat16" in r["reason"] for r in bf16)


def _tamper(cache, graph: str, initializer: str, factor: float):
    """Scale one weight inside the cached export (an exporter bug the gate must catch)."""
    import onnx
    from onnx import numpy_helper

    (entry,) = [p for p in (cache / "onnx").iterdir() if p.name.startswith(graph + "-")]
    model = onnx.load(str(entry / "model.onnx"))
    (init,) = [i for i in model.graph.initializer if i.name == initializer]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, initializer))
    onnx.save(model, str(entry / "model.onnx"))
    (entry / "tapped.onnx").unlink(missing_ok=True)


def test_a_bad_graph_fails_the_gate_and_localize_names_its_layer(tiny_refs, cache, tmp_path, monkeypatch, capsys):
    import shutil

    bad_cache = tmp_path / "bad-cache"
    monkeypatch.setenv("SDPARITY_CACHE", str(bad_cache))
    build(tiny_refs, "unet", cache)  # the shared cache's export (made by an earlier test, or now)
    key = onnxrt.cache_key(tiny_refs.weights_hash("unet"), "unet", torch.float32)
    shutil.copytree(cache / "onnx" / f"unet-{key}", bad_cache / "onnx" / f"unet-{key}")  # fp32 only here
    cache = bad_cache
    _tamper(cache, "unet", "net.down_blocks.1.resnets.0.conv1.weight", 1.01)

    out = tmp_path / "c"
    assert main(["check", "--candidates", "onnxruntime", "--components", "unet", "--out", str(out)] + QUICK) == 1
    err = capsys.readouterr().err
    assert "FAIL onnxruntime unet fp32" in err and "--candidate onnxruntime" in err

    loc = tmp_path / "l"
    assert main(["localize", "--component", "unet", "--candidate", "onnxruntime", "--out", str(loc)]) == 1
    printed = capsys.readouterr().out
    layers = list(csv.DictReader(open(loc / "localize.csv")))
    first = next(r for r in layers if r["over"] == "True")
    assert first["reference"] == "down_blocks.1.resnets.0.conv1", first
    before = layers[:layers.index(first)]
    assert len(before) > 20 and all(r["over"] == "False" for r in before)  # the graph's earlier layers were seen
    assert "first layer over" in printed and "down_blocks.1.resnets.0.conv1" in printed


def test_localize_sees_inside_every_graph(tmp_path, capsys):
    for component, at_least in (("text_encoder", 10), ("vae", 60), ("unet", 150)):
        loc = tmp_path / component
        assert main(["localize", "--component", component, "--candidate", "onnxruntime", "--out", str(loc)]) == 0
        layers = list(csv.DictReader(open(loc / "localize.csv")))
        assert len(layers) >= at_least and not [r for r in layers if r["over"] == "True"], component
        assert "paired layers seen" in capsys.readouterr().out


# --------------------------------------------------------------------------- sd15 size (slow)
@pytest.mark.slow
def test_sd15_gate_passes_fp32(tmp_path):
    """Full SD 1.5 size (seeded weights): the UNet export is 3.3 GB, its weights in model.onnx.data
    beside the graph. Measured 2026-12-03: exports and gate together 4.5 min on 2 cores, 35/35 pass."""
    out = tmp_path / "c"
    assert main(["check", "--preset", "sd15", "--candidates", "onnxruntime", "--components", "text_encoder,vae,unet",
                 "--dtypes", "fp32", "--modes", "txt2img", "--num-seeds", "1", "--no-plots", "--quiet",
                 "--out", str(out)]) == 0
    rows = [r for r in csv.DictReader(open(out / "parity.csv")) if r["status"] == "compared"]
    assert {r["component"] for r in rows} == {"text_encoder", "vae", "unet"}  # (all_swapped comes with pipeline)
    assert all(r["passed"] == "True" for r in rows)
