"""Broken candidates for tests/test_candidates.py, loaded by import path (`candidate_fixtures:NAME`)
exactly as a user's `--candidates my_pkg.mod:factory` is. Each is wrong in one way."""
from __future__ import annotations

import copy

import torch

from parity.candidates import Built, CandidateBase


class _UNet(CandidateBase):
    components = ("unet",)

    def __init__(self, name, wrap):
        self.name, self.wrap = name, wrap

    def build(self, request):
        unet = copy.deepcopy(request.reference).to(request.device, request.dtype).eval()
        return Built(self.wrap(unet), "plain")


def _plain(unet):
    return lambda x, t, ctx: unet(x, t, encoder_hidden_states=ctx).sample


def correct_plain_unet():
    """diffusers' own UNet behind the plain interface: passes (a control for the broken ones)."""
    return _UNet("plain-unet", _plain)


def wrong_shape():
    return _UNet("wrong-shape", lambda unet: lambda x, t, ctx: _plain(unet)(x, t, ctx)[:, :, :-1])


def wrong_dtype():
    return _UNet("wrong-dtype", lambda unet: lambda x, t, ctx: _plain(unet)(x, t, ctx).double())


def nan_output():
    return _UNet("nan-output", lambda unet: lambda x, t, ctx: _plain(unet)(x, t, ctx) * float("nan"))


def raises_when_called():
    def wrap(unet):
        def call(x, t, ctx):
            raise RuntimeError("my kernel is not ready")
        return call
    return _UNet("raises-when-called", wrap)


class _BuildRaises(CandidateBase):
    name = "build-raises"
    components = ("unet",)

    def build(self, request):
        raise KeyError("unet.weight")


def build_raises():
    return _BuildRaises()


def factory_raises():
    raise RuntimeError("license server unreachable")


def not_a_candidate():
    return object()


class _BadComponents(CandidateBase):
    name = "bad-components"
    components = ("unet", "safety_checker")

    def build(self, request):
        raise AssertionError("never built: its components are checked first")


def bad_components():
    return _BadComponents()


class _UnknownProfile(CandidateBase):
    name = "unknown-profile"
    components = ("unet",)
    profile = "fp4"

    def build(self, request):
        return copy.deepcopy(request.reference)


def unknown_profile():
    return _UnknownProfile()


class _NeedsMissingLibrary(CandidateBase):
    name = "needs-tensorrt"
    components = ("unet",)

    def unavailable(self):
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed (pip install tensorrt)"
        return None

    def build(self, request):  # never reached without tensorrt
        raise AssertionError("built without its library")


def needs_missing_library():
    return _NeedsMissingLibrary()


class _Int8DropsBias(CandidateBase):
    """A quantised UNet whose int8 linears lose their bias (a real porting slip in int8 kernels)."""

    name = "int8-drops-bias"
    components = ("unet",)
    profile = "int8"

    def build(self, request):
        from parity.candidates.int8 import Int8Candidate

        built = Int8Candidate().build(request)
        for m in built.module.modules():
            if isinstance(m, torch.ao.nn.quantized.dynamic.Linear) and m.bias() is not None:
                m.set_weight_bias(m.weight(), torch.zeros_like(m.bias()))
        return built


def int8_drops_bias():
    return _Int8DropsBias()


# --------------------------------------------------------------------------- text encoders (clip_skip)
class _TextEncoder(CandidateBase):
    components = ("text_encoder",)

    def __init__(self, name, wrap):
        self.name, self.wrap = name, wrap

    def build(self, request):
        from parity.candidates.scratch import network_from_reference

        te = network_from_reference("text_encoder", request.reference, request.cfg).to(request.device, request.dtype)
        return Built(self.wrap(te.eval()), "plain")


class _HiddenStatesOffByOne(torch.nn.Module):
    """Our text encoder, except that its hidden states leave out the embeddings (each index then
    names the next layer): right without clip_skip, wrong with it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.norm = inner, inner.norm

    def forward(self, input_ids, output_hidden_states=False):
        if not output_hidden_states:
            return self.inner(input_ids)
        last, hidden = self.inner(input_ids, output_hidden_states=True)
        return last, hidden[1:] + hidden[-1:]


def hidden_states_off_by_one():
    return _TextEncoder("hidden-states-off-by-one", _HiddenStatesOffByOne)


def last_layer_only_text_encoder():
    """A plain function ids -> last hidden state: gated without clip_skip, skipped with it."""
    return _TextEncoder("last-layer-only", lambda te: lambda ids: te(ids))
