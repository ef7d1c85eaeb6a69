"""The scratch UNet against diffusers' UNet2DConditionModel: config mapping, key tables
(diffusers and original LDM, the latter checked against diffusers' own converter), strict
loading, fp32 parity across timesteps / seeds / SD 1.x variants, bf16, and the localiser's
module pairs. tiny runs in CI; sd15 parity is marked slow (16x16 latents, batch 2)."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from parity.metrics import compare
from parity.zoo import reference_unet
from scratch_sd import layers
from scratch_sd.config import UNetConfig, UnsupportedConfig, preset, replace, tiny
from scratch_sd.convert import unet as cu
from scratch_sd.convert.common import ConversionError, load_strict, shapes_of
from scratch_sd.unet import UNet, timestep_embedding, timesteps_tensor

MAX_REL_L2, MIN_PSNR = 1e-5, 90.0  # fp32 parity bar (design.md); never loosened
SEEDS = (0, 1, 2)
# Every form a caller may pass: python ints and floats (745.3 must not become 745),
# 0-d tensors of several dtypes, and (B,) tensors with one timestep per sample.
TIMESTEPS = [
    0, 1, 250, 745, 745.3, 999, 999.0, 0.5,
    torch.tensor(500), torch.tensor(745.3), torch.tensor(745.3, dtype=torch.float64),
    torch.tensor([3, 997]), torch.tensor([0.5, 998.7]),
]


# --------------------------------------------------------------------------- helpers
def unet_cfg(**overrides) -> UNetConfig:
    """tiny's UNet with some fields changed (per-level fields given for the new level count)."""
    base = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, num_heads=2,
                cross_attention_dim=32, norm_groups=8, sample_size=8)
    return UNetConfig(**{**base, **overrides})


# SD 1.x-family variants; each must build in both implementations and match.
VARIANTS = {
    "widths": unet_cfg(block_out_channels=(16, 32, 48), attention_levels=(True, True, False)),
    "layers_per_block_2": unet_cfg(layers_per_block=2),
    "attention_on_some_levels": unet_cfg(attention_levels=(False, True, False, True)),
    "heads_per_level": unet_cfg(num_heads=(1, 2, 4, 8)),
    "transformer_depth_2": unet_cfg(transformer_depth=2),
    "depth_per_level": unet_cfg(transformer_depth=(1, 2, 3, 2), layers_per_block=2),
    "linear_projection": unet_cfg(use_linear_projection=True),
    "no_mid_block": unet_cfg(mid_attention=False),
    "sin_cos_shift_1": unet_cfg(flip_sin_to_cos=False, freq_shift=1),
}


def reference_for(ucfg: UNetConfig, seed: int = 0):
    return reference_unet(replace(tiny(), unet=ucfg), seed)


def scratch_from(ref, ucfg: UNetConfig) -> UNet:
    """Our UNet with the reference's weights (built on meta: no random init to pay for)."""
    with torch.device("meta"):
        model = UNet(ucfg)
    return load_strict(model.to_empty(device="cpu"), cu.from_diffusers(ref.state_dict(), ucfg)).eval()


@functools.lru_cache(maxsize=None)
def variant_pair(name: str):
    """(reference, scratch) for a variant (or "tiny"), seeded weights, built once per session."""
    ucfg = VARIANTS[name] if name in VARIANTS else tiny().unet
    ref = reference_for(ucfg, seed=1)
    return ref, scratch_from(ref, ucfg)


def meta_pair(ucfg: UNetConfig):
    """diffusers and scratch UNets on the meta device: keys and shapes, no weights, no cost."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**ucfg.to_reference()), UNet(ucfg)


def inputs(ucfg: UNetConfig, seed: int, size: int | tuple[int, int] = 8, batch: int = 2, tokens: int = 77):
    g = torch.Generator().manual_seed(seed)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, ucfg.in_channels, h, w, generator=g)
    context = torch.randn(batch, tokens, ucfg.cross_attention_dim, generator=g)
    return x, context


@torch.no_grad()
def run_both(ref, ours, x, t, context):
    return ref(x, t, context).sample, ours(x, t, context)


def assert_parity(ref: torch.Tensor, out: torch.Tensor, what: str):
    err = compare(ref, out)
    assert err.finite and err.rel_l2 <= MAX_REL_L2 and err.psnr_db >= MIN_PSNR, f"{what}: {err}"
    return err


@pytest.fixture(scope="module")
def tiny_pair(tiny_cfg):
    ref = reference_unet(tiny_cfg)
    return ref, scratch_from(ref, tiny_cfg.unet)


# --------------------------------------------------------------------------- config mapping
@pytest.mark.parametrize("name", ["tiny", "sd15"])
def test_config_maps_back_from_the_reference(name):
    ucfg = preset(name).unet
    ref, _ = meta_pair(ucfg)
    assert UNetConfig.from_reference(dict(ref.config)) == ucfg


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_config_maps_back_from_the_reference(name):
    ref, _ = meta_pair(VARIANTS[name])
    assert UNetConfig.from_reference(dict(ref.config)) == VARIANTS[name]


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
])
def test_unsupported_reference_option_is_named(key, value):
    ref_cfg = dict(tiny().unet.to_reference(), **{key: value})
    with pytest.raises(UnsupportedConfig, match=key):
        UNetConfig.from_reference(ref_cfg)


# --------------------------------------------------------------------------- key tables
def _assert_table_covers(table, theirs_state, ours_state):
    theirs, mine = table.theirs_keys(), table.ours_keys()
    assert len(set(theirs)) == len(theirs) and len(set(mine)) == len(mine)
    assert set(theirs) == set(theirs_state), sorted(set(theirs) ^ set(theirs_state))[:10]
    assert set(mine) == set(ours_state), sorted(set(mine) ^ set(ours_state))[:10]


@pytest.mark.parametrize("name", ["tiny", "sd15", *sorted(VARIANTS)])
def test_diffusers_table_is_one_to_one_and_covers_both_models(name):
    ucfg = VARIANTS[name] if name in VARIANTS else preset(name).unet
    ref, ours = meta_pair(ucfg)
    table = cu.diffusers_table(ucfg)
    _assert_table_covers(table, ref.state_dict(), ours.state_dict())
    # fused: per transformer block one qkv (3 keys) and one kv (2 keys), weights only
    blocks = sum(k.endswith("attn1.qkv.weight") for k in table.ours_keys())
    fused = [e for e in table.entries if e.transform == "cat"]
    assert len(fused) == 2 * blocks and sum(len(e.theirs) for e in fused) == 5 * blocks
    # and the converted shapes are exactly the models' shapes, both ways
    meta_theirs = {k: v for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in table.to_ours(meta_theirs).items()} == shapes_of(ours)


def test_sd15_table_sizes(sd15_cfg):
    table = cu.diffusers_table(sd15_cfg.unet)
    assert len(table.theirs_keys()) == 686  # UNet2DConditionModel for SD 1.5
    assert sum(k.endswith("attn1.qkv.weight") for k in table.ours_keys()) == 16  # 6 down + 1 mid + 9 up


def test_roundtrip_is_identity_and_loads_strict(tiny_pair, tiny_cfg):
    ref, ours = tiny_pair
    state = ref.state_dict()
    mine = cu.from_diffusers(state, tiny_cfg.unet)
    back = cu.to_diffusers(mine, tiny_cfg.unet)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    # ours -> diffusers loads into a fresh reference with strict=True
    fresh = reference_unet(tiny_cfg, seed=7)
    assert not torch.equal(fresh.conv_in.weight, ref.conv_in.weight)
    fresh.load_state_dict(cu.to_diffusers(ours.state_dict(), tiny_cfg.unet), strict=True)
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


K_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
K_V2 = "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v.weight"


@pytest.mark.parametrize("change,named", [
    ("drop", K_V2), ("drop", "conv_out.bias"), ("extra", "mid_block.bogus.weight"),
    ("shape", "conv_in.weight"), ("shape", K_Q),
])
def test_bad_diffusers_state_names_the_key(tiny_pair, tiny_cfg, change, named):
    state = dict(tiny_pair[0].state_dict())
    if change == "drop":
        del state[named]
    elif change == "extra":
        state[named] = torch.zeros(3)
    else:
        state[named] = torch.zeros(state[named].shape[0] + 1, *state[named].shape[1:])
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")):
        cu.from_diffusers(state, tiny_cfg.unet)


@pytest.mark.parametrize("key", ["up.1.attn.0.blocks.0.attn1.qkv.weight", "mid.res.0.time_proj.bias"])
def test_bad_scratch_state_names_the_key(tiny_pair, tiny_cfg, key):
    state = dict(tiny_pair[1].state_dict())
    state[key] = torch.zeros(state[key].shape[0] - 1, *state[key].shape[1:])
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        cu.to_diffusers(state, tiny_cfg.unet)
    del state[key]
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        cu.to_ldm(state, tiny_cfg.unet)
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        load_strict(UNet(tiny_cfg.unet), state)


# --------------------------------------------------------------------------- original LDM layout
def _convert_with_diffusers(ldm_state, ucfg: UNetConfig):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(dict(ldm_state), config=ucfg.to_reference())


@pytest.mark.parametrize("name", ["tiny", "layers_per_block_2", "attention_on_some_levels", "no_mid_block",
                                  "depth_per_level", "linear_projection"])
def test_ldm_table_agrees_with_diffusers_converter(name):
    ucfg = VARIANTS.get(name) or tiny().unet
    state = variant_pair(name)[0].state_dict()
    ldm = cu.to_ldm(cu.from_diffusers(state, ucfg), ucfg)
    assert all(k.startswith(cu.LDM_PREFIX) for k in ldm)
    converted = _convert_with_diffusers(ldm, ucfg)
    assert converted.keys() == state.keys(), sorted(set(converted) ^ set(state))[:10]
    bad = [k for k in state if not torch.equal(converted[k], state[k])]
    assert not bad, bad[:10]
    # and back: a single file (with VAE / text-encoder keys beside the UNet's) round-trips
    single_file = {**ldm, "first_stage_model.decoder.conv_in.weight": torch.zeros(1), "alphas_cumprod": torch.ones(3)}
    mine = cu.from_ldm(single_file, ucfg)
    back = cu.to_diffusers(mine, ucfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    again = cu.to_ldm(mine, ucfg)
    assert again.keys() == ldm.keys() and all(torch.equal(again[k], ldm[k]) for k in ldm)


def test_ldm_table_sd15_layout(sd15_cfg):
    """Keys and shapes for sd15 (meta tensors); known original names are present."""
    ucfg = sd15_cfg.unet
    ref, ours = meta_pair(ucfg)
    table = cu.ldm_table(ucfg)
    ldm = cu.to_ldm(ours.state_dict(), ucfg)
    _assert_table_covers(table, ldm, ours.state_dict())
    converted = _convert_with_diffusers(ldm, ucfg)
    theirs = ref.state_dict()
    assert converted.keys() == theirs.keys(), sorted(set(converted) ^ set(theirs))[:10]
    assert all(converted[k].shape == theirs[k].shape for k in theirs)
    p = cu.LDM_PREFIX
    for key in ["time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight", "input_blocks.11.0.emb_layers.1.bias",
                "middle_block.1.proj_in.weight", "middle_block.2.out_layers.3.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.bias",
                "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", "out.0.weight", "out.2.bias"]:
        assert p + key in ldm, key
    assert len(ldm) == 686


def test_bad_ldm_state_names_the_key(tiny_cfg):
    ucfg = tiny_cfg.unet
    _, ours = meta_pair(ucfg)
    ldm = dict(cu.to_ldm(ours.state_dict(), ucfg))
    key = cu.LDM_PREFIX + "output_blocks.3.2.conv.weight"  # tiny: up level 1 (attention) upsample
    ldm[key] = torch.empty(3, 3, 3, 3, device="meta")
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        cu.from_ldm(ldm, ucfg)
    del ldm[key]
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        cu.from_ldm(ldm, ucfg)
    with pytest.raises(ConversionError, match="model.diffusion_model"):
        cu.from_ldm({"first_stage_model.x": torch.zeros(1)}, ucfg)


# --------------------------------------------------------------------------- timestep embedding
@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0.0), (320, True, 0.0), (64, False, 1.0), (33, True, 0.0)])
def test_timestep_embedding_is_bitwise_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.0, 745.3, 745.0, 999.0], dtype=torch.float64)
    ours = timestep_embedding(t, dim, flip, shift)
    assert ours.dtype == torch.float32 and ours.shape == (5, dim)
    assert torch.equal(ours, get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift))
    if flip:  # cos first: cos(0) = 1 for the t = 0 row
        assert torch.all(ours[0, : dim // 2] == 1) and torch.all(ours[0, dim // 2: 2 * (dim // 2)] == 0)
    assert not torch.equal(ours[2], ours[3])  # 745.3 vs 745


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", TIMESTEPS, ids=repr)
def test_timestep_input_handling_matches_get_time_embed(tiny_pair, tiny_cfg, t, dtype):
    ref, _ = tiny_pair
    x = torch.zeros(2, 4, 8, 8, dtype=dtype)
    theirs = ref.get_time_embed(sample=x, timestep=t)
    tt = timesteps_tensor(t, 2, x.device)
    ours = timestep_embedding(tt, tiny_cfg.unet.block_out_channels[0]).to(dtype)
    assert tt.shape == (2,) and ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


def test_python_float_timestep_keeps_its_fraction():
    assert timesteps_tensor(745.3, 2, torch.device("cpu")).dtype == torch.float64
    assert timesteps_tensor(745, 2, torch.device("cpu")).dtype == torch.int64
    a, b = (timestep_embedding(timesteps_tensor(t, 1, torch.device("cpu")), 320) for t in (745.3, 745))
    assert (a - b).abs().max() > 1e-3


# --------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("seed", SEEDS)
def test_tiny_fp32_parity_across_timesteps(tiny_pair, tiny_cfg, seed):
    ref, ours = tiny_pair
    x, context = inputs(tiny_cfg.unet, seed)
    outs = {}
    for t in TIMESTEPS:
        r, o = run_both(ref, ours, x, t, context)
        assert o.shape == x.shape and o.dtype == x.dtype
        assert_parity(r, o, f"seed {seed} t={t!r}")
        outs[repr(t)] = o
    assert not torch.equal(outs["745.3"], outs["745"])  # the timestep's dtype reaches the output


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_exact_mode_is_bitwise_diffusers_for_either_input_layout(tiny_pair, tiny_cfg, layout):
    """diffusers' img2img hands the UNet channels_last latents (add_noise broadcasts a (B, 1, 1, 1)
    factor), and then its GroupNorms take PyTorch's channels_last kernel. Exact mode must take the
    same kernel: its accurate channels_last GroupNorm (a fast-mode fix) was 6.6e-7 off there."""
    ref, ours = tiny_pair[0], copy.deepcopy(tiny_pair[1]).set_exact(True)
    x, context = inputs(tiny_cfg.unet, 4, batch=4)
    x = x.contiguous(memory_format=layout)
    r, o = run_both(ref, ours, x, torch.tensor(501), context)
    assert torch.equal(o, r), (o - r).abs().max()


def test_tiny_fp32_parity_other_seed_weights_and_odd_latent_size(tiny_cfg):
    """Other weights; a latent that is not a multiple of 2^3 makes every upsample target the skip's size."""
    ref = reference_unet(tiny_cfg, seed=5)
    ours = scratch_from(ref, tiny_cfg.unet)
    for size in [(12, 10), (8, 16), (9, 9)]:
        x, context = inputs(tiny_cfg.unet, 3, size, batch=3, tokens=5)
        r, o = run_both(ref, ours, x, 321, context)
        assert o.shape == x.shape
        assert_parity(r, o, f"size {size}")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_fp32_parity(name):
    ucfg = VARIANTS[name]
    ref, ours = variant_pair(name)
    x, context = inputs(ucfg, 0)
    for t in (0, 745.3, torch.tensor([17, 999])):
        assert_parity(*run_both(ref, ours, x, t, context), f"{name} t={t!r}")


def test_parity_gate_notices_an_attention_bug(tiny_pair, tiny_cfg, monkeypatch):
    ref, ours = tiny_pair
    x, context = inputs(tiny_cfg.unet, 0)
    r, _ = run_both(ref, ours, x, 500, context)
    attention = layers.attention
    monkeypatch.setattr(layers, "attention", lambda q, k, v, heads, **kw: attention(q * 1.01, k, v, heads, **kw))
    with torch.no_grad():
        o = ours(x, 500, context)
    err = compare(r, o)
    assert err.rel_l2 > MAX_REL_L2 and err.psnr_db < MIN_PSNR, err


def test_every_parameter_gets_a_gradient(tiny_cfg):
    model = UNet(tiny_cfg.unet)
    x, context = inputs(tiny_cfg.unet, 0)
    model(x, torch.tensor([10, 900]), context).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or not p.grad.abs().sum() > 0]
    assert not missing, missing


# --------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_low_precision_is_finite_and_close(tiny_cfg, dtype):
    """In exact mode the implementations must differ far less than the precision itself moves the
    output. (The fast mode rounds elsewhere; its low-precision bar is the gate's: test_fastpaths.)"""
    ref = reference_unet(tiny_cfg, seed=3)
    ours = scratch_from(ref, tiny_cfg.unet).set_exact(True)
    x, context = inputs(tiny_cfg.unet, 1)
    r32, _ = run_both(ref, ours, x, 745.3, context)
    ref.to(dtype), ours.to(dtype)
    r, o = run_both(ref, ours, x.to(dtype), 745.3, context.to(dtype))
    assert o.dtype == dtype
    between, precision = compare(r, o), compare(r32, r)
    assert between.finite and precision.finite
    assert between.rel_l2 <= 0.1 * precision.rel_l2, (between, precision)
    assert compare(r32, o).psnr_db >= 35.0, compare(r32, o)  # Apple's per-component bar


# --------------------------------------------------------------------------- localiser pairs
def _first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "sample", out)


def _record(model, names):
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: seen.append((n, _first_tensor(o).detach().clone()))) for n in names]
    return seen, handles


def check_module_pairs(ref, ours, ucfg, x, t, context):
    pairs = cu.module_pairs(ucfg)
    ours_names, theirs_names = [p[0] for p in pairs], [p[1] for p in pairs]
    assert len(set(ours_names)) == len(ours_names) and len(set(theirs_names)) == len(theirs_names)
    ours_seen, h1 = _record(ours, ours_names)  # get_submodule raises for a name that does not exist
    theirs_seen, h2 = _record(ref, theirs_names)
    try:
        run_both(ref, ours, x, t, context)
    finally:
        for h in h1 + h2:
            h.remove()
    # every module ran once, in the listed (execution) order, on both sides
    assert [n for n, _ in ours_seen] == ours_names
    assert [n for n, _ in theirs_seen] == theirs_names
    bad = []
    for (o_name, o), (t_name, r) in zip(ours_seen, theirs_seen):
        err = compare(r, o)
        if not (err.finite and err.rel_l2 <= MAX_REL_L2):
            bad.append(f"{o_name} vs {t_name}: {err}")
    assert not bad, "\n".join(bad[:5])
    return pairs


def test_module_pairs_exist_run_in_order_and_match(tiny_pair, tiny_cfg):
    ref, ours = tiny_pair
    x, context = inputs(tiny_cfg.unet, 2)
    pairs = check_module_pairs(ref, ours, tiny_cfg.unet, x, 600, context)
    # every directly comparable weight-bearing layer of the table is among them, and the blocks too
    table_pairs = set(cu.diffusers_table(tiny_cfg.unet).module_pairs())
    assert table_pairs <= set(pairs), sorted(table_pairs - set(pairs))[:5]
    for block in [("down.0", "down_blocks.0"), ("mid", "mid_block"), ("up.3", "up_blocks.3"),
                  ("down.1.attn.0.blocks.0", "down_blocks.1.attentions.0.transformer_blocks.0"),
                  ("up.1.res.1", "up_blocks.1.resnets.1"), ("time_mlp", "time_embedding")]:
        assert block in pairs, block


@pytest.mark.parametrize("name", ["linear_projection", "attention_on_some_levels", "no_mid_block"])
def test_module_pairs_on_variants(name):
    ref, ours = variant_pair(name)
    x, context = inputs(VARIANTS[name], 4)
    check_module_pairs(ref, ours, VARIANTS[name], x, 42.5, context)


# --------------------------------------------------------------------------- sd15 (slow)
@pytest.fixture(scope="module")
def sd15_pair(sd15_cfg):
    ref = reference_unet(sd15_cfg)
    return ref, scratch_from(ref, sd15_cfg.unet)


@pytest.mark.slow
@pytest.mark.ci
def test_sd15_fp32_parity(sd15_pair, sd15_cfg):
    ref, ours = sd15_pair
    x, context = inputs(sd15_cfg.unet, 0, size=16)
    for t in (0, 745.3, 999, torch.tensor([10, 900])):
        r, o = run_both(ref, ours, x, t, context)
        assert o.shape == x.shape
        assert_parity(r, o, f"sd15 t={t!r}")


@pytest.mark.slow
def test_sd15_module_pairs_and_ldm(sd15_pair, sd15_cfg):
    ref, ours = sd15_pair
    ucfg = sd15_cfg.unet
    x, context = inputs(ucfg, 1, size=8, batch=1)
    check_module_pairs(ref, ours, ucfg, x, 500, context)
    state = ref.state_dict()
    converted = _convert_with_diffusers(cu.to_ldm(ours.state_dict(), ucfg), ucfg)
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[k], state[k]) for k in state)


@pytest.mark.slow
def test_sd15_bf16_is_finite_and_close(sd15_pair, sd15_cfg):
    ref, ours = sd15_pair
    x, context = inputs(sd15_cfg.unet, 2, size=16)
    r32, _ = run_both(ref, ours, x, 745.3, context)
    try:  # exact mode: the same arithmetic, so far closer than bf16 moves the output
        ref.to(torch.bfloat16), ours.set_exact(True).to(torch.bfloat16)
        r, o = run_both(ref, ours, x.bfloat16(), 745.3, context.bfloat16())
    finally:
        ref.float(), ours.float().set_exact(False)
    between, precision = compare(r, o), compare(r32, r)
    assert between.finite and between.rel_l2 <= 0.1 * precision.rel_l2, (between, precision)
    assert compare(r32, o).psnr_db >= 35.0 and not math.isnan(precision.rel_l2)
