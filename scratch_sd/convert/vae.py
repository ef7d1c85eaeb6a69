"""VAE weights: diffusers `AutoencoderKL` <-> scratch, and original LDM single file <-> scratch.

One walk over the network (`walk(cfg)`) names every weighted layer three ways
(scratch, diffusers, original LDM) and every block two ways; the two key tables and
the localiser's module pairs are all read off it. Differences between the schemes:

- attention: diffusers' to_q/to_k/to_v Linears (LDM: q/k/v 1x1 convs) fuse into our
  one `qkv` Linear; to_out.0 (LDM: proj_out, a 1x1 conv) is our `out`;
- decoder levels: diffusers' up_blocks.{i} and ours run in execution order, LDM's
  decoder.up.{n-1-i} is the same level (LDM indexes up levels by resolution);
- resnet shortcut: ours `skip`, diffusers `conv_shortcut`, LDM `nin_shortcut`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from scratch_sd.config import VAEConfig
from scratch_sd.convert import common
from scratch_sd.convert.common import ConversionError, Entry, KeyTable

Tensor = torch.Tensor

LDM_PREFIX = "first_stage_model."


# --------------------------------------------------------------------------- one walk, three names
@dataclass(frozen=True)
class Layer:
    """A weighted layer (weight + bias) under its three names. A layer made of several
    foreign layers (fused qkv) lists them all, joined by the named transform."""

    ours: str
    diffusers: tuple[str, ...]
    ldm: tuple[str, ...]
    diffusers_transform: str = "copy"
    ldm_transform: str = "copy"


@dataclass(frozen=True)
class Block:
    """A module without weights of its own whose output is the same tensor on both sides
    (a resnet, an attention block, a level, ...). Walked after the layers it contains."""

    ours: str
    diffusers: str


Step = Layer | Block


def _conv(ours: str, diffusers: str, ldm: str) -> Layer:
    return Layer(ours, (diffusers,), (ldm,))


def _resnet(ours: str, diffusers: str, ldm: str, shortcut: bool) -> Iterator[Step]:
    if shortcut:  # the scratch block runs its shortcut first (to free its input early)
        yield _conv(f"{ours}.skip", f"{diffusers}.conv_shortcut", f"{ldm}.nin_shortcut")
    for name in ("norm1", "conv1", "norm2", "conv2"):
        yield _conv(f"{ours}.{name}", f"{diffusers}.{name}", f"{ldm}.{name}")
    yield Block(ours, diffusers)


def _attention(ours: str, diffusers: str, ldm: str) -> Iterator[Step]:
    yield _conv(f"{ours}.norm", f"{diffusers}.group_norm", f"{ldm}.norm")
    yield Layer(f"{ours}.qkv", tuple(f"{diffusers}.to_{p}" for p in "qkv"), tuple(f"{ldm}.{p}" for p in "qkv"),
                "cat", "cat_conv1x1")
    yield Layer(f"{ours}.out", (f"{diffusers}.to_out.0",), (f"{ldm}.proj_out",), ldm_transform="conv1x1_to_linear")
    yield Block(ours, diffusers)


def _mid(cfg: VAEConfig, ours: str, diffusers: str, ldm: str) -> Iterator[Step]:
    yield from _resnet(f"{ours}.res.0", f"{diffusers}.resnets.0", f"{ldm}.block_1", False)
    if cfg.mid_attention:
        yield from _attention(f"{ours}.attn", f"{diffusers}.attentions.0", f"{ldm}.attn_1")
    yield from _resnet(f"{ours}.res.1", f"{diffusers}.resnets.1", f"{ldm}.block_2", False)
    yield Block(ours, diffusers)


def _level(ours: str, diffusers: str, ldm: str, c_in: int, c_out: int, n_res: int,
           resample: str | None) -> Iterator[Step]:
    for j in range(n_res):
        yield from _resnet(f"{ours}.res.{j}", f"{diffusers}.resnets.{j}", f"{ldm}.block.{j}",
                           (c_in if j == 0 else c_out) != c_out)
    if resample is not None:  # "downsample" / "upsample"
        theirs = f"{diffusers}.{resample}rs.0"  # downsamplers.0 / upsamplers.0
        yield _conv(f"{ours}.{resample}.conv", f"{theirs}.conv", f"{ldm}.{resample}.conv")
        yield Block(f"{ours}.{resample}", theirs)
    yield Block(ours, diffusers)


def _encoder(cfg: VAEConfig) -> Iterator[Step]:
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    yield _conv("encoder.conv_in", "encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        yield from _level(f"encoder.down.{i}", f"encoder.down_blocks.{i}", f"encoder.down.{i}",
                          ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, "downsample" if i < n - 1 else None)
    yield from _mid(cfg, "encoder.mid", "encoder.mid_block", "encoder.mid")
    yield _conv("encoder.norm_out", "encoder.conv_norm_out", "encoder.norm_out")
    yield _conv("encoder.conv_out", "encoder.conv_out", "encoder.conv_out")
    yield Block("encoder", "encoder")


def _decoder(cfg: VAEConfig) -> Iterator[Step]:
    ch, n = tuple(reversed(cfg.block_out_channels)), len(cfg.block_out_channels)
    yield _conv("decoder.conv_in", "decoder.conv_in", "decoder.conv_in")
    yield from _mid(cfg, "decoder.mid", "decoder.mid_block", "decoder.mid")
    for i in range(n):  # LDM numbers decoder levels by resolution: its up.{n-1-i} is our up.{i}
        yield from _level(f"decoder.up.{i}", f"decoder.up_blocks.{i}", f"decoder.up.{n - 1 - i}",
                          ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, "upsample" if i < n - 1 else None)
    yield _conv("decoder.norm_out", "decoder.conv_norm_out", "decoder.norm_out")
    yield _conv("decoder.conv_out", "decoder.conv_out", "decoder.conv_out")
    yield Block("decoder", "decoder")


def walk(cfg: VAEConfig) -> list[Step]:
    """Every layer and block of `forward(x)`, in the order their forwards finish."""
    return [*_encoder(cfg), _conv("quant_conv", "quant_conv", "quant_conv"),
            _conv("post_quant_conv", "post_quant_conv", "post_quant_conv"), *_decoder(cfg)]


def layers(cfg: VAEConfig) -> list[Layer]:
    return [step for step in walk(cfg) if isinstance(step, Layer)]


# --------------------------------------------------------------------------- key tables
def _table(cfg: VAEConfig, scheme: str, prefix: str, theirs_name: str) -> KeyTable:
    entries = []
    for layer in layers(cfg):
        modules, transform = getattr(layer, scheme), getattr(layer, f"{scheme}_transform")
        for param in ("weight", "bias"):
            theirs = tuple(f"{prefix}{m}.{param}" for m in modules)
            entries.append(Entry(theirs, f"{layer.ours}.{param}", transform))
    return KeyTable(entries, theirs_name=theirs_name, ours_name="scratch VAE")


def diffusers_table(cfg: VAEConfig) -> KeyTable:
    """diffusers AutoencoderKL state dict <-> scratch AutoencoderKL state dict."""
    return _table(cfg, "diffusers", "", "diffusers AutoencoderKL")


def ldm_table(cfg: VAEConfig, prefix: str = LDM_PREFIX) -> KeyTable:
    """Original LDM / single-file checkpoint VAE keys (`first_stage_model.` + ...) <-> scratch."""
    return _table(cfg, "ldm", prefix, "LDM VAE")


def _scratch_shapes(cfg: VAEConfig) -> dict[str, torch.Size]:
    from scratch_sd.vae import AutoencoderKL

    with torch.device("meta"):
        return common.shapes_of(AutoencoderKL(cfg))


def _theirs_shapes(table: KeyTable, cfg: VAEConfig) -> dict[str, torch.Size]:
    """The foreign side's shapes, derived from ours through the table (no diffusers import here)."""
    meta = {k: torch.empty(s, device="meta") for k, s in _scratch_shapes(cfg).items()}
    return {k: v.shape for k, v in table.to_theirs(meta).items()}


def from_diffusers(state: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> scratch state dict (strict: keys and shapes,
    a wrong shape named by its diffusers key)."""
    table = diffusers_table(cfg)
    common.check_shapes(state, _theirs_shapes(table, cfg), table.theirs_name)
    return table.to_ours(state, _scratch_shapes(cfg))


def to_diffusers(state: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """scratch state dict (keys and shapes checked) -> diffusers AutoencoderKL state dict."""
    common.check_shapes(state, _scratch_shapes(cfg), "scratch VAE")
    return diffusers_table(cfg).to_theirs(state)


def from_ldm(state: Mapping[str, Tensor], cfg: VAEConfig, prefix: str = LDM_PREFIX) -> dict[str, Tensor]:
    """The VAE part of an original single-file checkpoint -> scratch state dict. Keys of
    other parts of the file (UNet, text encoder) are ignored; every VAE key must be there
    and no unknown key may carry the VAE prefix."""
    vae = {k: v for k, v in state.items() if k.startswith(prefix)}
    if not vae:
        raise ConversionError(f"LDM VAE state dict has no key starting with {prefix!r}")
    return ldm_table(cfg, prefix).to_ours(vae, _scratch_shapes(cfg))


def to_ldm(state: Mapping[str, Tensor], cfg: VAEConfig, prefix: str = LDM_PREFIX) -> dict[str, Tensor]:
    """scratch state dict (keys and shapes checked) -> original LDM VAE keys (attention as 1x1 convs)."""
    common.check_shapes(state, _scratch_shapes(cfg), "scratch VAE")
    return ldm_table(cfg, prefix).to_theirs(state)


# --------------------------------------------------------------------------- localiser pairs
def module_pairs(cfg: VAEConfig) -> list[tuple[str, str]]:
    """(scratch module, diffusers module) whose forward outputs are the same tensor, in the
    order their forwards finish during `forward(x)` (encode, then decode of the mode):
    layers first, then the blocks containing them. The fused qkv has no counterpart."""
    return [(step.ours, step.diffusers if isinstance(step, Block) else step.diffusers[0])
            for step in walk(cfg) if isinstance(step, Block) or len(step.diffusers) == 1]
