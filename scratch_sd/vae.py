"""The SD 1.x autoencoder (AutoencoderKL, KL-f8), from scratch.

Image (B, 3, H, W) in [-1, 1] -> encoder -> moments (B, 2*4, H/8, W/8) -> a diagonal
Gaussian posterior -> latents z (B, 4, H/8, W/8) -> decoder -> image.
z here is UNscaled: multiplying by cfg.scaling_factor (0.18215) is the pipeline's job,
as in diffusers.

Numerics follow diffusers' AutoencoderKL op for op (GroupNorm eps 1e-6 everywhere,
pad (0,1,0,1) before each stride-2 conv, nearest x2 before each up conv, single-head
SDPA attention in the mid blocks, logvar clamped to [-30, 20]); the one deliberate
difference is the fused qkv projection (one matmul instead of three).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratch_sd import layers
from scratch_sd.config import VAEConfig

Tensor = torch.Tensor


# --------------------------------------------------------------------------- blocks
def group_norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return layers.GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = group_norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor | list[Tensor]) -> Tensor:
        """x: a tensor, or a one-element list handing it over (layers.take). An input handed over
        to a block with a shortcut conv is normalised in place and freed after the first conv, so
        the widest activation of a level change is not held through the whole block."""
        x, owned = layers.take(x)
        residual = x if self.skip is None else self.skip(x)  # the shortcut first: then x is free
        h = layers.silu(self.norm1(x, overwrite=owned and self.skip is not None))
        del x
        h = self.conv1(h)
        h = self.conv2(layers.silu(self.norm2(h, overwrite=True)))  # (dropout is 0 in SD)
        return layers.add(h, residual, h_first=False)


class SpatialSelfAttention(nn.Module):
    """One head over all H*W positions, residual added (diffusers' Attention with
    residual_connection=True, rescale_output_factor=1, run by its SDPA processor,
    which ignores the block's upcast_softmax=True)."""

    exact = False  # set by AutoencoderKL.set_exact: False = channels_last activations

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = group_norm(cfg, channels)
        self.qkv = layers.Linear(channels, 3 * channels)
        self.out = layers.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.norm(x.flatten(2)).transpose(1, 2)  # (B, H*W, C); normed as (B, C, H*W) like diffusers
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        t = self.out(layers.attention(q, k, v, heads=1))  # (B, H*W, C)
        if self.exact:
            # diffusers' expression: the tokens' transposed view (channels_last strides) + the input.
            # The view leads, so the sum comes out channels_last, and the GroupNorms and convs after
            # it take their channels_last kernels in diffusers: exact mode must take the same ones.
            return t.transpose(1, 2).reshape(b, c, h, w) + x
        return layers.add(layers.nchw_of_tokens(t, b, h, w, True), x, h_first=False)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv without padding (asymmetric, as in LDM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor:
        return self.conv(F.pad(layers.take(x)[0], (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv. diffusers' Upsample2D upcasts bf16 around the
    interpolation only for torch < 2.1; on newer torch it interpolates in the input
    dtype, as here (nearest neighbour copies values, so it is exact in any dtype)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor:
        return self.conv(F.interpolate(layers.take(x)[0], scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class MidBlock(nn.Module):
    """resnet -> attention (optional) -> resnet, at the lowest resolution."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock(cfg, channels, channels) for _ in range(2)])
        self.attn = SpatialSelfAttention(cfg, channels) if cfg.mid_attention else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.res[0](x)
        if self.attn is not None:
            x = self.attn(x)
        return self.res[1](x)


class Level(nn.Module):
    """One resolution: a few resnets, then an optional down- or upsampler."""

    def __init__(self, cfg: VAEConfig, c_in: int, c_out: int, n_res: int, resample: str | None):
        super().__init__()
        self.res = nn.ModuleList([ResnetBlock(cfg, c_in if j == 0 else c_out, c_out) for j in range(n_res)])
        self.downsample = Downsample(c_out) if resample == "down" else None
        self.upsample = Upsample(c_out) if resample == "up" else None

    def forward(self, x: Tensor | list[Tensor]) -> Tensor:
        """x: a tensor or a one-element list handing it over; each block's output is handed over
        to the next block the same way (layers.take)."""
        for block in (*self.res, self.downsample, self.upsample):
            if block is not None:
                x = [block(x)]
        return layers.take(x)[0]


# --------------------------------------------------------------------------- encoder / decoder
class Encoder(nn.Module):
    """image (B, in_channels, H, W) -> moments (B, 2*latent_channels, H/f, W/f), f = 2**(levels-1)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.block_out_channels
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList([
            Level(cfg, ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, "down" if i < n - 1 else None)
            for i in range(n)])
        self.mid = MidBlock(cfg, ch[-1])
        self.norm_out = group_norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = [self.conv_in(x)]  # handed from level to level (layers.take): each frees its input early
        for level in self.down:
            x = [level(x)]
        x = self.mid(x.pop())
        return self.conv_out(layers.silu(self.norm_out(x, overwrite=True)))


class Decoder(nn.Module):
    """latents (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f).
    Levels run from the widest/lowest resolution up; each has layers_per_block + 1 resnets."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = tuple(reversed(cfg.block_out_channels))
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid = MidBlock(cfg, ch[0])
        self.up = nn.ModuleList([
            Level(cfg, ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, "up" if i < n - 1 else None)
            for i in range(n)])
        self.norm_out = group_norm(cfg, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = [self.mid(self.conv_in(z))]  # handed from level to level (layers.take): each frees its input early
        for level in self.up:
            x = [level(x)]
        return self.conv_out(layers.silu(self.norm_out(x.pop(), overwrite=True)))


# --------------------------------------------------------------------------- posterior
class DiagonalGaussian:
    """The posterior q(z | x): moments (B, 2C, h, w) split into mean and log-variance."""

    def __init__(self, moments: Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator=None, noise: Tensor | None = None) -> Tensor:
        """mean + std * noise; noise drawn like diffusers' `latent_dist.sample(generator)` unless given."""
        if noise is None:
            noise = layers.randn_tensor(self.mean.shape, generator, self.moments.device, self.moments.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean


# --------------------------------------------------------------------------- model
class AutoencoderKL(layers.ExactOrFast, nn.Module):
    def __init__(self, cfg: VAEConfig, exact: bool = False):
        """exact=False (default): the fast mode; True: bit-identical to diffusers (layers.ExactOrFast)."""
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg)
        self.set_exact(exact)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self._leave(self.quant_conv(self.encoder(self._enter(x)))))

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents -> image (divide pipeline latents by cfg.scaling_factor first)."""
        return self._leave(self.decoder(self.post_quant_conv(self._enter(z))))

    def forward(self, x: Tensor, sample_posterior: bool = False, generator=None) -> Tensor:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)
