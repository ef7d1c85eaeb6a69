"""UNet weights: diffusers `UNet2DConditionModel` and original LDM single file <-> scratch `UNet`.

The network is walked once, in execution order (`_walk`), as a list of parts:
each names one module in our scheme, in diffusers' and in the LDM checkpoint's.
Small rules over the level / layer indices give every name; per-kind leaf rules
then give the parameters. The two key tables and the localiser's module pairs
are all read off that one walk.

Original LDM layout (`model.diffusion_model.` + ...):
    input_blocks.0.0                    conv_in
    input_blocks.{1 + L*(lpb+1) + j}    .0 resnet j of down level L, .1 its transformer
    input_blocks.{(L+1)*(lpb+1)}.0.op   downsample of level L
    middle_block.{0,1,2}                resnet, transformer, resnet
    output_blocks.{i*(lpb+1) + j}       .0 resnet j of up level i (i = 0 deepest), .1 transformer;
                                        the last j carries the upsample: .1.conv, or .2.conv
                                        when the level has attention
    time_embed.{0,2}, out.{0,2}         time MLP, final GroupNorm and conv
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from scratch_sd.config import UNetConfig
from scratch_sd.convert.common import ConversionError, Entry, KeyTable, check_shapes, shapes_of

Tensor = torch.Tensor

LDM_PREFIX = "model.diffusion_model."
WB = ("weight", "bias")

# resnet leaves: ours -> (diffusers, ldm)
RESNET_LEAVES = {
    "norm1": ("norm1", "in_layers.0"),
    "conv1": ("conv1", "in_layers.2"),
    "time_proj": ("time_emb_proj", "emb_layers.1"),
    "norm2": ("norm2", "out_layers.0"),
    "conv2": ("conv2", "out_layers.3"),
    "skip": ("conv_shortcut", "skip_connection"),
}
SCHEMES = ("diffusers", "ldm")


@dataclass(frozen=True)
class Leaf:
    """One scratch module with parameters and the reference module(s) it comes from."""

    ours: str
    theirs: tuple[str, ...]
    params: tuple[str, ...] = WB
    transform: str = "copy"


@dataclass(frozen=True)
class Part:
    """One module of the walk. kind: "layer" (a conv / linear / norm), "resnet", "transformer",
    or "block" (a container without its own weights, listed after its children)."""

    kind: str
    ours: str
    diffusers: str
    ldm: str = ""
    skip: bool = False  # resnet: has a 1x1 shortcut
    depth: int = 0  # transformer: number of transformer blocks


# --------------------------------------------------------------------------- the walk
def _walk(cfg: UNetConfig) -> Iterator[Part]:
    """Every module, in the order their forward passes finish."""
    widths, n, lpb = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    yield Part("layer", "time_mlp.0", "time_embedding.linear_1", "time_embed.0")
    yield Part("layer", "time_mlp.2", "time_embedding.linear_2", "time_embed.2")
    yield Part("block", "time_mlp", "time_embedding")
    yield Part("layer", "conv_in", "conv_in", "input_blocks.0.0")

    for level in range(n):
        ours, theirs = f"down.{level}", f"down_blocks.{level}"
        for j in range(lpb):
            cin = widths[max(level - 1, 0)] if j == 0 else widths[level]
            ldm = f"input_blocks.{1 + level * (lpb + 1) + j}"
            yield Part("resnet", f"{ours}.res.{j}", f"{theirs}.resnets.{j}", f"{ldm}.0", skip=cin != widths[level])
            if cfg.attention_levels[level]:
                yield Part("transformer", f"{ours}.attn.{j}", f"{theirs}.attentions.{j}", f"{ldm}.1",
                           depth=cfg.transformer_depth[level])
        if level < n - 1:
            yield Part("layer", f"{ours}.down", f"{theirs}.downsamplers.0.conv",
                       f"input_blocks.{(level + 1) * (lpb + 1)}.0.op")
        yield Part("block", ours, theirs)

    if cfg.mid_attention:
        yield Part("resnet", "mid.res.0", "mid_block.resnets.0", "middle_block.0")
        yield Part("transformer", "mid.attn.0", "mid_block.attentions.0", "middle_block.1",
                   depth=cfg.transformer_depth[-1])
        yield Part("resnet", "mid.res.1", "mid_block.resnets.1", "middle_block.2")
        yield Part("block", "mid", "mid_block")

    for i, level in enumerate(reversed(range(n))):
        ours, theirs = f"up.{i}", f"up_blocks.{i}"
        attention = cfg.attention_levels[level]
        for j in range(lpb + 1):
            ldm = f"output_blocks.{i * (lpb + 1) + j}"
            yield Part("resnet", f"{ours}.res.{j}", f"{theirs}.resnets.{j}", f"{ldm}.0", skip=True)
            if attention:
                yield Part("transformer", f"{ours}.attn.{j}", f"{theirs}.attentions.{j}", f"{ldm}.1",
                           depth=cfg.transformer_depth[level])
        if level > 0:
            ldm = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if attention else 1}.conv"
            yield Part("layer", f"{ours}.up.conv", f"{theirs}.upsamplers.0.conv", ldm)
            yield Part("block", f"{ours}.up", f"{theirs}.upsamplers.0")
        yield Part("block", ours, theirs)

    yield Part("layer", "norm_out", "conv_norm_out", "out.0")
    yield Part("layer", "conv_out", "conv_out", "out.2")


# --------------------------------------------------------------------------- leaves per kind
def _resnet_leaves(part: Part, scheme: str) -> list[Leaf]:
    theirs = getattr(part, scheme)
    names = [k for k in RESNET_LEAVES if k != "skip" or part.skip]
    return [Leaf(f"{part.ours}.{k}", (f"{theirs}.{RESNET_LEAVES[k][SCHEMES.index(scheme)]}",)) for k in names]


def _transformer_block_leaves(ours: str, theirs: str) -> list[Leaf]:
    """One BasicTransformerBlock; its names are the same in diffusers and LDM."""
    a1, a2 = f"{theirs}.attn1", f"{theirs}.attn2"
    return [
        Leaf(f"{ours}.norm1", (f"{theirs}.norm1",)),
        Leaf(f"{ours}.attn1.qkv", (f"{a1}.to_q", f"{a1}.to_k", f"{a1}.to_v"), ("weight",), "cat"),
        Leaf(f"{ours}.attn1.out", (f"{a1}.to_out.0",)),
        Leaf(f"{ours}.norm2", (f"{theirs}.norm2",)),
        Leaf(f"{ours}.attn2.q", (f"{a2}.to_q",), ("weight",)),
        Leaf(f"{ours}.attn2.kv", (f"{a2}.to_k", f"{a2}.to_v"), ("weight",), "cat"),
        Leaf(f"{ours}.attn2.out", (f"{a2}.to_out.0",)),
        Leaf(f"{ours}.norm3", (f"{theirs}.norm3",)),
        Leaf(f"{ours}.ff.proj", (f"{theirs}.ff.net.0.proj",)),
        Leaf(f"{ours}.ff.out", (f"{theirs}.ff.net.2",)),
    ]


def _transformer_leaves(part: Part, scheme: str) -> list[Leaf]:
    ours, theirs = part.ours, getattr(part, scheme)
    leaves = [Leaf(f"{ours}.norm", (f"{theirs}.norm",)), Leaf(f"{ours}.proj_in", (f"{theirs}.proj_in",))]
    for k in range(part.depth):
        leaves += _transformer_block_leaves(f"{ours}.blocks.{k}", f"{theirs}.transformer_blocks.{k}")
    return leaves + [Leaf(f"{ours}.proj_out", (f"{theirs}.proj_out",))]


def _leaves(part: Part, scheme: str) -> list[Leaf]:
    if part.kind == "layer":
        return [Leaf(part.ours, (getattr(part, scheme),))]
    if part.kind == "resnet":
        return _resnet_leaves(part, scheme)
    if part.kind == "transformer":
        return _transformer_leaves(part, scheme)
    return []


def _table(cfg: UNetConfig, scheme: str, prefix: str = "") -> KeyTable:
    entries = [
        Entry(tuple(f"{prefix}{t}.{p}" for t in leaf.theirs), f"{leaf.ours}.{p}", leaf.transform)
        for part in _walk(cfg) for leaf in _leaves(part, scheme) for p in leaf.params
    ]
    return KeyTable(entries, theirs_name=scheme, ours_name="scratch")


def diffusers_table(cfg: UNetConfig) -> KeyTable:
    """diffusers UNet2DConditionModel keys <-> scratch UNet keys."""
    return _table(cfg, "diffusers")


def ldm_table(cfg: UNetConfig) -> KeyTable:
    """Original LDM single-file keys (`model.diffusion_model.*`) <-> scratch UNet keys."""
    return _table(cfg, "ldm", LDM_PREFIX)


# --------------------------------------------------------------------------- module pairs
def _transformer_pairs(part: Part) -> list[tuple[str, str]]:
    ours, theirs = part.ours, part.diffusers
    pairs = [(f"{ours}.norm", f"{theirs}.norm"), (f"{ours}.proj_in", f"{theirs}.proj_in")]
    for k in range(part.depth):
        o, t = f"{ours}.blocks.{k}", f"{theirs}.transformer_blocks.{k}"
        pairs += [
            (f"{o}.norm1", f"{t}.norm1"), (f"{o}.attn1.out", f"{t}.attn1.to_out.0"), (f"{o}.attn1", f"{t}.attn1"),
            (f"{o}.norm2", f"{t}.norm2"), (f"{o}.attn2.q", f"{t}.attn2.to_q"),
            (f"{o}.attn2.out", f"{t}.attn2.to_out.0"), (f"{o}.attn2", f"{t}.attn2"),
            (f"{o}.norm3", f"{t}.norm3"), (f"{o}.ff.proj", f"{t}.ff.net.0.proj"), (f"{o}.ff.out", f"{t}.ff.net.2"),
            (f"{o}.ff", f"{t}.ff"), (o, t),
        ]
    return pairs + [(f"{ours}.proj_out", f"{theirs}.proj_out"), (ours, theirs)]


def module_pairs(cfg: UNetConfig) -> list[tuple[str, str]]:
    """(scratch module, diffusers module) whose forward outputs are the same tensor, in the
    order their forward passes finish: leaf layers (not the fused qkv / kv) and blocks."""
    pairs: list[tuple[str, str]] = []
    for part in _walk(cfg):
        if part.kind == "transformer":
            pairs += _transformer_pairs(part)
        elif part.kind == "resnet":
            pairs += [(leaf.ours, leaf.theirs[0]) for leaf in _resnet_leaves(part, "diffusers")]
            pairs.append((part.ours, part.diffusers))
        else:
            pairs.append((part.ours, part.diffusers))
    return pairs


# --------------------------------------------------------------------------- conversion
def scratch_shapes(cfg: UNetConfig) -> dict[str, torch.Size]:
    """Our parameter shapes, from a UNet built on the meta device (no memory, no init)."""
    from scratch_sd.unet import UNet

    with torch.device("meta"):
        return shapes_of(UNet(cfg))


def _their_shapes(table: KeyTable, ours: Mapping[str, torch.Size]) -> dict[str, torch.Size]:
    meta = {k: torch.empty(s, device="meta") for k, s in ours.items()}
    return {k: v.shape for k, v in table.to_theirs(meta).items()}


def _convert_in(table: KeyTable, state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    ours = scratch_shapes(cfg)
    check_shapes(state, _their_shapes(table, ours), table.theirs_name)
    return table.to_ours(state, ours)


def _convert_out(table: KeyTable, state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    ours = scratch_shapes(cfg)
    check_shapes(state, ours, table.ours_name)
    return table.to_theirs(state, _their_shapes(table, ours))


def from_diffusers(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """diffusers UNet2DConditionModel state dict -> scratch UNet state dict (strict, shapes checked)."""
    return _convert_in(diffusers_table(cfg), state, cfg)


def to_diffusers(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """scratch UNet state dict -> diffusers UNet2DConditionModel state dict (strict, shapes checked)."""
    return _convert_out(diffusers_table(cfg), state, cfg)


def from_ldm(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """Original single-file checkpoint -> scratch UNet state dict.

    Only `model.diffusion_model.*` keys are read (a single file also holds the VAE and the
    text encoder); within them the conversion is strict and shape-checked.
    """
    unet = {k: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    if not unet:
        raise ConversionError(f"ldm state dict has no UNet keys (none start with {LDM_PREFIX!r})")
    return _convert_in(ldm_table(cfg), unet, cfg)


def to_ldm(state: Mapping[str, Tensor], cfg: UNetConfig) -> dict[str, Tensor]:
    """scratch UNet state dict -> original LDM keys (`model.diffusion_model.*`)."""
    return _convert_out(ldm_table(cfg), state, cfg)


__all__ = ["diffusers_table", "ldm_table", "module_pairs", "from_diffusers", "to_diffusers", "from_ldm",
           "to_ldm", "scratch_shapes", "LDM_PREFIX"]
