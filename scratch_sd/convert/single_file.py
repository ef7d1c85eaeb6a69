"""Original single-file checkpoints (`v1-5-pruned-emaonly.safetensors`, `v2-1_768-ema-pruned`) <-> scratch.

An original (CompVis / Stability LDM) Stable Diffusion 1.x or 2.x checkpoint holds the three
networks in one flat state dict, under three prefixes:

    model.diffusion_model.*          UNet              (scratch_sd/convert/unet.py: ldm_table)
    first_stage_model.*              VAE               (scratch_sd/convert/vae.py: ldm_table)
    cond_stage_model.transformer.*   SD 1.x: OpenAI CLIP text encoder (scratch_sd/convert/clip.py: ldm_table)
    cond_stage_model.model.*         SD 2.x: OpenCLIP ViT-H text tower (clip.py: openclip_table)

The family is read from the keys (`text_layout`): OpenCLIP names mean SD 2.x. Its UNet differs
only in shapes (linear proj_in/proj_out: 2-D weights, copied as they are by the same table;
1024-wide context), so the UNet table is shared.

The table for the whole file is those three tables composed; our side of it is one flat
state dict whose keys carry the component name (`unet.conv_in.weight`, `vae.encoder...`,
`text_encoder.embed.tok.weight`) -- the same layout as a scratch checkpoint.

A real file carries more than weights. Every other key must match a named rule below, or
the read fails naming it (nothing is dropped silently; `Reading.ignored` lists what each
rule took):

    DDPM_SCHEDULE       betas, alphas_cumprod, ...: LDM's training noise schedule, kept as buffers.
                        The scheduler config defines the schedule; `schedule_matches_sd15` checks it.
    EMA_BOOKKEEPING     model_ema.decay, model_ema.num_updates.
    CLIP_POSITION_IDS   ...embeddings.position_ids: arange(77), an old persistent buffer (see clip.py).
    VAE_TRAINING_LOSS   first_stage_model.loss.*: the autoencoder's LPIPS / discriminator loss.
    EMA_NOT_SELECTED    model_ema.*: the UNet's EMA copy, when the non-EMA weights are read (default,
                        as diffusers' from_single_file); `ema=True` (`--ema`) reads it instead, and
    NON_EMA_NOT_SELECTED  then the model.diffusion_model.* copy is the one left unused.
    GLOBAL_STEP         global_step: the training step counter (read by the prediction-type rule).
    OPENCLIP_UNUSED_LAYER, OPENCLIP_TEXT_PROJECTION, OPENCLIP_LOGIT_SCALE   SD 2.x: OpenCLIP's last
                        resblock (SD 2.x runs the penultimate layer), text_projection and logit_scale
                        (clip.openclip_unused, each shape-checked). How many layers are run: the
                        config given (metadata), else resblocks - 1 when text_projection is present
                        (OpenCLIP's whole tower, as Stability ships it), else all of them (a file our
                        writer wrote: it invents no unused layer; diffusers reads it the same).

EMA keys are LDM's LitEma names: `model_ema.` + the UNet key without its `model.` and without
dots (`model.diffusion_model.out.2.bias` -> `model_ema.diffusion_modelout2bias`).

Attention head counts and GroupNorm group counts are not stored in a file. `infer_config`
reads every size from the tensor shapes and takes the rest from the preset whose shapes
match (tiny, sd15, tiny-sd2, sd2-base / sd21), or else the family's values (SD 1.x: 8 UNet
heads; SD 2.x: 64-wide UNet heads, GELU; CLIP head size 64, 32 groups), saying so in
`Reading.notes`. A file written by our exporter carries its config as metadata.

Prediction type (and upcast_attention) are not in the weights either. `read` takes them from,
first to last: the `prediction_type` argument (the CLI's flag), the file's metadata, else diffusers'
from_single_file rule (single_file_utils._legacy_load_scheduler): an SD 2.x file is v_prediction
unless its `global_step` is 875000 (2.x-base), SD 1.x is epsilon. sd2-base and sd21 have equal
shapes: the prediction type picks which (sd21 brings upcast_attention=True and 768 px). The note
says which source decided.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, Mapping

import torch

from scratch_sd.config import PRESETS, CLIPTextConfig, SDConfig, UNetConfig, UnsupportedConfig, VAEConfig
from scratch_sd.convert import clip, unet, vae
from scratch_sd.convert.common import ConversionError, KeyTable, check_shapes, shapes_of
from scratch_sd.names import NETWORKS

Tensor = torch.Tensor

COMPONENTS = NETWORKS  # the three networks a single file holds
UNET, VAE, TEXT = unet.LDM_PREFIX, vae.LDM_PREFIX, clip.LDM_PREFIX
OPENCLIP = clip.OPENCLIP_PREFIX
TEXT_PREFIXES = {"clip": TEXT, "openclip": OPENCLIP}  # text layout -> prefix (SD 1.x, SD 2.x)
PREFIXES = {"text_encoder": TEXT, "vae": VAE, "unet": UNET}  # SD 1.x's; prefixes(layout) for either
SD2_BASE_GLOBAL_STEP = 875000  # diffusers: a v2 file with this global_step is 2.x-base (epsilon)
EMA = "model_ema."
CONFIG_METADATA = "sd_parity_config"  # safetensors metadata key our exporter writes (SDConfig as JSON)

SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
})


class UnsupportedCheckpoint(ConversionError):
    """The file is a checkpoint of another architecture (SDXL, SD 2.x, inpainting, ...)."""


# --------------------------------------------------------------------------- named key rules
@dataclass(frozen=True)
class Rule:
    name: str
    why: str
    match: Callable[[str], bool]


def ema_key(ldm_key: str) -> str:
    """LitEma's name for a UNet key: `model.diffusion_model.a.0.b` -> `model_ema.diffusion_modela0b`."""
    return EMA + "".join(ldm_key.split(".")[1:])


IGNORE_RULES = (
    Rule("DDPM_SCHEDULE", "LDM's training noise schedule buffers (the scheduler config defines it)",
         lambda k: k in SCHEDULE_BUFFERS),
    Rule("EMA_BOOKKEEPING", "the EMA's decay and update counter", lambda k: k in (EMA + "decay", EMA + "num_updates")),
    Rule("CLIP_POSITION_IDS", "arange(77), an unused text-encoder buffer",
         lambda k: k in (TEXT + "text_model." + clip.POSITION_IDS, TEXT + clip.POSITION_IDS)),
    Rule("VAE_TRAINING_LOSS", "the autoencoder's training loss (LPIPS / discriminator)",
         lambda k: k.startswith(VAE + "loss.")),
    Rule("GLOBAL_STEP", "the training step counter (diffusers' prediction-type rule reads it)",
         lambda k: k == "global_step"),
)
EMA_NOT_SELECTED = Rule("EMA_NOT_SELECTED", "the UNet's EMA copy (pass --ema to read it instead)",
                        lambda k: k.startswith(EMA))
NON_EMA_NOT_SELECTED = Rule("NON_EMA_NOT_SELECTED", "the UNet's non-EMA copy (--ema reads the EMA one)",
                            lambda k: k.startswith(UNET))


# --------------------------------------------------------------------------- architecture
def _first(state: Mapping[str, Tensor], pattern: str) -> str | None:
    rx = re.compile(pattern)
    return next((k for k in state if rx.search(k)), None)


def _other_architecture(state: Mapping[str, Tensor]) -> str | None:
    """What the file is, when it is not an SD 1.x checkpoint (None when it may be one)."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state)

    if has("conditioner.embedders.") or has(UNET + "label_emb."):
        return "an SDXL checkpoint (conditioner.embedders.* / model.diffusion_model.label_emb.* keys)"
    if _first(state, r"(^|\.)joint_blocks\."):
        return "an SD3 checkpoint (MMDiT joint_blocks.* keys)"
    if _first(state, r"(^|\.)double_blocks\."):
        return "a Flux checkpoint (double_blocks.* keys)"
    if has("control_model."):
        return "a ControlNet checkpoint (control_model.* keys)"
    if has(OPENCLIP) and has(TEXT):
        return "two text encoders (both cond_stage_model.model.* and cond_stage_model.transformer.* keys)"
    k = UNET + "input_blocks.0.0.weight"
    if k in state and state[k].ndim == 4 and state[k].shape[1] != 4:
        kinds = {9: "an inpainting", 8: "an instruct-pix2pix", 5: "a depth-to-image", 7: "an x4-upscaler"}
        c = state[k].shape[1]
        return f"{kinds.get(c, 'a non-SD 1.x/2.x')} checkpoint (UNet takes {c} input channels, {k})"
    if has("depth_model."):
        return "a depth-to-image checkpoint (depth_model.* keys)"
    for prefix, what in (("down_blocks.", "a diffusers UNet"), ("text_model.", "a transformers text encoder"),
                         ("encoder.down_blocks.", "a diffusers VAE"), ("unet.", "a scratch / diffusers pipeline")):
        if has(prefix) and not has(UNET):
            return f"{what} state dict ({prefix}* keys), not an original single file"
    if "encoder.conv_in.weight" in state and "decoder.conv_out.weight" in state and not has(UNET):
        return "a standalone VAE (encoder.* / decoder.* keys without first_stage_model.)"
    return None


def text_layout(state: Mapping[str, Tensor]) -> str:
    """"openclip" (SD 2.x: cond_stage_model.model.*) or "clip" (SD 1.x), from the keys."""
    return "openclip" if any(k.startswith(OPENCLIP) for k in state) else "clip"


def layout_of(cfg: SDConfig) -> str:
    """The text layout a single file of `cfg` is written in: OpenCLIP's (SD 2.x) for a GELU tower --
    every GELU CLIP text tower of the SD family is OpenCLIP's -- else OpenAI CLIP's (QuickGELU)."""
    return "openclip" if cfg.text.activation == "gelu" else "clip"


def prefixes(layout: str) -> dict[str, str]:
    return {**PREFIXES, "text_encoder": TEXT_PREFIXES[layout]}


def detect_architecture(state: Mapping[str, Tensor]) -> str:
    """The text layout ("clip": SD 1.x, "openclip": SD 2.x); UnsupportedCheckpoint naming what was
    recognised for anything else."""
    other = _other_architecture(state)
    if other:
        raise UnsupportedCheckpoint(f"recognised {other}; only Stable Diffusion 1.x / 2.x single files "
                                    f"(model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.* "
                                    "or cond_stage_model.model.*) are supported")
    layout = text_layout(state)
    missing = [f"{name} ({p}*)" for name, p in prefixes(layout).items()
               if not any(k.startswith(p) for k in state) and not (name == "unet" and any(k.startswith(EMA) for k in state))]
    if len(missing) == len(PREFIXES):
        tops = sorted({k.split(".")[0] for k in state})
        raise UnsupportedCheckpoint(f"recognised no Stable Diffusion 1.x/2.x keys (top-level names: "
                                    f"{', '.join(tops[:8])}{', ...' if len(tops) > 8 else ''})")
    if missing:
        raise ConversionError(f"single file has no weights for {', '.join(missing)}")
    return layout


# --------------------------------------------------------------------------- key selection
@dataclass
class Reading:
    """A single file read into scratch keys (`unet.*`, `vae.*`, `text_encoder.*`)."""

    cfg: SDConfig
    state: dict[str, Tensor]
    ignored: dict[str, list[str]] = field(default_factory=dict)  # rule name -> keys it took
    notes: list[str] = field(default_factory=list)

    def component(self, name: str) -> dict[str, Tensor]:
        return split(self.state)[name]


def _take(state: dict[str, Tensor], rule: Rule, ignored: dict[str, list[str]]) -> dict[str, Tensor]:
    taken = {k for k in state if rule.match(k)}
    if taken:
        ignored.setdefault(rule.name, []).extend(sorted(taken))
    return {k: v for k, v in state.items() if k not in taken}


def select_weights(state: Mapping[str, Tensor], ema: bool = False,
                   cfg: SDConfig | None = None) -> tuple[dict[str, Tensor], dict[str, list[str]], list[str]]:
    """Apply the named rules: (weights under the three LDM prefixes, ignored keys per rule, notes).
    With `ema`, the UNet's EMA copy is renamed to the model.diffusion_model.* keys it stands for."""
    ignored: dict[str, list[str]] = {}
    notes: list[str] = []
    out = dict(state)
    for rule in IGNORE_RULES:
        out = _take(out, rule, ignored)
    has_ema = any(k.startswith(EMA) for k in out)
    has_plain = any(k.startswith(UNET) for k in out)
    if ema:
        if not has_ema:
            raise ConversionError("--ema: the file has no EMA weights (no model_ema.* keys)")
        names = _ema_names(out, cfg)
        out = _take(out, NON_EMA_NOT_SELECTED, ignored)
        out = {names.get(k, k): v for k, v in out.items()}
        notes.append("UNet weights: the EMA copy (model_ema.*), as asked")
    else:
        if has_ema and not has_plain:
            raise ConversionError("the file holds only EMA UNet weights (model_ema.*): pass --ema to read them")
        out = _take(out, EMA_NOT_SELECTED, ignored)
        if has_ema:
            notes.append(f"the file also holds EMA UNet weights ({len(ignored[EMA_NOT_SELECTED.name])} model_ema.* "
                         "keys), not used; pass --ema to use them")
    layout = text_layout(out)
    if layout == "clip":
        out = clip.normalize_ldm_clip_keys(out)  # old files lack the `text_model.` level
    else:
        layers = cfg.text.layers if cfg is not None else clip.openclip_layers_used(out)
        for rule, keys in clip.openclip_unused(out, replace(_infer_openclip(out), layers=layers)).items():
            out = _take(out, Rule(rule, "", lambda k, keys=frozenset(keys): k in keys), ignored)
    unknown = [k for k in out if not any(k.startswith(p) for p in prefixes(layout).values())]
    if unknown:
        raise ConversionError(f"single file has {len(unknown)} keys outside the UNet, VAE and text encoder that no "
                              f"rule covers: {', '.join(sorted(unknown)[:6])}{' ...' if len(unknown) > 6 else ''}")
    return out, ignored, notes


def _ema_names(state: Mapping[str, Tensor], cfg: SDConfig | None) -> dict[str, str]:
    """EMA name -> UNet key. LitEma drops the dots, so where they go comes from the UNet's key table:
    of the config given, else of the non-EMA UNet keys' shapes, else of the preset whose names match."""
    ema = {k for k in state if k.startswith(EMA)}
    if cfg is not None:
        candidates = [cfg.unet]
    elif any(k.startswith(UNET) for k in state):
        candidates = [_infer_unet(state)]
    else:
        candidates = [make().unet for make in PRESETS.values()]
    for ucfg in candidates:
        keys = unet.ldm_table(ucfg).theirs_keys()
        names = {ema_key(k): k for k in keys}
        if len(names) != len(keys):  # pragma: no cover - would make LitEma's own names ambiguous
            raise ConversionError("EMA names are ambiguous for this UNet (two keys differ only by dots)")
        if len(candidates) == 1 or set(names) == ema:
            return names
    raise ConversionError("--ema: the file holds only EMA UNet keys and they match no preset's UNet, so the "
                          "architecture cannot be read from them")


# --------------------------------------------------------------------------- config from shapes
def _indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    rx = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [rx.match(k)] if m})


def _shape(state: Mapping[str, Tensor], key: str) -> torch.Size:
    if key not in state:
        raise ConversionError(f"single file lacks {key} (needed to infer the architecture)")
    return state[key].shape


def _infer_unet(state: Mapping[str, Tensor]) -> UNetConfig:
    u = UNET
    conv_in = _shape(state, u + "input_blocks.0.0.weight")
    blocks = _indices(state, u + "input_blocks.")
    n = 1 + sum(f"{u}input_blocks.{i}.0.op.weight" in state for i in blocks)
    lpb, rem = divmod(len(blocks) - n, n)
    if rem or lpb < 1:
        raise ConversionError(f"single file UNet: {len(blocks)} input blocks do not form {n} levels")
    first = [1 + level * (lpb + 1) for level in range(n)]
    widths = tuple(_shape(state, f"{u}input_blocks.{b}.0.out_layers.3.weight")[0] for b in first)
    attention = tuple(any(k.startswith(f"{u}input_blocks.{b}.1.") for k in state) for b in first)
    depth = tuple(max(1, len(_indices(state, f"{u}input_blocks.{b}.1.transformer_blocks."))) for b in first)
    mid = f"{u}middle_block.1.norm.weight" in state
    if mid and len(_indices(state, f"{u}middle_block.1.transformer_blocks.")) != depth[-1]:
        raise UnsupportedConfig("single file UNet: the mid block's transformer depth differs from the last level's")
    k = _first(state, r"attn2\.to_k\.weight$")
    cross = state[k].shape[1] if k else 768
    k = _first(state, r"\.proj_in\.weight$")
    return UNetConfig(in_channels=conv_in[1], out_channels=_shape(state, u + "out.2.weight")[0], block_out_channels=widths,
                      layers_per_block=lpb, attention_levels=attention, num_heads=1, transformer_depth=depth,
                      cross_attention_dim=cross, norm_groups=1, mid_attention=mid,
                      use_linear_projection=bool(k and state[k].ndim == 2))


def _infer_vae(state: Mapping[str, Tensor]) -> VAEConfig:
    e = VAE + "encoder."
    levels = _indices(state, e + "down.")
    widths = tuple(_shape(state, f"{e}down.{i}.block.0.conv2.weight")[0] for i in levels)
    return VAEConfig(in_channels=_shape(state, e + "conv_in.weight")[1],
                     out_channels=_shape(state, VAE + "decoder.conv_out.weight")[0], block_out_channels=widths,
                     layers_per_block=len(_indices(state, e + "down.0.block.")),
                     latent_channels=_shape(state, VAE + "post_quant_conv.weight")[0], norm_groups=1,
                     mid_attention=e + "mid.attn_1.norm.weight" in state)


def _infer_openclip(state: Mapping[str, Tensor]) -> CLIPTextConfig:
    """SD 2.x text tower: sizes from the OpenCLIP keys (the layers: the resblocks left after the named
    rules), GELU; heads from the preset or the fallback (infer_config)."""
    t = OPENCLIP
    vocab, width = _shape(state, t + "token_embedding.weight")
    return CLIPTextConfig(vocab_size=vocab, width=width, layers=clip.openclip_resblocks(state), heads=1,
                          mlp_width=_shape(state, t + clip.RESBLOCKS + "0.mlp.c_fc.weight")[0],
                          max_positions=_shape(state, t + "positional_embedding")[0], activation="gelu")


def _infer_text(state: Mapping[str, Tensor]) -> CLIPTextConfig:
    if text_layout(state) == "openclip":
        return _infer_openclip(state)
    t = TEXT + "text_model."
    vocab, width = _shape(state, t + "embeddings.token_embedding.weight")
    return CLIPTextConfig(vocab_size=vocab, width=width, layers=len(_indices(state, t + "encoder.layers.")), heads=1,
                          mlp_width=_shape(state, t + "encoder.layers.0.mlp.fc1.weight")[0],
                          max_positions=_shape(state, t + "embeddings.position_embedding.weight")[0])


# Fields a file's shapes cannot tell; taken from the matching preset, else SD 1.x's values.
HIDDEN = {"text": ("heads", "layer_norm_eps", "activation", "bos_token_id", "eos_token_id", "pad_token_id"),
          "vae": ("norm_groups", "norm_eps", "scaling_factor", "sample_size", "force_upcast"),
          "unet": ("num_heads", "norm_groups", "norm_eps", "transformer_norm_eps", "flip_sin_to_cos", "freq_shift",
                   "upcast_attention", "sample_size")}


def _visible(text: CLIPTextConfig, vae_cfg: VAEConfig, unet_cfg: UNetConfig) -> tuple[dict, ...]:
    """The fields a file's shapes determine, per network."""
    parts = (("text", text), ("vae", vae_cfg), ("unet", unet_cfg))
    return tuple({f.name: getattr(sub, f.name) for f in fields(sub) if f.name not in HIDDEN[part]} for part, sub in parts)


def _fallback(text: CLIPTextConfig, vae_cfg: VAEConfig, unet_cfg: UNetConfig, name: str, sd2: bool,
              prediction_type: str) -> tuple[SDConfig, str]:
    """The family's head and group counts, when no preset's shapes match."""
    if text.width % 64:
        raise UnsupportedConfig(f"text width {text.width} is not a multiple of CLIP's head size 64")
    if sd2:  # SD 2.x yaml: num_head_channels 64 (diffusers: attention_head_dim = channels // 64 per level)
        bad = [c for c in unet_cfg.block_out_channels if c % 64]
        if bad:
            raise UnsupportedConfig(f"UNet widths {bad} are not multiples of SD 2.x's head size 64")
        heads = tuple(c // 64 for c in unet_cfg.block_out_channels)
        upcast = prediction_type == "v_prediction"  # as sd21 (768, v) / sd2-base (512, epsilon)
        unet_cfg = replace(unet_cfg, num_heads=heads, norm_groups=32, upcast_attention=upcast)
        what = f"SD 2.x: UNet heads {list(heads)} (64 wide), GELU text, upcast_attention={upcast}"
    else:
        unet_cfg = replace(unet_cfg, num_heads=8, norm_groups=32)
        what = "SD 1.x: 8 UNet heads"
    cfg = SDConfig(name=name, text=replace(text, heads=text.width // 64), vae=replace(vae_cfg, norm_groups=32),
                   unet=unet_cfg, prediction_type=prediction_type)
    return cfg, (f"architecture: inferred from the shapes (no preset matches); head and group counts are not "
                 f"stored in a file, assumed as {what}, {cfg.text.heads} CLIP heads (size 64), 32 norm groups")


def infer_config(state: Mapping[str, Tensor], name: str = "single-file",
                 prediction_type: str = "epsilon") -> tuple[SDConfig, list[str]]:
    """SDConfig from the tensor shapes of a (selected, normalised) single file, and a note on what was
    assumed. Of the presets whose shapes match, the one with `prediction_type` (sd2-base / sd21 differ
    only there); a preset of another prediction type is taken with this one, under `name`."""
    text, vae_cfg, unet_cfg = _infer_text(state), _infer_vae(state), _infer_unet(state)
    seen = _visible(text, vae_cfg, unet_cfg)
    matches = [(n, make()) for n, make in PRESETS.items()]
    matches = [(n, p) for n, p in matches if _visible(p.text, p.vae, p.unet) == seen]
    if matches:
        n, p = next(((n, p) for n, p in matches if p.prediction_type == prediction_type), matches[0])
        if p.prediction_type == prediction_type:
            return replace(p, name=n), [f"architecture: the {n} preset's shapes (head and group counts from it)"]
        return replace(p, name=name, prediction_type=prediction_type), [
            f"architecture: the {n} preset's shapes (head and group counts from it), with "
            f"prediction_type={prediction_type}"]
    try:
        cfg, what = _fallback(text, vae_cfg, unet_cfg, name, text_layout(state) == "openclip", prediction_type)
    except UnsupportedConfig as exc:
        raise UnsupportedConfig(f"single file's shapes fit no preset, and the family's head/group counts do not "
                                f"fit them: {exc}") from None
    return cfg, [what]


def prediction_rule(state: Mapping[str, Tensor], layout: str) -> tuple[str, str]:
    """diffusers' from_single_file rule (_legacy_load_scheduler): (prediction type, why). diffusers
    recognises a v2 file by a 1024-wide context; we by its OpenCLIP keys (so a tiny SD 2.x file too)."""
    if layout != "openclip":
        return "epsilon", "SD 1.x: epsilon (diffusers' from_single_file rule)"
    step = state.get("global_step")
    step = int(step.reshape(-1)[0]) if isinstance(step, Tensor) and step.numel() == 1 else None
    if step == SD2_BASE_GLOBAL_STEP:
        return "epsilon", f"diffusers' from_single_file rule: an SD 2.x file with global_step {step} (2.x-base)"
    return "v_prediction", (f"diffusers' from_single_file rule: an SD 2.x file whose global_step is "
                            f"{step if step is not None else 'absent'}, not {SD2_BASE_GLOBAL_STEP}; a 2.x-base "
                            "file is epsilon: pass --prediction-type epsilon")


def config_to_json(cfg: SDConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def config_from_json(text: str) -> SDConfig:
    try:
        d = json.loads(text)
        return SDConfig(name=d["name"], text=CLIPTextConfig(**d["text"]), vae=VAEConfig(**d["vae"]),
                        unet=UNetConfig(**d["unet"]), image_size=d["image_size"],
                        prediction_type=d.get("prediction_type", "epsilon"))  # files before #18: epsilon
    except UnsupportedConfig:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ConversionError(f"bad {CONFIG_METADATA} metadata ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- the composed table
def ldm_table(cfg: SDConfig, layout: str | None = None) -> KeyTable:
    """The whole single file <-> one scratch state dict with `text_encoder.` / `vae.` / `unet.` keys.
    `layout`: the text tower's naming ("clip" SD 1.x, "openclip" SD 2.x; default `layout_of(cfg)`)."""
    text = clip.openclip_table(cfg.text) if (layout or layout_of(cfg)) == "openclip" else clip.ldm_table(cfg.text)
    parts = [text.prefixed(ours_prefix="text_encoder."),
             vae.ldm_table(cfg.vae).prefixed(ours_prefix="vae."),
             unet.ldm_table(cfg.unet).prefixed(ours_prefix="unet.")]
    return KeyTable([e for t in parts for e in t.entries], theirs_name="LDM single file", ours_name="scratch")


def scratch_shapes(cfg: SDConfig) -> dict[str, torch.Size]:
    """Our parameter shapes for the three networks (built on the meta device)."""
    from scratch_sd.clip import CLIPTextModel
    from scratch_sd.unet import UNet
    from scratch_sd.vae import AutoencoderKL

    with torch.device("meta"):
        nets = {"text_encoder": CLIPTextModel(cfg.text), "vae": AutoencoderKL(cfg.vae), "unet": UNet(cfg.unet)}
    return {f"{name}.{k}": s for name, net in nets.items() for k, s in shapes_of(net).items()}


def ldm_shapes(table: KeyTable, ours: Mapping[str, torch.Size]) -> dict[str, torch.Size]:
    meta = {k: torch.empty(s, device="meta") for k, s in ours.items()}
    return {k: v.shape for k, v in table.to_theirs(meta).items()}


def read(state: Mapping[str, Tensor], ema: bool = False, cfg: SDConfig | None = None, name: str = "single-file",
         prediction_type: str | None = None) -> Reading:
    """A whole single-file state dict -> scratch keys, strictly (every key used or named by a rule).
    `cfg`: the file's own config (metadata); `prediction_type`: what the caller was told (a flag),
    overriding the metadata and diffusers' rule."""
    layout = detect_architecture(state)
    weights, ignored, notes = select_weights(state, ema, cfg)
    if prediction_type is not None:
        pred, why = prediction_type, "as given (--prediction-type)"
    elif cfg is not None:
        pred, why = cfg.prediction_type, "the file's sd_parity_config metadata"
    else:
        pred, why = prediction_rule(state, layout)
    if cfg is None:
        cfg, more = infer_config(weights, name, pred)
        notes += more
    cfg = replace(cfg, prediction_type=pred)
    notes.append(f"prediction type: {pred} ({why})")
    table = ldm_table(cfg, layout)
    ours = scratch_shapes(cfg)
    check_shapes(weights, ldm_shapes(table, ours), table.theirs_name)  # names a missing / mis-shaped LDM key
    return Reading(cfg, table.to_ours(weights, ours), ignored, notes)


def write(state: Mapping[str, Tensor], cfg: SDConfig) -> dict[str, Tensor]:
    """Scratch keys (`unet.*`, `vae.*`, `text_encoder.*`) -> an original single file's keys, strictly:
    SD 1.x's layout, or SD 2.x's (OpenCLIP text keys) for a GELU text tower. An SD 2.x file holds the
    layers run and nothing invented (no unused last resblock, no text_projection)."""
    table = ldm_table(cfg)
    ours = scratch_shapes(cfg)
    check_shapes(state, ours, table.ours_name)
    return table.to_theirs(state, ldm_shapes(table, ours))


# --------------------------------------------------------------------------- scratch layout
def split(state: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """`unet.x` / `vae.x` / `text_encoder.x` keys -> {component: {x: tensor}} (all three present)."""
    out: dict[str, dict[str, Tensor]] = {name: {} for name in COMPONENTS}
    for k, v in state.items():
        name, _, rest = k.partition(".")
        if name not in out or not rest:
            raise ConversionError(f"scratch state dict key {k!r} does not start with a component "
                                  f"({', '.join(COMPONENTS)})")
        out[name][rest] = v
    return out


def join(states: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    return {f"{name}.{k}": v for name, s in states.items() for k, v in s.items()}


def schedule_matches_sd15(state: Mapping[str, Tensor]) -> bool | None:
    """Whether the file's `alphas_cumprod` is SD 1.x's scaled_linear(0.00085, 0.012, 1000); None if absent."""
    a = state.get("alphas_cumprod")
    if a is None:
        return None
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    want = torch.cumprod(1.0 - betas, dim=0)
    return a.shape == want.shape and bool(torch.allclose(a.double(), want, rtol=1e-4, atol=1e-7))


__all__ = ["read", "write", "ldm_table", "infer_config", "detect_architecture", "select_weights", "split", "join",
           "Reading", "UnsupportedCheckpoint", "IGNORE_RULES", "ema_key", "config_to_json", "config_from_json",
           "scratch_shapes", "schedule_matches_sd15", "CONFIG_METADATA", "COMPONENTS", "text_layout", "layout_of",
           "prediction_rule", "prefixes"]
