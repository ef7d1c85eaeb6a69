"""Gate power on the SD 2.x family (#18): bugs specific to SD 2.x, injected into the scratch side with
monkeypatch, each fail the DEFAULT gate on the tiny SD 2.x preset (`check --preset tiny-sd2`, no
scheduler option), and for the network bugs `localize --preset tiny-sd2` names the reference layer where
the bug first acts. The expected layers follow from where each bug sits in the forward order (a localize
table lists modules in the order their forward finishes; a changed activation or head split is first
seen in the next hooked Linear). Models on the injected-bug tests of tests/test_check.py."""
from __future__ import annotations

import math
import types

import pytest
import torch.nn.functional as F

from sdparity import main as cli
from test_check import FAST, _rows, _with_config

PRESET = ["--preset", "tiny-sd2"]


# --------------------------------------------------------------------------- the bugs
def _bug_text_quick_gelu(mp):
    """The text tower's activation chosen as CLIP's QuickGELU where tiny-sd2 (as OpenCLIP) says gelu."""
    import scratch_sd.clip as clip

    original = clip.MLP.__init__

    def init(self, cfg):
        original(self, cfg)
        self.exact_gelu = False  # QuickGELU, whatever cfg.activation says

    mp.setattr(clip.MLP, "__init__", init)


def _transposed(linear):
    """A linear proj applied with W.T: a 1x1-conv weight reading (in, out) for (out, in); square here."""
    assert linear.weight.shape[0] == linear.weight.shape[1]

    def forward(self, x):
        return F.linear(x, self.weight.t(), self.bias)

    linear.forward = types.MethodType(forward, linear)


def _bug_proj_transposed(which):
    def inject(mp):
        import scratch_sd.unet as u

        original = u.SpatialTransformer.__init__

        def init(self, dim, cfg, heads, depth):
            original(self, dim, cfg, heads, depth)
            assert self.linear, "tiny-sd2 uses linear projections"
            _transposed(getattr(self, which))

        mp.setattr(u.SpatialTransformer, "__init__", init)
    return inject


def _bug_heads_level_1(mp):
    """Level 1 split into 4 heads instead of tiny-sd2's 2 (num_heads (1, 2, 4, 8))."""
    _with_config(mp, "unet", num_heads=(1, 4, 4, 8))


def _bug_heads_last_level(mp):
    """The last level's head count (8 -> 4). Level 3 has no attention, so only the mid block uses it; and
    its input is 1x1 (8x8 latents after three downsamples): self-attention over ONE token is its value
    whatever the head split (softmax of one key is 1), so attn1 agrees and attn2 (77 text keys) is first."""
    _with_config(mp, "unet", num_heads=(1, 2, 4, 4))


# bug -> (inject, component, reference layer localize must name)
NETWORK_BUGS = {
    "text_gelu_as_quick_gelu": (_bug_text_quick_gelu, "text_encoder", "encoder.layers.0.mlp.fc2"),
    "unet_proj_in_transposed": (_bug_proj_transposed("proj_in"), "unet", "down_blocks.0.attentions.0.proj_in"),
    "unet_proj_out_transposed": (_bug_proj_transposed("proj_out"), "unet", "down_blocks.0.attentions.0.proj_out"),
    "unet_heads_level_1": (_bug_heads_level_1, "unet",
                           "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    "unet_heads_last_level_mid_block": (_bug_heads_last_level, "unet",
                                        "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"),
}


def _failing(out):
    return [r for r in _rows(out / "parity.csv") if r["passed"] != "True" and r["status"] == "compared"]


@pytest.mark.parametrize("bug", list(NETWORK_BUGS))
def test_sd2_network_bug_fails_default_gate_and_is_localised(bug, monkeypatch, tmp_path, capsys):
    inject, component, layer = NETWORK_BUGS[bug]
    inject(monkeypatch)
    out = tmp_path / "c"
    code = cli.main(["check", *PRESET, "--components", f"{component},pipeline", "--modes", "txt2img",
                     "--out", str(out)] + FAST)
    err = capsys.readouterr().err
    assert code == 1, f"{bug}: the gate passed"
    bad = _failing(out)
    assert any(r["component"] == component and r["mode"] == "direct" for r in bad), bad[:3]
    assert "FAIL" in err and f"sdparity localize --component {component}" in err
    code = cli.main(["localize", *PRESET, "--component", component, "--out", str(tmp_path / "l")])
    printed = capsys.readouterr().out
    assert code == 1
    first = [r for r in _rows(tmp_path / "l" / "localize.csv") if r["over"] == "True"][0]
    assert first["reference"] == layer, f"{bug}: localize named {first['reference']} ({first['candidate']})"
    assert f"reference `{layer}`" in printed


# --------------------------------------------------------------------------- v-prediction read as epsilon
def _bug_pndm_v_as_epsilon(mp):
    """The default scheduler (PNDM) skips its v -> eps conversion: v_prediction computed as epsilon."""
    from scratch_sd.schedulers import pndm

    def prev(self, sample, timestep, prev_timestep, model_output):  # _get_prev_sample less its v -> eps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        return pndm.pndm_transfer(sample, model_output, alpha_prod_t, alpha_prod_t_prev)

    mp.setattr(pndm.PNDMScheduler, "_get_prev_sample", prev)


def _bug_ddim_v_as_epsilon(mp):
    """DDIM (not the default scheduler) reads a v_prediction output as epsilon."""
    from scratch_sd.schedulers import ddim

    original = ddim.pred_x0_and_eps
    mp.setattr(ddim, "pred_x0_and_eps", lambda out, sample, a, b, pred:
               original(out, sample, a, b, "epsilon" if pred == "v_prediction" else pred))


def test_pndm_v_prediction_as_epsilon_fails_default_gate(monkeypatch, tmp_path):
    """tiny-sd2 is v_prediction and the gate's pipelines run PNDM: the scratch pipeline's latents leave
    the reference's from the first step."""
    _bug_pndm_v_as_epsilon(monkeypatch)
    out = tmp_path / "c"
    assert cli.main(["check", *PRESET, "--components", "pipeline", "--modes", "txt2img",
                     "--out", str(out)] + FAST) == 1
    bad = _failing(out)
    assert {(r["component"], r["tensor"]) for r in bad} >= {("pipeline", "latents"), ("pipeline", "image"),
                                                            ("all_swapped", "latents")}
    assert all(r["scheduler"] == "pndm" for r in bad)


@pytest.mark.slow
@pytest.mark.ci
def test_ddim_v_prediction_as_epsilon_fails_default_gate(monkeypatch, tmp_path):
    """A non-default scheduler's bug is caught by the default gate's standalone scheduler checks, which
    run every scheduler and every prediction_type variant whatever --scheduler says (parity/network_check
    check_schedulers, names "all"; before that the default gate ran PNDM's only and passed this bug), and
    only in DDIM's v_prediction variants. The slow case here (~1 min: every scheduler's checks)."""
    _bug_ddim_v_as_epsilon(monkeypatch)
    out = tmp_path / "c"
    assert cli.main(["check", *PRESET, "--components", "scheduler", "--out", str(out)] + FAST) == 1
    rows = _rows(out / "parity.csv")
    bad = _failing(out)
    assert bad and all(r["component"] == "scheduler" for r in bad)
    ddim_v = {r["scheduler"] for r in rows
              if r["scheduler"].startswith("ddim[") and "pred=v_prediction" in r["scheduler"]}
    assert ddim_v and {r["scheduler"] for r in bad} == ddim_v  # every DDIM v variant, nothing else


# --------------------------------------------------------------------------- clean
def test_localize_clean_sd2_networks_find_nothing(tmp_path, capsys):
    for component in ("text_encoder", "vae", "unet"):
        assert cli.main(["localize", *PRESET, "--component", component, "--out", str(tmp_path / component)]) == 0
        rows = _rows(tmp_path / component / "localize.csv")
        assert len(rows) > 10 and not any(r["over"] == "True" for r in rows)
        assert all(math.isfinite(float(r["rel_l2"])) for r in rows)
    printed = capsys.readouterr().out
    assert "no layer of unet" in printed


# --------------------------------------------------------------------------- full size (slow)
@pytest.mark.slow
@pytest.mark.parametrize("preset, dtypes", [("sd21", "fp32,bf16"), ("sd2-base", "fp32")])
def test_full_size_sd2_gate_passes(preset, dtypes, tmp_path):
    """The default gate at 256², 2 steps, PNDM, txt2img and img2img (issue 18's done-when): every
    component of sd21 (768-class, v_prediction, upcast flag) at fp32 and bf16, sd2-base at fp32."""
    out = tmp_path / preset
    code = cli.main(["check", "--preset", preset, "--dtypes", dtypes, "--out", str(out), "--quiet", "--no-plots"])
    rows = _rows(out / "parity.csv")
    assert code == 0, [r for r in rows if r["passed"] != "True"][:3]
    compared = [r for r in rows if r["status"] == "compared"]
    assert {r["component"] for r in compared} >= {"text_encoder", "vae", "unet", "scheduler", "all_swapped",
                                                   "pipeline"}
    assert {r["dtype"] for r in compared} >= set(dtypes.split(","))
    assert all(math.isfinite(float(r["rel_l2"])) for r in compared if r["component"] in ("text_encoder", "unet"))
