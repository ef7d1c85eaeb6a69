"""Small primitives shared by the three networks.

They live at module level on purpose: one place to read them, and one place a
test can swap (with pytest's monkeypatch) to prove the parity gate notices. Fast paths are
switched off only through `inference_options(...)`, a context manager, never a module global.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor


# --------------------------------------------------------------------------- inference fast paths
# When autograd records nothing (torch.no_grad / inference_mode), a network may overwrite the
# fresh intermediates it made itself: the same arithmetic in the same order, so the same bits,
# but fewer allocations and less memory traffic. Under autograd every op stays out of place.
@dataclass(frozen=True)
class InferenceOptions:
    inplace: bool = True  # overwrite fresh intermediates in inference (same bits, less memory)
    onednn_linear: bool = True  # fast mode's fp32 CPU linears through oneDNN (other roundings)


_OPTIONS: ContextVar[InferenceOptions] = ContextVar("scratch_sd_inference_options", default=InferenceOptions())


@contextmanager
def inference_options(**changes) -> Iterator[InferenceOptions]:
    """Run the networks with some fast paths off inside the block (benchmarks/ablation.py measures
    what each one buys): `with inference_options(inplace=False): net(x)`. Scoped to this context
    (thread / task); a torch.compile trace always takes the defaults (inductor plans its own buffers)."""
    token = _OPTIONS.set(replace(_OPTIONS.get(), **changes))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


def inference() -> bool:
    return not torch.is_grad_enabled()


def inplace() -> bool:
    # is_compiling() first: dynamo cannot trace ContextVar.get, and short-circuits past it.
    return inference() and (torch.compiler.is_compiling() or _OPTIONS.get().inplace)


def silu(x: Tensor) -> Tensor:
    """SiLU of a fresh intermediate (in place in inference)."""
    return F.silu(x, inplace=inplace())


def add(h: Tensor, x: Tensor, h_first: bool = True) -> Tensor:
    """h + x (x + h with h_first=False: the order the reference writes it), where `h` is a fresh
    intermediate, never a caller's input. Written into h in inference when that is the same tensor:
    h of one unambiguous layout, and x of h's strides or broadcast over it. Otherwise out
    of place, in the reference's operand order: with two layouts (or a (B, C, 1, 1) tensor, which is
    both) the operands decide the result's strides, and those decide which kernels (so which
    roundings) the next convolution uses."""
    if inplace() and _one_layout(h) and (x.shape != h.shape or x.stride() == h.stride()):
        return h.add_(x)
    return h + x if h_first else x + h


def take(x: Tensor | list[Tensor]) -> tuple[Tensor, bool]:
    """A block's input and whether the block owns it. A caller that will not use its input again
    hands it over in a one-element list (`x = [block(x)]` with x a list): the block pops the
    caller's only reference, so it may free the input as soon as it is done with it, or overwrite
    it in inference, instead of holding it until it returns (Module.__call__ keeps its arguments
    alive until then). A plain tensor stays the caller's: never overwritten."""
    if isinstance(x, list):
        return x.pop(), True
    return x, False


def _one_layout(h: Tensor) -> bool:
    if h.dim() != 4:
        return h.is_contiguous()
    return h.is_contiguous() != h.is_contiguous(memory_format=torch.channels_last)


def gelu_mul(hidden: Tensor, gate: Tensor) -> Tensor:
    """hidden * gelu(gate) (erf GELU; GEGLU's product), multiplied into gelu's fresh output in
    inference. `hidden` and `gate` are strided halves of one projection; the product stays a
    contiguous tensor because a matmul over a strided input takes another GEMM path (other bits)."""
    if inplace():
        return F.gelu(gate).mul_(hidden)
    return hidden * F.gelu(gate)


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's activation: x * sigmoid(1.702 x) (not the erf GELU); in place in inference."""
    if inplace():
        return x.mul_(torch.sigmoid(1.702 * x))
    return x * torch.sigmoid(1.702 * x)


# --------------------------------------------------------------------------- memory format
def nchw_of_tokens(y: Tensor, b: int, h: int, w: int, channels_last: bool) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W), contiguous in the network's memory format (a free view when channels_last)."""
    y = y.reshape(b, h, w, y.shape[-1]).permute(0, 3, 1, 2)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class ExactOrFast:
    """Mixin for the scratch networks (UNet, VAE, text encoder): two modes over the same weights.

    fast (the default): every 4-d weight is stored NHWC (channels_last) and forward converts its
      input once; every op after that keeps the format (convolutions, GroupNorm, SiLU, interpolate,
      cat), so oneDNN runs its NHWC kernels with no reorders between layers, and the
      (B, C, H, W) <-> (B, H*W, C) reshapes around attention are free views. The UNet's GEGLU
      feed-forward runs over row chunks in inference; `Linear` layers use oneDNN on the CPU.
      Different kernels round differently: the output moves at the 1e-6 level in fp32 (within the
      gate's fp32 bar).
    exact (`set_exact(True)`): NCHW and whole-tensor ops, the kernels diffusers calls in the same
      order: bit-identical to diffusers / transformers.
    Either way the output is an ordinary contiguous tensor; submodules that behave differently
    per mode read their own `exact` flag, set here."""

    exact = False

    def set_exact(self, exact: bool = True):
        self.to(memory_format=torch.contiguous_format if exact else torch.channels_last)
        for m in self.modules():
            if hasattr(m, "exact"):
                m.exact = exact
        return self

    def state_dict(self, *args, **kwargs):
        """The weights as files hold them: every tensor contiguous (NCHW), whatever the mode
        (safetensors refuses strided tensors, and checkpoints must not depend on the mode)."""
        state = super().state_dict(*args, **kwargs)
        for k, v in state.items():
            if torch.is_tensor(v) and not v.is_contiguous():
                state[k] = v.contiguous()
        return state

    def _enter(self, x: Tensor) -> Tensor:
        return x if self.exact else x.contiguous(memory_format=torch.channels_last)

    def _leave(self, y: Tensor) -> Tensor:
        return y if self.exact else y.contiguous()


_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys). In fast mode, in fp32 inference on the CPU
    it runs oneDNN's matmul (`torch.ops.mkldnn._linear_pointwise`, the op inductor's CPU freezing
    emits) instead of the BLAS sgemm F.linear calls for fp32, which is slower at the text encoder's
    small row counts here (measured: benchmarks/ablation.py). It sums in another order (other fp32
    roundings), hence fast mode only. bf16 already goes to oneDNN through F.linear, and oneDNN has
    no fp16 matmul on CPUs without fp16 arithmetic. Exact mode, autograd, other devices and dtypes:
    F.linear. So is a trace by torch.compile (scratch_sd.accel): inductor's lowering of this op
    wants a frozen constant weight (it asserts otherwise), and it picks its own kernel anyway."""

    exact = False  # set by set_exact of the network that holds it

    def forward(self, x: Tensor) -> Tensor:
        if (self.exact or _onednn_linear is None or x.device.type != "cpu" or x.dtype != torch.float32
                or not inference() or torch.compiler.is_compiling() or not _OPTIONS.get().onednn_linear):
            return F.linear(x, self.weight, self.bias)
        return _onednn_linear(x, self.weight, self.bias, "none", [], "")


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and keys) that stays accurate on channels_last fp32 input.

    PyTorch's CPU GroupNorm kernel for channels_last tensors loses digits in fp32 when a group's
    mean is large against its spread (measured: rel. error 5.6e-5 at 128x512x512, mean/std = 6,
    against 2.2e-7 for NCHW), and the parity gate caught it (sd15 VAE encode, rel_l2 1.06e-5 >
    1e-5). For that case the statistics come from torch.var_mean (Welford, accurate) over a view
    of the NHWC memory, and the output is one fused scale-and-shift. bf16/fp16 keep the native
    kernel: it accumulates in fp32, far below their own rounding.

    Exact mode keeps the native kernel for every input, channels_last included: diffusers' img2img
    hands the UNet channels_last latents (its add_noise broadcasts a (B, 1, 1, 1) factor, which
    counts as both layouts), so diffusers' own GroupNorms then take that kernel, and bit-identity
    means taking it too (the accurate path differed by 5e-7 there).

    `overwrite=True` says x is a fresh intermediate its caller no longer needs: in inference the
    accurate path then writes the result into x (the same fused op, so the same bits), which saves
    one activation-sized buffer at a resnet's second norm. The native path ignores it."""

    exact = False  # set by set_exact of the network that holds it

    def forward(self, x: Tensor, overwrite: bool = False) -> Tensor:
        if self.exact or x.dtype != torch.float32 or x.dim() != 4 or x.is_contiguous() \
                or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        b, c, h, w = x.shape
        g = self.num_groups
        var, mean = torch.var_mean(x.permute(0, 2, 3, 1).reshape(b, h * w, g, c // g), dim=(1, 3), correction=0)
        scale = (var + self.eps).rsqrt()[:, :, None]  # (B, G, 1)
        if self.affine:
            scale = scale * self.weight.view(g, c // g)  # (B, G, C/G)
        shift = -mean[:, :, None] * scale
        if self.affine:
            shift = shift + self.bias.view(g, c // g)
        out = x if overwrite and inplace() and not torch.compiler.is_compiling() else None
        return torch.addcmul(shift.reshape(b, c, 1, 1), x, scale.reshape(b, c, 1, 1), out=out)


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, t, c = x.shape
    return x.view(b, t, heads, c // heads).transpose(1, 2)  # (B, heads, T, head_dim)


def merge_heads(x: Tensor) -> Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # (B, T, C)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, causal: bool = False,
              mask: Tensor | None = None) -> Tensor:
    """Multi-head scaled dot-product attention on (B, T, C) tensors, scale 1/sqrt(head_dim)."""
    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    return merge_heads(out)


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
    """Gaussian noise drawn as diffusers' `randn_tensor`: with a CPU generator the draw happens on the CPU
    and is then moved, so CPU and GPU runs see the same numbers; a list of generators draws one row each."""
    if isinstance(device, str):
        device = torch.device(device)
    rand_device = device
    batch_size = shape[0]
    layout = layout or torch.strided
    device = device or torch.device("cpu")
    if generator is not None:
        gen_device_type = generator.device.type if not isinstance(generator, list) else generator[0].device.type
        if gen_device_type != device.type and gen_device_type == "cpu":
            rand_device = "cpu"
        elif gen_device_type != device.type and gen_device_type == "cuda":
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_device_type}.")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        shape = (1,) + tuple(shape[1:])
        rows = [torch.randn(shape, generator=generator[i], device=rand_device, dtype=dtype, layout=layout)
                for i in range(batch_size)]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype, layout=layout).to(device)
