"""Configs: SD 1.5 defaults, presets, and the mapping to and from the reference configs."""
import dataclasses

import pytest

from scratch_sd.config import (CLIPTextConfig, SDConfig, UNetConfig, UnsupportedConfig, VAEConfig, preset, sd15,
                               tiny)


def test_sd15_defaults_are_the_reference_model():
    c = sd15()
    assert (c.text.vocab_size, c.text.width, c.text.layers, c.text.heads, c.text.max_positions) == (49408, 768, 12, 12, 77)
    assert c.text.activation == "quick_gelu"
    assert c.vae.block_out_channels == (128, 256, 512, 512) and c.vae.layers_per_block == 2
    assert c.vae.latent_channels == 4 and c.vae.scaling_factor == 0.18215 and c.vae.norm_eps == 1e-6
    u = c.unet
    assert u.block_out_channels == (320, 640, 1280, 1280) and u.layers_per_block == 2
    assert u.num_heads == (8, 8, 8, 8) and u.cross_attention_dim == 768
    assert u.attention_levels == (True, True, True, False)
    assert (u.norm_eps, u.transformer_norm_eps) == (1e-5, 1e-6)
    assert c.latent_size == 64


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        sd15().unet.norm_eps = 1e-6


@pytest.mark.parametrize("make", [tiny, sd15])
def test_reference_round_trip(make):
    c = make()
    assert UNetConfig.from_reference(c.unet.to_reference()) == c.unet
    assert VAEConfig.from_reference(c.vae.to_reference()) == c.vae
    assert CLIPTextConfig.from_reference(c.text.to_reference()) == c.text


def test_real_diffusers_model_configs_map(tiny_cfg):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel(**tiny_cfg.unet.to_reference())
    assert UNetConfig.from_reference(dict(unet.config)) == tiny_cfg.unet
    vae = AutoencoderKL(**tiny_cfg.vae.to_reference())
    assert VAEConfig.from_reference(dict(vae.config)) == tiny_cfg.vae


def test_sd15_unet_json_maps():
    # The published SD 1.5 unet/config.json (values as shipped).
    sd15_unet_json = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
        "cross_attention_dim": 768, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                         "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    assert UNetConfig.from_reference(sd15_unet_json) == sd15().unet


def test_sd2_style_heads_per_level():
    c = UNetConfig.from_reference({"attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
                                   "cross_attention_dim": 1024})
    assert c.num_heads == (5, 10, 20, 20) and c.use_linear_projection


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"), ("time_cond_proj_dim", 256),
    ("resnet_time_scale_shift", "scale_shift"), ("conv_in_kernel", 7), ("only_cross_attention", True),
])
def test_unsupported_unet_option_is_named(key, value):
    with pytest.raises(UnsupportedConfig, match=key):
        UNetConfig.from_reference({key: value})


def test_unsupported_block_type_is_named():
    with pytest.raises(UnsupportedConfig, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.from_reference({"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})


def test_inconsistent_bundle_rejected():
    with pytest.raises(UnsupportedConfig, match="cross_attention_dim"):
        SDConfig(unet=UNetConfig(cross_attention_dim=1024))


def test_preset_lookup():
    assert preset("tiny") == tiny() and preset("sd15") == sd15()
    with pytest.raises(ValueError, match="unknown preset 'sd99'"):
        preset("sd99")
