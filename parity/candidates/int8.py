"""The `int8` candidate: a lossy one. Dynamic int8 quantisation of every nn.Linear of diffusers' /
transformers' own networks, judged by the `int8` profile of tolerances.toml, not by the exact bars.

Quantiser: `torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)`:
weights int8 per tensor (affine), activations quantised per call from their observed range, the
matmul in int8 with int32 accumulation (fbgemm / x86 kernels), output back to float32. Why torch.ao
and not torchao: it ships with torch (no further dependency, nothing that could pull a CUDA
build), its dynamic int8 linear runs on the CPU this gate runs on, and it is the quantiser a CPU
deployment of an SD port would reach for; torchao's int8 paths target CUDA and newer APIs.

Convolutions stay float32 (dynamic quantisation covers linear and recurrent layers only): in the
UNet that is every attention projection, the feed-forward and the time embedding; in the text
encoder every layer but the embeddings; in the VAE only its mid-block attention. The quantised
kernels take float32 activations on the CPU: fp16/bf16 and CUDA are skipped rows with that reason.
Module names stay the reference's, so `localize` pairs every layer.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from parity.candidates.base import BuildRequest, Built, CandidateBase
from scratch_sd.names import NETWORKS


class Int8Candidate(CandidateBase):
    name = "int8"
    components = NETWORKS
    profile = "int8"

    def unavailable(self) -> str | None:
        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in ("x86", "fbgemm", "qnnpack", "onednn")):
            return f"this torch build has no quantized CPU engine (supported: {', '.join(engines)})"
        return None

    def supports(self, component: str, dtype: str, device: str) -> str | None:
        if device != "cpu":
            return "torch.ao dynamic int8 linears run on the CPU only"
        if dtype != "fp32":
            return f"torch.ao dynamic int8 linears take float32 activations (no {dtype} kernel)"
        return None

    def build(self, request: BuildRequest) -> Built:
        module = copy.deepcopy(request.reference).float().eval()
        with warnings.catch_warnings():  # torch 2.13: quantized tensors are deprecated (README, "what is not")
            warnings.simplefilter("ignore", UserWarning)
            quantised = torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)
        n = sum(1 for m in quantised.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear))
        if n == 0:
            note = "no nn.Linear to quantise: the network runs in float32"
        else:
            note = f"torch.ao quantize_dynamic qint8: {n} linear layers int8, convolutions float32"
        return Built(quantised, "diffusers", same_names=True, notes=note)


def candidate() -> Int8Candidate:
    return Int8Candidate()
