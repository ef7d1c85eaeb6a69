"""`sdparity sensitivity` (parity.sensitivity): the bisection against analytical floors on a
synthetic network with a dead layer, the floor on the tiny UNet confirmed by the gate itself
(run_gate with the perturbed candidate), the CSV's shape, bad inputs."""
from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from parity import sensitivity as S
from sdparity.main import main

BAR = 1e-4  # the synthetic gate: rel_l2 of the output over this is detected


class _Net(nn.Module):
    """y = a(x) + 0 * b(x): layer b is dead for the output."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.a(x) + 0 * self.b(x)


def _synthetic():
    torch.manual_seed(0)
    net, x = _Net().double(), torch.randn(4, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        clean = net(x)

    def detects(layer, kind, d):
        h = layer.module.register_forward_hook(S._hook(kind, d))
        try:
            with torch.no_grad():
                y = net(x)
        finally:
            h.remove()
        return float((y - clean).norm() / clean.norm()) > BAR

    layers = [S.Layer("a", "a", "linear", net.a), S.Layer("b", "b", "linear", net.b)]
    return net, x, layers, detects


def test_synthetic_floors_match_analysis_and_dead_layer_is_blind():
    net, x, layers, detects = _synthetic()
    rows = S.sweep(layers, detects, steps=12)
    assert len(rows) == 4  # one row per layer x kind
    with torch.no_grad():
        a = net.a(x)
    # offset: y - clean = d std(a) everywhere, so rel_l2 = d std(a) / rms(a)
    want_offset = BAR * float(a.pow(2).mean().sqrt() / a.std())
    # scale: the first 16 // 8 = 2 channels times (1 + d), so rel_l2 = d ||a[..., :2]|| / ||a||
    want_scale = BAR * float(a.norm() / a[..., :2].norm())
    got = {(r.reference_layer, r.perturbation): r for r in rows}
    tol = 10 ** (7 / 2 ** 12)  # the bisection's resolution after 12 steps over 7 decades
    for key, want in ((("a", "offset"), want_offset), (("a", "scale"), want_scale)):
        r = got[key]
        assert r.d_pass < want <= r.d_star <= want * tol * 1.0001, (key, r, want)
        assert not r.blind_spot
    for kind in S.KINDS:
        r = got[("b", kind)]
        assert r.blind_spot and math.isinf(r.d_star) and r.evaluations == 1


def test_floor_edges():
    assert S.floor(lambda d: True).d_star == S.D_LO  # detected at the bottom of the range
    f = S.floor(lambda d: False)
    assert math.isinf(f.d_star) and f.blind
    f = S.floor(lambda d: d >= 1e-3, steps=20)
    assert f.d_pass < 1e-3 <= f.d_star < 1e-3 * 1.0001 and f.evals == 22


def test_perturbations_are_what_they_say():
    t = torch.randn(2, 16, 3, 3)
    s = S.perturbed(t, "scale", 0.5, 1)
    assert torch.equal(s[:, :2], t[:, :2] * 1.5) and torch.equal(s[:, 2:], t[:, 2:])
    o = S.perturbed(t, "offset", 0.5, 1)
    assert torch.allclose(o - t, torch.full_like(t, 0.5 * float(t.std())))


def _gate_fails(refs, layer: str, kind: str, d: float) -> bool:
    """The gate's own unet direct check (network_check.check_networks inside a GateRun, the rows
    judged by its Recorder) with scratch's `layer` perturbed."""
    from parity import candidates as cands
    from parity import network_check
    from parity.gate import Gated, GateSettings, Recorder
    from parity.run_context import GateRun
    from parity.tolerances import Table

    real = cands.load("scratch")

    class Perturbed(type(real)):
        def build(self, request):
            built = real.build(request)
            dict(built.module.named_modules())[layer].register_forward_hook(S._hook(kind, d))
            return built

    g = Gated("scratch", Perturbed())
    rec = Recorder("t", "tiny", "cpu", Table.load())
    run = GateRun(GateSettings.make(preset="tiny", components="unet"), refs, rec, lambda _m: None)
    run.record = None
    with run.candidate_at(g, "fp32") as built:
        network_check.check_networks(run, g, built, "fp32")
    # the map is the floor of the network's outputs (every candidate has them); scratch's per-layer
    # rows (tensor "layer:...", fp32, first seed) see the perturbed layer itself and are not mapped
    outputs = [r for r in rec.rows if not r.tensor.startswith("layer:")]
    assert len(outputs) == 12  # 2 seeds x 6 timesteps: the default direct check ran
    assert len(rec.rows) > len(outputs)  # and its per-layer rows did too
    return any(r.failed for r in outputs)


@pytest.mark.slow
@pytest.mark.ci
def test_tiny_unet_floor_is_the_gates():
    from parity.references import build_references

    refs = build_references("tiny", None, ("unet",), seed=0)
    st = S.SensitivitySettings("unet", layers="conv_out", kinds=("scale",), steps=4)
    res = S.run_sensitivity(st, refs=refs)
    assert [r.reference_layer for r in res.rows] == ["conv_out"]
    r = res.rows[0]
    assert 0 < r.d_pass < r.d_star < 1  # conv_out is seen at some d inside the range
    assert _gate_fails(refs, r.candidate_layer, "scale", r.d_star)
    assert not _gate_fails(refs, r.candidate_layer, "scale", r.d_pass)


def test_cli_writes_one_row_per_layer_and_kind(tmp_path):
    out = tmp_path / "run"
    rc = main(["sensitivity", "--component", "text_encoder", "--layers", "encoder.layers.0.mlp", "--steps", "2",
               "--out", str(out), "--quiet"])
    assert rc == 0
    rows = list(csv.DictReader((out / "sensitivity.csv").open()))
    layers = {r["reference_layer"] for r in rows}
    assert layers and all("encoder.layers.0.mlp" in x for x in layers)
    assert len(rows) == 2 * len(layers)
    assert {(r["reference_layer"], r["perturbation"]) for r in rows} == {(x, k) for x in layers for k in S.KINDS}
    assert (out / "sensitivity.png").stat().st_size > 0
    assert "Detection floor per layer kind" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args", [
    ["--component", "tokenizer"],
    ["--component", "unet", "--dtype", "fp8"],
    ["--component", "unet", "--kinds", "scale,twist"],
    ["--component", "unet", "--d-min", "1e-2", "--d-max", "1e-3"],
    ["--component", "unet", "--d-min", "0"],
    ["--component", "unet", "--steps", "0"],
    ["--component", "vae", "--candidate", "handmade-attention"],
    ["--component", "unet", "--candidate", "no-such-candidate"],
    ["--component", "unet", "--layers", "no-such-layer"],
])
def test_bad_input_exits_2_with_one_line(args, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sensitivity", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdparity: error:") and "\n" not in err
    assert not out.exists()
