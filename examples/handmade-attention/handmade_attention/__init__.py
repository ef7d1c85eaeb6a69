"""diffusers' UNet with hand-written attention: an sd-parity candidate shipped as its own package.

    candidate()        # handmade-attention: the processor below, exact
    buggy_candidate()  # handmade-attention-buggy: the same with the softmax scale off by 2 %

The candidate protocol (sd-parity's parity/candidates/base.py): a name, the components it
provides, and `build(request)` returning the network for one dtype and device. The network keeps
diffusers' call signature and module names (interface "diffusers", same_names), so sd-parity runs
it inside diffusers' pipelines and `sdparity localize` pairs every layer.
"""
from __future__ import annotations

import copy
import math

from parity.candidates import BuildRequest, Built, CandidateBase


class HandmadeAttnProcessor:
    """Attention as the paper writes it (Vaswani et al. 2017, eq. 1): softmax(Q K^T / sqrt(d)) V,
    by explicit matmuls; the softmax in float32 (then back to the input dtype). Covers what SD's
    UNet uses: self- and cross-attention, no mask, no norms inside the attention."""

    def __init__(self, scale_error: float = 1.0):
        self.scale_error = scale_error

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None:
            raise NotImplementedError("handmade attention: masks, spatial and group norms are not implemented")
        residual = hidden_states
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        d = q.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))  # (b, heads, tokens, d)
        scores = (q @ k.transpose(-1, -2)).float() * (self.scale_error / math.sqrt(d))
        out = scores.softmax(dim=-1).to(v.dtype) @ v
        out = out.transpose(1, 2).reshape(b, n, attn.heads * d)  # (b, tokens, inner)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class HandmadeAttentionUNet(CandidateBase):
    components = ("unet",)
    profile = "exact"

    def __init__(self, name: str = "handmade-attention", scale_error: float = 1.0):
        self.name, self.scale_error = name, scale_error

    def build(self, request: BuildRequest) -> Built:
        unet = copy.deepcopy(request.reference).to(device=request.device, dtype=request.dtype).eval()
        unet.set_attn_processor(HandmadeAttnProcessor(self.scale_error))
        note = "diffusers' UNet, attention by explicit matmuls (softmax in float32)"
        if self.scale_error != 1.0:
            note += f", softmax scale x {self.scale_error:g} (the deliberate bug)"
        return Built(unet, "diffusers", same_names=True, notes=note)


def candidate() -> HandmadeAttentionUNet:
    return HandmadeAttentionUNet()


def buggy_candidate() -> HandmadeAttentionUNet:
    return HandmadeAttentionUNet("handmade-attention-buggy", scale_error=1.02)
