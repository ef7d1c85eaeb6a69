"""Small primitives shared by the three networks.

They live at module level on purpose: one place to read them, and one place a
test can swap (with pytest's monkeypatch) to prove the parity gate notices.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's activation: x * sigmoid(1.702 x) (not the erf GELU)."""
    return x * torch.sigmoid(1.702 * x)


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
