"""CLIP text encoder weights: transformers / original LDM single file <-> scratch.

Three namings of the same tensors:
- scratch:       embed.tok.weight, layers.{i}.attn.qkv.weight, layers.{i}.mlp.fc1.bias, norm.weight
- transformers:  text_model.embeddings.token_embedding.weight, text_model.encoder.layers.{i}.self_attn.q_proj.weight, ...
  That `text_model.` form is canonical: it is what a diffusers folder's text_encoder/model.safetensors
  holds and what transformers < 5.6 has in memory. transformers >= 5.6 flattened CLIPTextModel: its
  live state_dict (the zoo's reference) has the same keys without `text_model.`. Pass prefix="" for it;
  `from_diffusers` accepts either form.
- original LDM:  cond_stage_model.transformer. + the canonical transformers key. Some old single files
  lack the `text_model.` level; `normalize_ldm_clip_keys` rewrites them.
- original SD 2.x (Stability's ldm files, e.g. v2-1_768-ema-pruned): OpenCLIP's own names under
  cond_stage_model.model. (`openclip_table`): token_embedding.weight, positional_embedding (a bare
  parameter), transformer.resblocks.{i}.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj},
  ln_final. in_proj_weight/bias is nn.MultiheadAttention's packed q, k, v (q first, along the output
  dimension): exactly our fused qkv, so it is copied; transformers' q_proj/k_proj/v_proj are its three
  thirds (diffusers' convert_open_clip_checkpoint splits it so). OpenCLIP ViT-H has 24 resblocks;
  SD 2.x conditions on the penultimate layer's output (FrozenOpenCLIPEmbedder(layer="penultimate")),
  so diffusers ships 23 and the last resblock is unused, as are text_projection and logit_scale:
  OPENCLIP_RULES name them (`openclip_unused`).

`embeddings.position_ids` was a persistent buffer before transformers 4.31, so older files carry it.
It holds arange(77) (or, in some merged checkpoints, a damaged float copy of it); transformers and
diffusers ignore it and use 0..T-1, and so do we: the DROP_POSITION_IDS rule removes it, by name.
"""
from __future__ import annotations

from typing import Mapping

import torch

from scratch_sd.config import CLIPTextConfig
from scratch_sd.convert.common import ConversionError, Entry, KeyTable, check_shapes

Tensor = torch.Tensor

TEXT_MODEL = "text_model."  # the canonical (on-disk) transformers prefix
LDM_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD 2.x single files: OpenCLIP's text tower
RESBLOCKS = "transformer.resblocks."
POSITION_IDS = "embeddings.position_ids"  # ignored buffer, see DROP_POSITION_IDS


# --------------------------------------------------------------------------- rules
def _layer_entries(i: int) -> list[Entry]:
    """One encoder layer: transformers names (relative to `encoder.layers.{i}.`) -> ours."""
    t, o = f"encoder.layers.{i}.", f"layers.{i}."
    entries = []
    for p in ("weight", "bias"):
        entries += [
            Entry(tuple(f"{t}self_attn.{n}_proj.{p}" for n in "qkv"), f"{o}attn.qkv.{p}", "cat"),
            Entry((f"{t}self_attn.out_proj.{p}",), f"{o}attn.out.{p}"),
            Entry((f"{t}layer_norm1.{p}",), f"{o}norm1.{p}"),
            Entry((f"{t}layer_norm2.{p}",), f"{o}norm2.{p}"),
            Entry((f"{t}mlp.fc1.{p}",), f"{o}mlp.fc1.{p}"),
            Entry((f"{t}mlp.fc2.{p}",), f"{o}mlp.fc2.{p}"),
        ]
    return entries


def diffusers_table(cfg: CLIPTextConfig, prefix: str = TEXT_MODEL, name: str = "transformers") -> KeyTable:
    """transformers CLIPTextModel keys (with `prefix`, canonically `text_model.`) <-> scratch keys."""
    entries = [
        Entry(("embeddings.token_embedding.weight",), "embed.tok.weight"),
        Entry(("embeddings.position_embedding.weight",), "embed.pos.weight"),
    ]
    for i in range(cfg.layers):
        entries += _layer_entries(i)
    entries += [Entry((f"final_layer_norm.{p}",), f"norm.{p}") for p in ("weight", "bias")]
    return KeyTable(entries, theirs_name=name, ours_name="scratch").prefixed(theirs_prefix=prefix)


def ldm_table(cfg: CLIPTextConfig) -> KeyTable:
    """Original single-file keys (`cond_stage_model.transformer.text_model.*`) <-> scratch keys."""
    return diffusers_table(cfg, LDM_PREFIX + TEXT_MODEL, name="LDM single file")


# OpenCLIP resblock leaf -> ours (relative to `transformer.resblocks.{i}.` / `layers.{i}.`)
OPENCLIP_LEAVES = {"ln_1": "norm1", "attn.out_proj": "attn.out", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2"}


def _openclip_layer_entries(i: int) -> list[Entry]:
    t, o = f"{RESBLOCKS}{i}.", f"layers.{i}."
    entries = [Entry((f"{t}attn.in_proj_{p}",), f"{o}attn.qkv.{p}") for p in ("weight", "bias")]  # packed q,k,v
    return entries + [Entry((f"{t}{a}.{p}",), f"{o}{b}.{p}") for a, b in OPENCLIP_LEAVES.items() for p in ("weight", "bias")]


def openclip_table(cfg: CLIPTextConfig, prefix: str = OPENCLIP_PREFIX) -> KeyTable:
    """SD 2.x single-file text keys (OpenCLIP naming, `cond_stage_model.model.*`) <-> scratch keys:
    the `cfg.layers` resblocks the model runs (the unused last one is OPENCLIP_UNUSED_LAYER's)."""
    entries = [Entry(("token_embedding.weight",), "embed.tok.weight"),
               Entry(("positional_embedding",), "embed.pos.weight")]  # (77, width), a bare nn.Parameter
    for i in range(cfg.layers):
        entries += _openclip_layer_entries(i)
    entries += [Entry((f"ln_final.{p}",), f"norm.{p}") for p in ("weight", "bias")]
    return KeyTable(entries, theirs_name="SD 2.x single file", ours_name="scratch").prefixed(theirs_prefix=prefix)


# --------------------------------------------------------------------------- named key rules
def openclip_resblocks(state: Mapping[str, Tensor], prefix: str = OPENCLIP_PREFIX) -> int:
    """How many resblocks the file's OpenCLIP tower holds."""
    head = prefix + RESBLOCKS
    return len({k[len(head):].split(".", 1)[0] for k in state if k.startswith(head)})


def openclip_layers_used(state: Mapping[str, Tensor], prefix: str = OPENCLIP_PREFIX) -> int:
    """The layers SD 2.x runs, from the file alone: a file with text_projection holds OpenCLIP's whole
    tower (Stability's files: 24 resblocks, the last unused); one without it holds only the layers run
    (what `to_openclip` writes, and what diffusers reads either way)."""
    k = openclip_resblocks(state, prefix)
    return k - 1 if prefix + "text_projection" in state else k


def openclip_unused(state: Mapping[str, Tensor], cfg: CLIPTextConfig,
                    prefix: str = OPENCLIP_PREFIX) -> dict[str, list[str]]:
    """The named rules' keys of an SD 2.x text tower of `cfg.layers` layers, each checked to be what it
    claims (rule name -> keys):
        OPENCLIP_UNUSED_LAYER       transformer.resblocks.{cfg.layers}.*: the last resblock, after the
                                    penultimate layer SD 2.x conditions on; it must be a whole resblock
                                    of this tower's widths
        OPENCLIP_TEXT_PROJECTION    text_projection (width, embed): the pooled embedding's projection
        OPENCLIP_LOGIT_SCALE        logit_scale: CLIP's contrastive temperature
    A resblock past cfg.layers + 1 is not covered (the table then names it as unexpected)."""
    rules: dict[str, list[str]] = {}
    last = f"{prefix}{RESBLOCKS}{cfg.layers}."
    block = {k for k in state if k.startswith(last)}
    if block:
        first = f"{prefix}{RESBLOCKS}0."
        _, theirs = _checked(openclip_table(cfg, prefix), cfg)
        want = {last + k[len(first):]: v for k, v in theirs.items() if k.startswith(first)}  # a resblock's shapes
        check_shapes({k: state[k] for k in block}, want, f"SD 2.x single file (the unused last resblock {cfg.layers})")
        rules["OPENCLIP_UNUSED_LAYER"] = sorted(block)
    proj = prefix + "text_projection"
    if proj in state:
        t = state[proj]
        if t.ndim != 2 or t.shape[0] != cfg.width:  # diffusers splits in_proj by text_projection.shape[0]
            raise ConversionError(f"{proj} has shape {tuple(t.shape)}; expected ({cfg.width}, embed dim)")
        rules["OPENCLIP_TEXT_PROJECTION"] = [proj]
    if prefix + "logit_scale" in state:
        if state[prefix + "logit_scale"].numel() != 1:
            raise ConversionError(f"{prefix}logit_scale has shape {tuple(state[prefix + 'logit_scale'].shape)}; "
                                  "expected a scalar")
        rules["OPENCLIP_LOGIT_SCALE"] = [prefix + "logit_scale"]
    return rules


def drop_position_ids(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """DROP_POSITION_IDS: remove `{prefix}embeddings.position_ids` (an unused buffer; see module doc)."""
    return {k: v for k, v in state.items() if k != prefix + POSITION_IDS}


def detect_prefix(state: Mapping[str, Tensor]) -> str:
    """`text_model.` if the state dict uses the canonical transformers form, "" for the flattened one."""
    return TEXT_MODEL if any(k.startswith(TEXT_MODEL) for k in state) else ""


def normalize_ldm_clip_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rewrite a single file's text-encoder keys to the canonical form and drop position_ids.

    `cond_stage_model.transformer.embeddings.*` (no `text_model.` level, very old files) becomes
    `cond_stage_model.transformer.text_model.embeddings.*`; keys outside the text encoder are
    left alone (the caller selects the text encoder's keys; the table then checks them strictly).
    """
    canonical = LDM_PREFIX + TEXT_MODEL
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.startswith(LDM_PREFIX) and not k.startswith(canonical):
            k = canonical + k[len(LDM_PREFIX):]
        if k in out:
            raise ConversionError(f"LDM text encoder key {k} appears in both the old and the text_model. form")
        out[k] = v
    return drop_position_ids(out, canonical)


# --------------------------------------------------------------------------- conversion
def _meta_state(cfg: CLIPTextConfig) -> dict[str, Tensor]:
    from scratch_sd.clip import CLIPTextModel  # shapes only: built on the meta device

    with torch.device("meta"):
        return CLIPTextModel(cfg).state_dict()


def _shapes(state: Mapping[str, Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in state.items()}


def _checked(table: KeyTable, cfg: CLIPTextConfig) -> tuple[dict[str, torch.Size], dict[str, torch.Size]]:
    """(our shapes, their shapes): theirs follow from ours through the table (on meta tensors)."""
    ours = _meta_state(cfg)
    return _shapes(ours), _shapes(table.to_theirs(ours))


def _from(table: KeyTable, state: Mapping[str, Tensor], cfg: CLIPTextConfig) -> dict[str, Tensor]:
    ours, theirs = _checked(table, cfg)
    check_shapes(state, theirs, table.theirs_name)  # names their key when it is missing, extra or mis-shaped
    return table.to_ours(state, ours)


def _to(table: KeyTable, state: Mapping[str, Tensor], cfg: CLIPTextConfig) -> dict[str, Tensor]:
    ours, theirs = _checked(table, cfg)
    check_shapes(state, ours, table.ours_name)
    return table.to_theirs(state, theirs)


def from_diffusers(state: Mapping[str, Tensor], cfg: CLIPTextConfig) -> dict[str, Tensor]:
    """transformers CLIPTextModel state dict (either prefix form) -> scratch state dict, strictly."""
    prefix = detect_prefix(state)
    return _from(diffusers_table(cfg, prefix), drop_position_ids(state, prefix), cfg)


def to_diffusers(state: Mapping[str, Tensor], cfg: CLIPTextConfig, prefix: str = TEXT_MODEL) -> dict[str, Tensor]:
    """scratch state dict -> transformers keys (prefix "" to load into a flattened transformers >= 5.6 model)."""
    return _to(diffusers_table(cfg, prefix), state, cfg)


def from_ldm(state: Mapping[str, Tensor], cfg: CLIPTextConfig) -> dict[str, Tensor]:
    """A single file's text-encoder keys (`cond_stage_model.transformer.*` only) -> scratch, strictly."""
    return _from(ldm_table(cfg), normalize_ldm_clip_keys(state), cfg)


def to_ldm(state: Mapping[str, Tensor], cfg: CLIPTextConfig) -> dict[str, Tensor]:
    """scratch state dict -> canonical single-file keys (`cond_stage_model.transformer.text_model.*`)."""
    return _to(ldm_table(cfg), state, cfg)


def from_openclip(state: Mapping[str, Tensor], cfg: CLIPTextConfig) -> dict[str, Tensor]:
    """An SD 2.x file's text keys (`cond_stage_model.model.*` only) -> scratch, strictly: every key is
    the table's or one of `openclip_unused`'s named rules."""
    dropped = {k for keys in openclip_unused(state, cfg).values() for k in keys}
    return _from(openclip_table(cfg), {k: v for k, v in state.items() if k not in dropped}, cfg)


def to_openclip(state: Mapping[str, Tensor], cfg: CLIPTextConfig) -> dict[str, Tensor]:
    """scratch -> SD 2.x single-file text keys: the cfg.layers resblocks run, token/positional
    embeddings, ln_final. Nothing is invented: no unused last resblock, no text_projection."""
    return _to(openclip_table(cfg), state, cfg)


# --------------------------------------------------------------------------- localiser
def module_pairs(cfg: CLIPTextConfig, prefix: str = "") -> list[tuple[str, str]]:
    """(scratch module, transformers module) whose outputs are the same tensor, in execution order.

    Reference names are those of the live transformers module: flattened (prefix "") in
    transformers >= 5.6 as the zoo builds it; pass prefix="text_model." for older versions.
    The fused qkv has no counterpart; the attention block's output (after out_proj) does.
    """
    pairs = [("embed.tok", "embeddings.token_embedding"), ("embed.pos", "embeddings.position_embedding"),
             ("embed", "embeddings")]
    for i in range(cfg.layers):
        o, t = f"layers.{i}.", f"encoder.layers.{i}."
        pairs += [(o + a, t + b) for a, b in (
            ("norm1", "layer_norm1"), ("attn.out", "self_attn.out_proj"), ("attn", "self_attn"),
            ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"), ("mlp", "mlp"))]
        pairs.append((f"layers.{i}", f"encoder.layers.{i}"))
    pairs.append(("norm", "final_layer_norm"))
    return [(o, prefix + t) for o, t in pairs]
