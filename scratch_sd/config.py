"""Configs for the three networks. Defaults are Stable Diffusion 1.5.

One frozen dataclass per network, plus `SDConfig` bundling them, and the presets:
`tiny()` (whole test suites in seconds on 2 CPU cores) and `sd15()`; the SD 2.x family
`sd2_base()`, `sd21()` and `tiny_sd2()` (every SD 2.x difference at toy width; docs/sd2.md).

Each config maps to and from the reference library's config dict
(`to_reference()` / `from_reference()`), so that a diffusers `UNet2DConditionModel`
/ `AutoencoderKL` config or a transformers `CLIPTextConfig` of the SD 1.x family
maps onto ours; an option outside that family is a ValueError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


class UnsupportedConfig(ValueError):
    """A reference config uses an option this implementation does not have."""


def _tuple(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedConfig(f"{name} has {len(value)} entries, expected one per level ({n})")
        return tuple(value)
    return (value,) * n


# --------------------------------------------------------------------------- CLIP
@dataclass(frozen=True)
class CLIPTextConfig:
    """CLIP ViT-L/14 text tower as used by SD 1.x."""

    vocab_size: int = 49408
    width: int = 768  # hidden size
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072  # 4 * width
    max_positions: int = 77  # the tokenizer pads every prompt to this length
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # x * sigmoid(1.702 x); "gelu" is the exact erf GELU
    # SD 1.x checkpoints carry bos/eos/pad 0/2/1 in the text-encoder config (the tokenizer
    # itself uses 49406/49407). eos_token_id == 2 selects legacy pooling: argmax(input_ids).
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self):
        if self.width % self.heads:
            raise UnsupportedConfig(f"width {self.width} is not divisible by heads {self.heads}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise UnsupportedConfig(f"hidden_act={self.activation!r} is not supported (quick_gelu, gelu)")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_reference(self) -> dict[str, Any]:
        """kwargs for transformers.CLIPTextConfig."""
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.width, intermediate_size=self.mlp_width,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            max_position_embeddings=self.max_positions, hidden_act=self.activation,
            layer_norm_eps=self.layer_norm_eps, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            projection_dim=self.width, attention_dropout=0.0, dropout=0.0,
        )

    @classmethod
    def from_reference(cls, cfg: dict[str, Any]) -> "CLIPTextConfig":
        for key, ok in (("attention_dropout", 0.0), ("dropout", 0.0)):
            if cfg.get(key, ok) not in (ok, None):
                raise UnsupportedConfig(f"text encoder option {key}={cfg[key]!r} is not supported (only {ok!r})")
        return cls(
            vocab_size=cfg.get("vocab_size", 49408), width=cfg.get("hidden_size", 768),
            layers=cfg.get("num_hidden_layers", 12), heads=cfg.get("num_attention_heads", 12),
            mlp_width=cfg.get("intermediate_size", 3072),
            max_positions=cfg.get("max_position_embeddings", 77),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), activation=cfg.get("hidden_act", "quick_gelu"),
            bos_token_id=cfg.get("bos_token_id", 0), eos_token_id=cfg.get("eos_token_id", 2),
            pad_token_id=cfg.get("pad_token_id", 1),
        )


# --------------------------------------------------------------------------- VAE
@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (KL-f8) of SD 1.x."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder; the decoder has layers_per_block + 1 per level
    latent_channels: int = 4
    norm_groups: int = 32
    norm_eps: float = 1e-6  # every GroupNorm in the VAE
    scaling_factor: float = 0.18215  # latents = scaling_factor * posterior sample
    mid_attention: bool = True
    sample_size: int = 512
    force_upcast: bool = True  # diffusers decodes in fp32 when the model is fp16

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        bad = [c for c in self.block_out_channels if c % self.norm_groups]
        if bad:
            raise UnsupportedConfig(f"VAE channels {bad} are not divisible by norm_groups {self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_reference(self) -> dict[str, Any]:
        """kwargs for diffusers.AutoencoderKL."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=self.in_channels, out_channels=self.out_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            act_fn="silu", latent_channels=self.latent_channels, norm_num_groups=self.norm_groups,
            sample_size=self.sample_size, scaling_factor=self.scaling_factor,
            mid_block_add_attention=self.mid_attention, force_upcast=self.force_upcast,
        )

    @classmethod
    def from_reference(cls, cfg: dict[str, Any]) -> "VAEConfig":
        n = len(cfg.get("block_out_channels", (128, 256, 512, 512)))
        checks = {
            "down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
            "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
            "shift_factor": None, "latents_mean": None, "latents_std": None,
        }
        for key, ok in checks.items():
            if key in cfg and _norm(cfg[key]) != _norm(ok):
                raise UnsupportedConfig(f"VAE option {key}={cfg[key]!r} is not supported (only {ok!r})")
        return cls(
            in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
            block_out_channels=tuple(cfg.get("block_out_channels", (128, 256, 512, 512))),
            layers_per_block=cfg.get("layers_per_block", 2), latent_channels=cfg.get("latent_channels", 4),
            norm_groups=cfg.get("norm_num_groups", 32), scaling_factor=cfg.get("scaling_factor", 0.18215),
            mid_attention=cfg.get("mid_block_add_attention", True), sample_size=_first(cfg.get("sample_size", 512)),
            force_upcast=cfg.get("force_upcast", True),
        )


# --------------------------------------------------------------------------- UNet
@dataclass(frozen=True)
class UNetConfig:
    """The SD 1.x UNet family (UNet2DConditionModel with cross-attention)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2  # resnets per down level; up levels have one more
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # down level i has cross-attention
    num_heads: tuple[int, ...] | int = 8  # per level (diffusers' legacy name: attention_head_dim)
    transformer_depth: tuple[int, ...] | int = 1  # transformer blocks per attention, per level
    cross_attention_dim: int = 768
    norm_groups: int = 32
    norm_eps: float = 1e-5  # resnet GroupNorms
    transformer_norm_eps: float = 1e-6  # the GroupNorm in front of each transformer
    use_linear_projection: bool = False  # SD 1.x: 1x1 conv proj_in/out; SD 2.x: linear
    mid_attention: bool = True
    flip_sin_to_cos: bool = True  # timestep embedding is [cos, sin]
    freq_shift: float = 0.0
    upcast_attention: bool = False  # recorded; the SDPA reference path ignores it
    sample_size: int = 64

    def __post_init__(self):
        n = len(self.block_out_channels)
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attention_levels", _tuple(self.attention_levels, n, "attention_levels"))
        object.__setattr__(self, "num_heads", _tuple(self.num_heads, n, "num_heads"))
        object.__setattr__(self, "transformer_depth", _tuple(self.transformer_depth, n, "transformer_depth"))
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.num_heads)):
            if c % h:
                raise UnsupportedConfig(f"level {i}: {c} channels not divisible by {h} heads")
            if c % self.norm_groups:
                raise UnsupportedConfig(f"level {i}: {c} channels not divisible by norm_groups {self.norm_groups}")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def to_reference(self) -> dict[str, Any]:
        """kwargs for diffusers.UNet2DConditionModel."""
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.attention_levels))
        return dict(
            sample_size=self.sample_size, in_channels=self.in_channels, out_channels=self.out_channels,
            flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
            down_block_types=down, up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn" if self.mid_attention else None,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_groups, norm_eps=self.norm_eps,
            cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_depth,
            attention_head_dim=self.num_heads, use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
        )

    @classmethod
    def from_reference(cls, cfg: dict[str, Any]) -> "UNetConfig":
        blocks = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(blocks)
        down = tuple(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        up = tuple(cfg.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
        for name in down:
            if name not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise UnsupportedConfig(f"UNet option down_block_types contains {name!r}")
        attention = tuple(d == "CrossAttnDownBlock2D" for d in down)
        expected_up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
        if up != expected_up:
            raise UnsupportedConfig(f"UNet option up_block_types={up!r} does not mirror down_block_types (expected {expected_up!r})")
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in ("UNetMidBlock2DCrossAttn", None):
            raise UnsupportedConfig(f"UNet option mid_block_type={mid!r} is not supported")
        # Options that must keep their SD 1.x value: key -> allowed values.
        fixed = {
            "center_input_sample": (False,), "only_cross_attention": (False,), "downsample_padding": (1,),
            "mid_block_scale_factor": (1, 1.0), "dropout": (0, 0.0), "act_fn": ("silu",),
            "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
            "class_embed_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
            "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
            "resnet_out_scale_factor": (1, 1.0), "time_embedding_type": ("positional",),
            "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
            "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
            "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
            "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
            "cross_attention_norm": (None,), "num_attention_heads": (None,),
            "reverse_transformer_layers_per_block": (None,), "addition_time_embed_dim": (None,),
        }
        for key, allowed in fixed.items():
            if key in cfg and cfg[key] not in allowed:
                raise UnsupportedConfig(f"UNet option {key}={cfg[key]!r} is not supported (only {allowed[0]!r})")
        cross = cfg.get("cross_attention_dim", 1280)
        if isinstance(cross, (list, tuple)):
            if len(set(cross)) != 1:
                raise UnsupportedConfig(f"UNet option cross_attention_dim={cross!r}: per-level widths are not supported")
            cross = cross[0]
        lpb = cfg.get("layers_per_block", 2)
        if isinstance(lpb, (list, tuple)):
            if len(set(lpb)) != 1:
                raise UnsupportedConfig(f"UNet option layers_per_block={lpb!r}: per-level counts are not supported")
            lpb = lpb[0]
        depth = cfg.get("transformer_layers_per_block", 1)
        if isinstance(depth, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in depth):
            raise UnsupportedConfig("UNet option transformer_layers_per_block: nested per-block depths are not supported")
        return cls(
            in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            block_out_channels=blocks, layers_per_block=lpb, attention_levels=attention,
            num_heads=_tuple(cfg.get("attention_head_dim", 8), n, "attention_head_dim"),
            transformer_depth=_tuple(depth, n, "transformer_layers_per_block"),
            cross_attention_dim=cross, norm_groups=cfg.get("norm_num_groups", 32) or 32,
            norm_eps=cfg.get("norm_eps", 1e-5), use_linear_projection=cfg.get("use_linear_projection", False),
            mid_attention=mid is not None, flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0), upcast_attention=cfg.get("upcast_attention", False) or False,
            sample_size=_first(cfg.get("sample_size", 64) or 64),
        )


# --------------------------------------------------------------------------- whole model
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what a UNet may predict (diffusers' names)


@dataclass(frozen=True)
class SDConfig:
    name: str = "sd15"
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    image_size: int = 512  # default generation size (pixels)
    # What the UNet's output means to the scheduler: "epsilon" (SD 1.x, SD 2.x-base) or "v_prediction"
    # (SD 2.x 768). Not a network property (no weight shows it): it goes into the scheduler config of
    # both sides of every comparison (parity.references), as diffusers reads it from scheduler_config.json.
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UnsupportedConfig(f"prediction_type={self.prediction_type!r} is not supported "
                                    f"({', '.join(PREDICTION_TYPES)})")
        if self.unet.cross_attention_dim != self.text.width:
            raise UnsupportedConfig(
                f"UNet cross_attention_dim {self.unet.cross_attention_dim} != text width {self.text.width}")
        if self.unet.in_channels != self.vae.latent_channels:
            raise UnsupportedConfig(
                f"UNet in_channels {self.unet.in_channels} != VAE latent_channels {self.vae.latent_channels}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample_factor


def sd15() -> SDConfig:
    return SDConfig()


def tiny() -> SDConfig:
    """Every structural feature of SD 1.5 (4 UNet levels, attention on the first three,
    a mid transformer, a 4-level f8 VAE with mid attention, a causal CLIP) at toy width."""
    text = CLIPTextConfig(vocab_size=49408, width=32, layers=2, heads=4, mlp_width=64)
    vae = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8, sample_size=64)
    unet = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, num_heads=2,
                      cross_attention_dim=32, norm_groups=8, sample_size=8)
    return SDConfig(name="tiny", text=text, vae=vae, unet=unet, image_size=64)


def _sd2_text() -> CLIPTextConfig:
    """The SD 2.x text tower as diffusers ships it (stabilityai/stable-diffusion-2-1 text_encoder/config.json):
    OpenCLIP ViT-H/14's text transformer run as a transformers CLIPTextModel."""
    return CLIPTextConfig(
        width=1024, heads=16, mlp_width=4096,  # ViT-H text width; 4 * width
        layers=23,  # OpenCLIP ViT-H has 24; SD 2.x conditions on the penultimate, so the 24th is not shipped
        activation="gelu",  # OpenCLIP uses the exact erf GELU, not CLIP's QuickGELU
        # bos/eos/pad 0/2/1 as SD 1.x's config (legacy argmax pooling; the pooled output is unused by SD).
        # The final LayerNorm is CLIPTextModel's own final_layer_norm (OpenCLIP's ln_final), as in SD 1.x.
    )


def _sd2_unet(sample_size: int, upcast: bool) -> UNetConfig:
    return UNetConfig(
        num_heads=(5, 10, 20, 20),  # diffusers' attention_head_dim [5, 10, 20, 20] holds HEAD COUNTS (64 wide each)
        cross_attention_dim=1024,  # the SD 2.x text width
        use_linear_projection=True,  # proj_in/proj_out are nn.Linear over tokens, not 1x1 convs
        upcast_attention=upcast,  # diffusers' flag; the SDPA processor it runs ignores it (docs/sd2.md)
        sample_size=sample_size,
    )


def sd2_base() -> SDConfig:
    """stabilityai/stable-diffusion-2-base (and 2-1-base): 512 px, epsilon, no upcast flag."""
    return SDConfig(name="sd2-base", text=_sd2_text(), unet=_sd2_unet(64, False), image_size=512)


def sd21() -> SDConfig:
    """stabilityai/stable-diffusion-2-1: 768 px, v-prediction, upcast_attention=True."""
    return SDConfig(name="sd21", text=_sd2_text(), vae=VAEConfig(sample_size=768),  # VAE otherwise as SD 1.x
                    unet=_sd2_unet(96, True),  # 96 latents = 768 px / 8
                    image_size=768, prediction_type="v_prediction")


def tiny_sd2() -> SDConfig:
    """Every SD 2.x difference at tiny's width: GELU text tower (with its final LayerNorm), linear
    proj_in/proj_out, a different head count at every level, upcast_attention, v-prediction."""
    text = CLIPTextConfig(vocab_size=49408, width=32, layers=3, heads=4, mlp_width=64,  # 3: an odd depth, as 23
                          activation="gelu")
    vae = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8, sample_size=64)
    unet = UNetConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                      num_heads=(1, 2, 4, 8),  # head width 32, 32, 16, 8: a head-count slip at any level shows
                      cross_attention_dim=32, norm_groups=8, use_linear_projection=True, upcast_attention=True,
                      sample_size=8)
    return SDConfig(name="tiny-sd2", text=text, vae=vae, unet=unet, image_size=64, prediction_type="v_prediction")


PRESETS = {"tiny": tiny, "sd15": sd15, "tiny-sd2": tiny_sd2, "sd2-base": sd2_base, "sd21": sd21}
TINY_PRESETS = ("tiny", "tiny-sd2")  # toy width: the gate's defaults are size 64, 4 steps; fp16 runs on a CPU


def preset(name: str) -> SDConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def _norm(value):
    return tuple(value) if isinstance(value, list) else value


__all__ = [
    "CLIPTextConfig", "VAEConfig", "UNetConfig", "SDConfig", "UnsupportedConfig", "tiny", "sd15", "sd2_base", "sd21",
    "tiny_sd2", "preset", "TINY_PRESETS", "PREDICTION_TYPES",
    "PRESETS", "replace",
]
