"""Original single-file checkpoints (`v1-5-pruned-emaonly.safetensors` / `.ckpt`) <-> scratch.

An original (CompVis LDM) Stable Diffusion 1.x checkpoint holds the three networks in
one flat state dict, under three prefixes:

    model.diffusion_model.*          UNet              (scratch_sd/convert/unet.py: ldm_table)
    first_stage_model.*              VAE               (scratch_sd/convert/vae.py: ldm_table)
    cond_stage_model.transformer.*   CLIP text encoder (scratch_sd/convert/clip.py: ldm_table)

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

EMA keys are LDM's LitEma names: `model_ema.` + the UNet key without its `model.` and without
dots (`model.diffusion_model.out.2.bias` -> `model_ema.diffusion_modelout2bias`).

Attention head counts and GroupNorm group counts are not stored in a file. `infer_config`
reads every size from the tensor shapes and takes the rest from the preset whose shapes
match (tiny, sd15), or else SD 1.x's values (8 UNet heads, CLIP head size 64, 32 groups),
saying so in `Reading.notes`. A file written by our exporter carries its config as metadata.
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
PREFIXES = {"text_encoder": TEXT, "vae": VAE, "unet": UNET}
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
    if has("cond_stage_model.model."):
        return "an SD 2.x checkpoint (OpenCLIP text encoder: cond_stage_model.model.* keys)"
    k = _first(state, r"^(model\.diffusion_model\.|model_ema\.).*attn2\.?to_?k\.?weight$")
    if k is not None and state[k].ndim == 2 and state[k].shape[1] == 1024:
        return f"an SD 2.x checkpoint (UNet cross-attention context 1024 wide: {k})"
    k = _first(state, r"^model\.diffusion_model\..*\.proj_in\.weight$")
    if k is not None and state[k].ndim == 2:
        return f"an SD 2.x checkpoint (UNet linear proj_in, use_linear_projection: {k})"
    k = UNET + "input_blocks.0.0.weight"
    if k in state and state[k].ndim == 4 and state[k].shape[1] != 4:
        kinds = {9: "an inpainting", 8: "an instruct-pix2pix", 5: "a depth-to-image", 7: "an x4-upscaler"}
        c = state[k].shape[1]
        return f"{kinds.get(c, 'a non-SD 1.x')} checkpoint (UNet takes {c} input channels, {k})"
    if has("depth_model."):
        return "a depth-to-image checkpoint (depth_model.* keys)"
    for prefix, what in (("down_blocks.", "a diffusers UNet"), ("text_model.", "a transformers text encoder"),
                         ("encoder.down_blocks.", "a diffusers VAE"), ("unet.", "a scratch / diffusers pipeline")):
        if has(prefix) and not has(UNET):
            return f"{what} state dict ({prefix}* keys), not an original single file"
    if "encoder.conv_in.weight" in state and "decoder.conv_out.weight" in state and not has(UNET):
        return "a standalone VAE (encoder.* / decoder.* keys without first_stage_model.)"
    return None


def detect_architecture(state: Mapping[str, Tensor]) -> None:
    """Raise UnsupportedCheckpoint naming what was recognised, unless this is an SD 1.x single file."""
    other = _other_architecture(state)
    if other:
        raise UnsupportedCheckpoint(f"recognised {other}; only Stable Diffusion 1.x single files "
                                    f"(model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*) "
                                    "are supported")
    missing = [f"{name} ({p}*)" for name, p in PREFIXES.items()
               if not any(k.startswith(p) for k in state) and not (name == "unet" and any(k.startswith(EMA) for k in state))]
    if len(missing) == len(PREFIXES):
        tops = sorted({k.split(".")[0] for k in state})
        raise UnsupportedCheckpoint(f"recognised no Stable Diffusion 1.x keys (top-level names: {', '.join(tops[:8])}"
                                    f"{', ...' if len(tops) > 8 else ''})")
    if missing:
        raise ConversionError(f"single file has no weights for {', '.join(missing)}")


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
    out = clip.normalize_ldm_clip_keys(out)  # old files lack the `text_model.` level
    unknown = [k for k in out if not any(k.startswith(p) for p in PREFIXES.values())]
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


def _infer_text(state: Mapping[str, Tensor]) -> CLIPTextConfig:
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


def infer_config(state: Mapping[str, Tensor], name: str = "single-file") -> tuple[SDConfig, list[str]]:
    """SDConfig from the tensor shapes of a (selected, normalised) single file, and a note on what was assumed."""
    text, vae_cfg, unet_cfg = _infer_text(state), _infer_vae(state), _infer_unet(state)
    seen = _visible(text, vae_cfg, unet_cfg)
    for preset_name, make in PRESETS.items():
        p = make()
        if _visible(p.text, p.vae, p.unet) == seen:
            return replace(p, name=preset_name), [f"architecture: the {preset_name} preset's shapes "
                                                       "(head and group counts from it)"]
    try:  # SD 1.x: CLIP head size 64, 8 UNet heads per level, 32 GroupNorm groups
        if text.width % 64:
            raise UnsupportedConfig(f"text width {text.width} is not a multiple of CLIP's head size 64")
        cfg = SDConfig(name=name, text=replace(text, heads=text.width // 64), vae=replace(vae_cfg, norm_groups=32),
                       unet=replace(unet_cfg, num_heads=8, norm_groups=32))
    except UnsupportedConfig as exc:
        raise UnsupportedConfig(f"single file's shapes fit no preset, and SD 1.x's head/group counts do not fit "
                                f"them: {exc}") from None
    return cfg, ["architecture: inferred from the shapes (no preset matches); head and group counts are not "
                 f"stored in a file, assumed as SD 1.x: 8 UNet heads, {cfg.text.heads} CLIP heads (size 64), "
                 "32 norm groups"]


def config_to_json(cfg: SDConfig) -> str:
    return json.dumps(asdict(cfg), sort_keys=True)


def config_from_json(text: str) -> SDConfig:
    try:
        d = json.loads(text)
        return SDConfig(name=d["name"], text=CLIPTextConfig(**d["text"]), vae=VAEConfig(**d["vae"]),
                        unet=UNetConfig(**d["unet"]), image_size=d["image_size"])
    except UnsupportedConfig:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise ConversionError(f"bad {CONFIG_METADATA} metadata ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- the composed table
def ldm_table(cfg: SDConfig) -> KeyTable:
    """The whole single file <-> one scratch state dict with `text_encoder.` / `vae.` / `unet.` keys."""
    parts = [clip.ldm_table(cfg.text).prefixed(ours_prefix="text_encoder."),
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


def read(state: Mapping[str, Tensor], ema: bool = False, cfg: SDConfig | None = None, name: str = "single-file") -> Reading:
    """A whole single-file state dict -> scratch keys, strictly (every key used or named by a rule)."""
    detect_architecture(state)
    weights, ignored, notes = select_weights(state, ema, cfg)
    if cfg is None:
        cfg, more = infer_config(weights, name)
        notes += more
    table = ldm_table(cfg)
    ours = scratch_shapes(cfg)
    check_shapes(weights, ldm_shapes(table, ours), table.theirs_name)  # names a missing / mis-shaped LDM key
    return Reading(cfg, table.to_ours(weights, ours), ignored, notes)


def write(state: Mapping[str, Tensor], cfg: SDConfig) -> dict[str, Tensor]:
    """Scratch keys (`unet.*`, `vae.*`, `text_encoder.*`) -> an original single file's keys, strictly."""
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
           "scratch_shapes", "schedule_matches_sd15", "CONFIG_METADATA", "COMPONENTS"]
