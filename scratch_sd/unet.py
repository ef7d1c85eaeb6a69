"""The SD 1.x denoising UNet, from scratch (pure torch).

Configured entirely by `UNetConfig`. Numerically it follows diffusers'
`UNet2DConditionModel` with its default SDPA attention processor:

- the timestep embedding is computed in float32 (cos then sin), then cast to the
  sample's dtype; a python float timestep is float64 before that cast, an int is
  int64 (so 745.3 and 745 embed differently);
- resnet GroupNorms use eps `cfg.norm_eps` (1e-5), the GroupNorm in front of each
  transformer `cfg.transformer_norm_eps` (1e-6), the transformer LayerNorms 1e-5;
- attention is plain SDPA with scale 1/sqrt(head_dim) in the model's dtype
  (`upcast_attention` is ignored, as the SDPA processor ignores it);
- upsampling is nearest x2 in the model's dtype (diffusers upcasts bf16 only for
  torch < 2.1), to the skip's size when the latent is not a multiple of 2^levels.

Module names are our own scheme (`down.0.res.1.norm1`, fused `qkv` / `kv`);
`scratch_sd.convert.unet` maps them to diffusers' and the original LDM names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratch_sd import layers
from scratch_sd.config import UNetConfig

Tensor = torch.Tensor

LAYER_NORM_EPS = 1e-5  # the transformer blocks' LayerNorms (diffusers' Transformer2DModel default)
FF_MULT = 4  # feed-forward inner width = 4 * dim


# --------------------------------------------------------------------------- timestep
def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of 1-d timesteps, in float32 (DDPM; diffusers' get_timestep_embedding).

    freqs_i = exp(-log(10000) * i / (half - freq_shift)); output [cos, sin] when flip_sin_to_cos.
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]  # (B, half)
    first, second = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat([first, second], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def timesteps_tensor(t: Tensor | float | int, batch: int, device: torch.device) -> Tensor:
    """A timestep as diffusers' UNet takes it -> a (batch,) tensor.

    A python float becomes float64 and an int int64 (32-bit on mps/npu, which lack
    64-bit types); a 0-d tensor keeps its dtype. The value is cast to float32 only
    inside `timestep_embedding`, exactly as diffusers does.
    """
    if not torch.is_tensor(t):
        dtype = torch.float64 if isinstance(t, float) else torch.int64
        if device.type in ("mps", "npu", "neuron"):
            dtype = {torch.float64: torch.float32, torch.int64: torch.int32}[dtype]
        t = torch.tensor([t], dtype=dtype, device=device)
    elif t.ndim == 0:
        t = t[None]
    return t.to(device).expand(batch)


# --------------------------------------------------------------------------- blocks
class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, + time projection, GroupNorm, SiLU, conv; 1x1 shortcut if channels change."""

    def __init__(self, cin: int, cout: int, time_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = layers.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_proj = layers.Linear(time_dim, cout)
        self.norm2 = layers.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """`emb` is the time embedding after SiLU (shared by every block)."""
        h = self.conv1(layers.silu(self.norm1(x)))
        h = layers.add(h, self.time_proj(emb)[:, :, None, None])
        h = self.conv2(layers.silu(self.norm2(h, overwrite=True)))
        return layers.add(h, x if self.skip is None else self.skip(x), h_first=False)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = layers.Linear(dim, 3 * dim, bias=False)
        self.out = layers.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(layers.attention(q, k, v, self.heads))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = layers.Linear(dim, dim, bias=False)
        self.kv = layers.Linear(context_dim, 2 * dim, bias=False)
        self.out = layers.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        k, v = self.kv(context).chunk(2, dim=-1)
        return self.out(layers.attention(self.q(x), k, v, self.heads))


class GEGLU(nn.Module):
    """proj to 2 * inner, split into (hidden, gate), hidden * gelu(gate) (erf GELU), project back.

    In inference the tokens go through `chunk_rows` at a time: the (tokens, 2 * inner) intermediate
    is the UNet's largest tensor (84 MB fp32 at 64x64 latents, CFG batch 2), and rows are independent
    (a GEMM's row is the same dot product whatever the number of rows, though a BLAS may pick
    another kernel, so other bits, for another row count: hence fast mode only)."""

    chunk_rows = 2048
    exact = False  # set by UNet.set_exact: True runs the whole tensor at once, as diffusers

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = layers.Linear(dim, 2 * inner)
        self.out = layers.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[:-1].numel()
        if self.exact or not layers.inplace() or n <= self.chunk_rows:
            hidden, gate = self.proj(x).chunk(2, dim=-1)
            return self.out(layers.gelu_mul(hidden, gate))
        rows = x.reshape(n, x.shape[-1])
        out = rows.new_empty(n, self.out.out_features)
        for s in range(0, n, self.chunk_rows):
            hidden, gate = self.proj(rows[s:s + self.chunk_rows]).chunk(2, dim=-1)
            out[s:s + self.chunk_rows] = self.out(layers.gelu_mul(hidden, gate))
        return out.view(*x.shape[:-1], -1)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn1 = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.ff = GEGLU(dim, FF_MULT * dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = layers.add(self.attn1(self.norm1(x)), x)
        x = layers.add(self.attn2(self.norm2(x), context), x)
        return layers.add(self.ff(self.norm3(x)), x)


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear after flattening), transformer blocks, proj_out, + input."""

    exact = False  # set by UNet.set_exact: False = channels_last activations

    def __init__(self, dim: int, cfg: UNetConfig, heads: int, depth: int):
        super().__init__()
        self.linear = cfg.use_linear_projection
        proj = (lambda: layers.Linear(dim, dim)) if self.linear else (lambda: nn.Conv2d(dim, dim, 1))
        self.norm = layers.GroupNorm(cfg.norm_groups, dim, eps=cfg.transformer_norm_eps)
        self.proj_in = proj()
        self.blocks = nn.ModuleList(TransformerBlock(dim, cfg.cross_attention_dim, heads) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        # (B, C, H, W) <-> (B, HW, C): a copy for NCHW tensors, a free view for channels_last ones.
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.linear:
            y = self.proj_in(y.permute(0, 2, 3, 1).reshape(b, h * w, c))  # (B, HW, C)
        else:
            y = self.proj_in(y).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        for block in self.blocks:
            y = block(y, context)
        if self.linear:
            y = layers.nchw_of_tokens(self.proj_out(y), b, h, w, not self.exact)
        else:
            y = self.proj_out(layers.nchw_of_tokens(y, b, h, w, not self.exact))
        return layers.add(y, x)


class Upsample(nn.Module):
    """Nearest x2 (or to `size`), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: torch.Size | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


# --------------------------------------------------------------------------- levels
class DownLevel(nn.Module):
    """`layers_per_block` x (ResBlock [+ SpatialTransformer]), then a stride-2 conv unless last.
    Returns the output and the skip tensors it produced (one per resnet, one for the downsample)."""

    def __init__(self, cfg: UNetConfig, level: int, cin: int, time_dim: int):
        super().__init__()
        cout = cfg.block_out_channels[level]
        self.res = nn.ModuleList(
            ResBlock(cin if j == 0 else cout, cout, time_dim, cfg.norm_groups, cfg.norm_eps)
            for j in range(cfg.layers_per_block))
        self.attn = nn.ModuleList(
            SpatialTransformer(cout, cfg, cfg.num_heads[level], cfg.transformer_depth[level])
            for _ in range(cfg.layers_per_block)) if cfg.attention_levels[level] else None
        last = level == len(cfg.block_out_channels) - 1
        self.down = None if last else nn.Conv2d(cout, cout, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, res in enumerate(self.res):
            x = res(x, emb)
            if self.attn is not None:
                x = self.attn[j](x, context)
            skips.append(x)
        if self.down is not None:
            x = self.down(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution."""

    def __init__(self, cfg: UNetConfig, time_dim: int):
        super().__init__()
        c = cfg.block_out_channels[-1]
        self.res = nn.ModuleList(ResBlock(c, c, time_dim, cfg.norm_groups, cfg.norm_eps) for _ in range(2))
        self.attn = nn.ModuleList([SpatialTransformer(c, cfg, cfg.num_heads[-1], cfg.transformer_depth[-1])])

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:
        x = self.res[0](x, emb)
        x = self.attn[0](x, context)
        return self.res[1](x, emb)


class UpLevel(nn.Module):
    """`layers_per_block + 1` x (concat a skip, ResBlock [+ SpatialTransformer]), then upsample unless last."""

    def __init__(self, cfg: UNetConfig, level: int, cin: int, skip_channels: list[int], time_dim: int):
        super().__init__()
        cout = cfg.block_out_channels[level]
        self.res = nn.ModuleList(
            ResBlock((cin if j == 0 else cout) + s, cout, time_dim, cfg.norm_groups, cfg.norm_eps)
            for j, s in enumerate(skip_channels))
        self.attn = nn.ModuleList(
            SpatialTransformer(cout, cfg, cfg.num_heads[level], cfg.transformer_depth[level])
            for _ in skip_channels) if cfg.attention_levels[level] else None
        self.up = Upsample(cout) if level > 0 else None

    def forward(self, x: Tensor, skips: list[Tensor], emb: Tensor, context: Tensor,
                size: torch.Size | None = None) -> Tensor:
        """Consumes skips from the end of `skips` (in place)."""
        for j, res in enumerate(self.res):
            x = res(torch.cat([x, skips.pop()], dim=1), emb)
            if self.attn is not None:
                x = self.attn[j](x, context)
        if self.up is not None:
            x = self.up(x, size)
        return x


# --------------------------------------------------------------------------- model
class UNet(layers.ExactOrFast, nn.Module):
    def __init__(self, cfg: UNetConfig, exact: bool = False):
        """exact=False (default): the fast mode; True: bit-identical to diffusers (layers.ExactOrFast)."""
        super().__init__()
        self.cfg = cfg
        widths, n = cfg.block_out_channels, len(cfg.block_out_channels)
        time_dim = cfg.time_embed_dim
        self.time_mlp = nn.Sequential(layers.Linear(widths[0], time_dim), nn.SiLU(), layers.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)

        skips = [widths[0]]  # channels of every skip tensor, in the order the down path makes them
        self.down = nn.ModuleList()
        for level in range(n):
            self.down.append(DownLevel(cfg, level, widths[max(level - 1, 0)], time_dim))
            skips += [widths[level]] * (cfg.layers_per_block + (level < n - 1))
        self.mid = MidBlock(cfg, time_dim) if cfg.mid_attention else None
        self.up = nn.ModuleList()
        for level in reversed(range(n)):
            taken = [skips.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up.append(UpLevel(cfg, level, widths[min(level + 1, n - 1)], taken, time_dim))

        self.norm_out = layers.GroupNorm(cfg.norm_groups, widths[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)
        self.set_exact(exact)

    def time_embedding(self, x: Tensor, t: Tensor | float | int) -> Tensor:
        """(B, time_dim) embedding of the timestep(s), before the SiLU the resnets apply."""
        t = timesteps_tensor(t, x.shape[0], x.device)
        emb = timestep_embedding(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos, self.cfg.freq_shift)
        return self.time_mlp(emb.to(x.dtype))

    def forward(self, x: Tensor, t: Tensor | float | int, context: Tensor) -> Tensor:
        """x: (B, C, H, W) latents, t: timestep(s) (python number, 0-d or (B,) tensor),
        context: (B, T, cross_attention_dim) text embeddings -> (B, C, H, W) model output."""
        emb = layers.silu(self.time_embedding(x, t))
        x = self._enter(x)
        # When H or W is not a multiple of 2^(levels-1), upsample to each skip's size instead of x2.
        factor = 2 ** (len(self.up) - 1)
        odd_size = any(d % factor for d in x.shape[-2:])

        x = self.conv_in(x)
        skips = [x]
        for level in self.down:
            x, level_skips = level(x, emb, context)
            skips += level_skips
        if self.mid is not None:
            x = self.mid(x, emb, context)
        for i, level in enumerate(self.up):
            n_skips = len(level.res)
            size = skips[-n_skips - 1].shape[-2:] if odd_size and i < len(self.up) - 1 else None
            x = level(x, skips, emb, context, size)
        return self._leave(self.conv_out(layers.silu(self.norm_out(x))))
