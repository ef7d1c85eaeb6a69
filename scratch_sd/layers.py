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
