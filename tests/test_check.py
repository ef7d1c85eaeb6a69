"""The parity gate (`sdparity check`) and the localiser: usage errors, determinism,
specificity (no false alarm over 10 seeds) and sensitivity (subtle injected bugs fail the
default gate, and `localize` names the layer where each was injected)."""
from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch.nn.functional as F

from sdparity import main as cli
from scratch_sd import loading

FAST = ["--steps", "2", "--num-seeds", "1", "--no-plots", "--quiet"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _run(args, capsys=None):
    code = cli.main(args)
    return code


# --------------------------------------------------------------------------- usage
@pytest.mark.parametrize("args,needle", [
    (["check", "--components", "unet,wheel"], "unknown component 'wheel'"),
    (["check", "--preset", "sd99"], "unknown preset 'sd99'"),
    (["check", "--model", "/no/such/model"], "does not exist"),
    (["check", "--dtypes", "fp8"], "unknown dtype 'fp8'"),
    (["check", "--scheduler", "heun"], "unknown scheduler 'heun'"),
    (["check", "--tolerances", "/no/such.toml"], "No such tolerance file"),
    (["check", "--steps", "0"], "--steps must be >= 1"),
    (["check", "--size", "60"], "multiple of 8"),
    (["check", "--device", "tpu"], "unknown device 'tpu'"),
    (["check", "--frobnicate"], "unrecognized arguments"),
    (["localize", "--component", "scheduler"], "unknown component 'scheduler'"),
    (["localize", "--component", "unet", "--dtype", "fp64"], "unknown dtype 'fp64'"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_usage_exits_2_with_one_line(args, needle, capsys, tmp_path):
    code = cli.main(args + ["--out", str(tmp_path / "out")] if args[0] == "check" else args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_broken_tolerance_file_is_bad_input(tmp_path, capsys):
    bad = tmp_path / "t.toml"
    bad.write_text("[default.fp32]\natol = 1e-4\n")
    assert cli.main(["check", "--tolerances", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "lacks" in capsys.readouterr().err


# --------------------------------------------------------------------------- the gate on tiny
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    code = cli.main(["check", "--preset", "tiny", "--dtypes", "fp32,bf16", "--out", str(out), "--steps", "2",
                     "--num-seeds", "1", "--quiet"])
    return code, out


def test_tiny_gate_passes_and_writes_reports(tiny_run):
    code, out = tiny_run
    rows = _rows(out / "parity.csv")
    failing = [r for r in rows if r["passed"] != "True"]
    assert code == 0, failing[:5]
    comps = {r["component"] for r in rows}
    assert {"text_encoder", "vae", "unet", "scheduler", "all_swapped", "pipeline"} <= comps
    tensors = {r["tensor"] for r in rows}
    assert {"text_embeddings", "noise_pred", "latents", "image", "image_latents", "timesteps"} <= tensors
    # every design.md column, in its order
    design = ["run_id", "preset", "component", "dtype", "device", "scheduler", "step", "tensor", "shape", "max_abs",
              "mean_abs", "rel_l2", "cosine_distance", "psnr_db", "atol", "rtol", "min_psnr_db", "passed"]
    assert list(rows[0].keys())[:len(design)] == design
    # per-step rows exist for every step of both modes, at both precisions
    steps = {(r["component"], r["dtype"], r["mode"], r["step"]) for r in rows if r["tensor"] == "latents"}
    assert ("unet", "bf16", "img2img", "0") in steps and ("all_swapped", "fp32", "txt2img", "1") in steps
    # low-precision rows carry both errors against fp32 and their ratio
    low = [r for r in rows if r["dtype"] == "bf16" and r["status"] == "compared"]
    assert low and all(r["candidate_rel_l2_vs_fp32"] != "" and r["reference_rel_l2_vs_fp32"] != "" for r in low)
    summary = (out / "summary.md").read_text()
    assert "| unet |" in summary and "PASS" in summary
    assert (out / "error_by_step.png").stat().st_size > 1000 and (out / "images.png").stat().st_size > 1000


def test_fp32_network_parity_is_within_issue_bar(tiny_run):
    _, out = tiny_run
    for r in _rows(out / "parity.csv"):
        if r["dtype"] == "fp32" and r["mode"] == "direct":
            assert float(r["rel_l2"]) <= 1e-5 and float(r["psnr_db"]) >= 90, r


def test_exact_mode_gate_is_bit_identical_and_labelled(tiny_run, tmp_path):
    """`check --exact` gates the exact mode under its own label: every row is bit-identical to diffusers
    (max_abs 0): the direct network checks, each network swapped into txt2img and img2img (whose
    channels_last latents and the VAE attention's channels_last sum decide diffusers' kernels), all of
    them swapped, and the scratch pipeline. The default run is labelled fast, and there the UNet does
    move (channels_last and oneDNN kernels round differently), which is why both modes are reported."""
    out = tmp_path / "exact"
    assert cli.main(["check", "--exact", "--components", "text_encoder,vae,unet,pipeline", "--num-seeds", "1",
                     "--steps", "4", "--quiet", "--no-plots", "--out", str(out)]) == 0
    rows = [r for r in _rows(out / "parity.csv") if r["status"] == "compared"]
    direct = [r for r in rows if r["mode"] == "direct"]
    assert {r["component"] for r in direct} == {"text_encoder", "vae", "unet"}
    assert {(r["component"], r["mode"]) for r in rows} >= {
        (c, m) for c in ("text_encoder", "vae", "unet", "all_swapped", "pipeline") for m in ("txt2img", "img2img")}
    assert all(float(r["max_abs"]) == 0.0 for r in rows), [r for r in rows if float(r["max_abs"])][:3]
    assert {r["net_mode"] for r in rows} == {"exact"} and "exact mode" in (out / "summary.md").read_text()
    fast = [r for r in _rows(tiny_run[1] / "parity.csv") if r["status"] == "compared"]
    assert {r["net_mode"] for r in fast if r["component"] != "scheduler"} == {"fast"}
    assert any(float(r["max_abs"]) > 0 for r in fast if r["mode"] == "direct" and r["component"] == "unet")


def test_same_check_twice_gives_identical_numbers(tmp_path):
    args = ["check", "--components", "unet,vae", "--modes", "txt2img"] + FAST
    assert cli.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert cli.main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = _rows(tmp_path / "a" / "parity.csv"), _rows(tmp_path / "b" / "parity.csv")
    drop = ("run_id",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]


@pytest.mark.slow
@pytest.mark.ci
def test_no_false_alarm_over_ten_seeds(tmp_path):
    """Specificity: different weights, inputs and noise for each seed; the gate must stay green."""
    for seed in range(10):
        out = tmp_path / f"s{seed}"
        code = cli.main(["check", "--components", "text_encoder,vae,unet,pipeline", "--dtypes", "fp32,bf16",
                         "--seed", str(seed), "--out", str(out)] + FAST)
        failing = [r for r in _rows(out / "parity.csv") if r["passed"] != "True"]
        assert code == 0, (seed, failing[:3])


# --------------------------------------------------------------------------- sensitivity
def _with_config(monkeypatch, component: str, **changes):
    """Build the scratch `component` from a config with `changes` (the injected bug)."""
    original = loading.build_network

    def patched(name, cfg):
        if name == component:
            field = {"text_encoder": "text", "vae": "vae", "unet": "unet"}[name]
            cfg = dataclasses.replace(cfg, **{field: dataclasses.replace(getattr(cfg, field), **changes)})
        return original(name, cfg)

    monkeypatch.setattr(loading, "build_network", patched)


def _attention_without_scale(q, k, v, heads, causal=False, mask=None):
    from scratch_sd.layers import merge_heads, split_heads

    q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=1.0)
    return merge_heads(out)


def _bug_groupnorm_eps(mp):
    _with_config(mp, "unet", transformer_norm_eps=1e-5)


def _bug_vae_groupnorm_eps(mp):
    _with_config(mp, "vae", norm_eps=1e-5)


def _bug_sin_cos(mp):
    import scratch_sd.unet as u

    original = u.timestep_embedding
    mp.setattr(u, "timestep_embedding", lambda t, dim, flip_sin_to_cos=True, freq_shift=0.0:
               original(t, dim, not flip_sin_to_cos, freq_shift))


def _bug_attention_scale(mp):
    import scratch_sd.layers as layers

    mp.setattr(layers, "attention", _attention_without_scale)


def _bug_gelu(mp):
    import scratch_sd.layers as layers

    mp.setattr(layers, "quick_gelu", F.gelu)


def _bug_off_by_one_timestep(mp):
    import scratch_sd.unet as u

    original = u.timesteps_tensor
    mp.setattr(u, "timesteps_tensor", lambda t, batch, device: original(t, batch, device) + 1)


def _bug_vae_scale(mp):
    _with_config(mp, "vae", scaling_factor=0.18)


def _bug_no_causal_mask(mp):
    import scratch_sd.layers as layers

    original = layers.attention
    mp.setattr(layers, "attention", lambda q, k, v, heads, causal=False, mask=None: original(q, k, v, heads))


# bug -> (component to check/localise, reference layer that localize must name)
BUGS = {
    "unet_transformer_groupnorm_eps_1e-5": (_bug_groupnorm_eps, "unet", "down_blocks.0.attentions.0.norm"),
    "vae_groupnorm_eps_1e-5": (_bug_vae_groupnorm_eps, "vae", "encoder.down_blocks.0.resnets.0.norm1"),
    "timestep_sin_cos_flipped": (_bug_sin_cos, "unet", "time_embedding.linear_1"),
    "attention_scale_dropped": (_bug_attention_scale, "unet",
                                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    "quick_gelu_replaced_by_gelu": (_bug_gelu, "text_encoder", "encoder.layers.0.mlp.fc2"),
    "timestep_off_by_one": (_bug_off_by_one_timestep, "unet", "time_embedding.linear_1"),
    "vae_scale_constant_altered": (_bug_vae_scale, "vae", "latent_dist.mean x config.scaling_factor"),
    "clip_causal_mask_dropped": (_bug_no_causal_mask, "text_encoder", "encoder.layers.0.self_attn.out_proj"),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_injected_bug_fails_gate_and_is_localised(bug, monkeypatch, tmp_path, capsys):
    inject, component, layer = BUGS[bug]
    inject(monkeypatch)
    code = cli.main(["check", "--components", f"{component},pipeline", "--modes", "txt2img",
                     "--out", str(tmp_path / "c")] + FAST)
    err = capsys.readouterr().err
    assert code == 1, f"{bug}: the gate passed"
    assert "FAIL" in err and f"sdparity localize --component {component}" in err
    code = cli.main(["localize", "--component", component, "--out", str(tmp_path / "l")])
    printed = capsys.readouterr().out
    assert code == 1
    first = [r for r in _rows(tmp_path / "l" / "localize.csv") if r["over"] == "True"][0]
    assert first["reference"] == layer, f"{bug}: localize named {first['reference']} ({first['candidate']})"
    assert f"reference `{layer}`" in printed


def test_localize_clean_network_finds_nothing(tmp_path, capsys):
    for component in ("text_encoder", "vae", "unet"):
        assert cli.main(["localize", "--component", component, "--out", str(tmp_path / component)]) == 0
        rows = _rows(tmp_path / component / "localize.csv")
        assert len(rows) > 10 and not any(r["over"] == "True" for r in rows)
        assert all(math.isfinite(float(r["rel_l2"])) for r in rows)
    assert "no layer of unet" in capsys.readouterr().out


def test_check_components_train_reports_training_parity(tmp_path):
    """`sdparity check --components train` (issue 9): loss, gradients, AdamW state, parameters."""
    out = tmp_path / "t"
    assert cli.main(["check", "--components", "train", "--out", str(out), "--quiet", "--no-plots"]) == 0
    rows = _rows(out / "parity.csv")
    assert rows and {r["component"] for r in rows} == {"train"}
    tensors = {r["tensor"] for r in rows}
    assert "loss" in tensors and "params_after_3_steps" in tensors and any(t.startswith("grad") for t in tensors)
    assert all(r["passed"] == "True" for r in rows)
