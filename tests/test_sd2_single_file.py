"""The original SD 2.x single-file layout (issue 18, part B): OpenCLIP text keys under
cond_stage_model.model.*, linear proj_in/proj_out, the unused last resblock.

The tiny file is written by this test in Stability's layout (OpenCLIP's whole tower: one resblock
more than is run, text_projection, logit_scale), with the text keys named by the test's own rules
below, not by our table. diffusers' from_single_file is the independent reader: it and our loader
must hold the same tensors bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_helpers import one_error, run_cli as run
from scratch_sd import loading
from scratch_sd.config import CLIPTextConfig, SDConfig, UNetConfig, VAEConfig, sd21, tiny_sd2
from scratch_sd.convert import clip
from scratch_sd.convert import single_file as sf

OC = "cond_stage_model.model."
RB = OC + "transformer.resblocks."


def random_state(cfg: SDConfig, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in sf.scratch_shapes(cfg).items()}


def openclip_names(text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scratch text-encoder keys -> OpenCLIP's names, by this test's own rules (OpenCLIP's
    nn.MultiheadAttention packs q, k, v in in_proj_*, as our fused qkv)."""
    leaf = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
            "attn.out": "attn.out_proj", "norm1": "ln_1", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj"}
    out = {}
    for k, v in text.items():
        if k == "embed.tok.weight":
            out[OC + "token_embedding.weight"] = v
        elif k == "embed.pos.weight":
            out[OC + "positional_embedding"] = v
        elif k.startswith("norm."):
            out[OC + "ln_final." + k[5:]] = v
        else:
            _, i, rest = k.split(".", 2)
            name = next(b + rest[len(a):] for a, b in leaf.items() if rest.startswith(a))
            out[f"{RB}{i}.{name}"] = v
    return out


def stability_file(cfg: SDConfig, seed: int = 0, state: dict | None = None) -> tuple[dict, dict]:
    """(scratch state, the file's tensors in Stability's layout: the text tower with one more resblock
    than is run, text_projection, logit_scale; UNet and VAE by the SD 1.x table, shared).
    `state`: the weights (default: seeded normal tensors, fine for reading, not for running)."""
    state = state if state is not None else random_state(cfg, seed)
    text = {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    ldm = {k: v for k, v in sf.write(state, cfg).items() if not k.startswith(OC)}
    ldm |= openclip_names(text)
    g = torch.Generator().manual_seed(seed + 1)
    last = cfg.text.layers
    ldm |= {k.replace(f"{RB}0.", f"{RB}{last}."): torch.randn(v.shape, generator=g)
            for k, v in openclip_names(text).items() if k.startswith(f"{RB}0.")}
    ldm[OC + "text_projection"] = torch.randn(cfg.text.width, 16, generator=g)
    ldm[OC + "logit_scale"] = torch.tensor(4.6052)
    return state, ldm


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    from conftest import scratch_from
    from parity.references import build_references, quiet_libraries

    quiet_libraries()
    refs = build_references("tiny-sd2")  # the zoo's seeded weights: a file the gate can run
    cfg = refs.cfg
    state, ldm = stability_file(cfg, state=sf.join({n: m.state_dict() for n, m in scratch_from(refs).items()}))
    d = tmp_path_factory.mktemp("sd2")
    save_file(ldm, str(d / "tiny-sd2.safetensors"))
    return {"cfg": cfg, "state": state, "ldm": ldm, "path": d / "tiny-sd2.safetensors", "dir": d}


# --------------------------------------------------------------------------- the table
@pytest.mark.parametrize("make", [tiny_sd2, sd21])
def test_openclip_table_is_one_to_one_and_covers_both_sides(make):
    cfg = make()
    table = sf.ldm_table(cfg)
    assert sf.layout_of(cfg) == "openclip"
    ours = sf.scratch_shapes(cfg)
    assert sorted(table.ours_keys()) == sorted(ours)  # covers every scratch key, once (KeyTable checks twice-use)
    text = [k for k in table.theirs_keys() if k.startswith("cond_stage_model.")]
    assert all(k.startswith(OC) for k in text)
    assert len(text) == 12 * cfg.text.layers + 4  # 12 per resblock; token/positional embedding, ln_final
    assert len({k.split(".")[4] for k in text if k.startswith(RB)}) == cfg.text.layers  # the run layers only
    theirs = sf.ldm_shapes(table, ours)
    assert theirs[f"{RB}0.attn.in_proj_weight"] == (3 * cfg.text.width, cfg.text.width)
    proj = next(k for k in theirs if k.endswith("proj_in.weight"))
    assert len(theirs[proj]) == 2  # SD 2.x: linear proj_in


def test_reads_stability_layout_and_names_every_dropped_key(tiny2):
    r = sf.read(tiny2["ldm"])
    assert r.cfg == tiny_sd2() and set(r.state) == set(tiny2["state"])
    bad = [k for k, v in tiny2["state"].items() if not torch.equal(v, r.state[k])]
    assert not bad, bad[:4]
    last = tiny2["cfg"].text.layers
    assert r.ignored["OPENCLIP_UNUSED_LAYER"] == sorted(k for k in tiny2["ldm"] if k.startswith(f"{RB}{last}."))
    assert r.ignored["OPENCLIP_TEXT_PROJECTION"] == [OC + "text_projection"]
    assert r.ignored["OPENCLIP_LOGIT_SCALE"] == [OC + "logit_scale"]
    assert any("prediction type: v_prediction (diffusers' from_single_file rule" in n for n in r.notes), r.notes


def test_writer_invents_nothing_and_reads_back_bit_identical(tiny2):
    written = sf.write(tiny2["state"], tiny2["cfg"])
    dropped = {k for keys in sf.read(tiny2["ldm"]).ignored.values() for k in keys}
    assert set(written) == set(tiny2["ldm"]) - dropped
    assert all(torch.equal(written[k], tiny2["ldm"][k]) for k in written)
    back = sf.read(written)
    assert back.ignored == {} and all(torch.equal(back.state[k], v) for k, v in tiny2["state"].items())


# --------------------------------------------------------------------------- prediction type
def test_prediction_type_source_is_said(tiny2):
    ldm = tiny2["ldm"]
    r = sf.read({**ldm, "global_step": torch.tensor(875000)})
    assert r.cfg.prediction_type == "epsilon" and r.ignored["GLOBAL_STEP"] == ["global_step"]
    assert any("global_step 875000 (2.x-base)" in n for n in r.notes)
    r = sf.read(ldm, prediction_type="epsilon")
    assert r.cfg.prediction_type == "epsilon" and "prediction type: epsilon (as given (--prediction-type))" in r.notes
    meta = sf.config_from_json(sf.config_to_json(tiny_sd2()))
    assert meta.prediction_type == "v_prediction"
    r = sf.read({**ldm, "global_step": torch.tensor(875000)}, cfg=meta)
    assert r.cfg.prediction_type == "v_prediction" and any("sd_parity_config metadata" in n for n in r.notes)


def test_sd21_and_sd2_base_shapes_are_told_apart_by_prediction_type():
    """On meta tensors: equal shapes; v_prediction -> sd21 (upcast, 768), epsilon -> sd2-base."""
    cfg = sd21()
    meta = {k: torch.empty(s, device="meta") for k, s in sf.ldm_shapes(sf.ldm_table(cfg), sf.scratch_shapes(cfg)).items()}
    for pred, name, upcast in (("v_prediction", "sd21", True), ("epsilon", "sd2-base", False)):
        got, notes = sf.infer_config(meta, prediction_type=pred)
        assert (got.name, got.unet.upcast_attention, got.prediction_type) == (name, upcast, pred), notes
        assert got.unet.num_heads == (5, 10, 20, 20) and got.text.heads == 16 and got.text.activation == "gelu"


def test_no_preset_falls_back_to_sd2_head_size_64():
    cfg = SDConfig(name="micro2", text=CLIPTextConfig(vocab_size=300, width=64, layers=1, heads=1, mlp_width=64,
                                                      activation="gelu"),
                   vae=VAEConfig(block_out_channels=(32, 32), layers_per_block=1),
                   unet=UNetConfig(block_out_channels=(64, 128), layers_per_block=1, attention_levels=(True, False),
                                   num_heads=(1, 2), cross_attention_dim=64, use_linear_projection=True,
                                   upcast_attention=True, sample_size=8),
                   image_size=16, prediction_type="v_prediction")
    state, ldm = stability_file(cfg, seed=3)
    r = sf.read(ldm, name="micro2")
    hidden = dict(image_size=r.cfg.image_size, unet=replace(cfg.unet, sample_size=r.cfg.unet.sample_size))
    assert r.cfg == replace(cfg, **hidden), r.notes  # all but the image size, which no file holds
    assert all(torch.equal(r.state[k], v) for k, v in state.items())


# --------------------------------------------------------------------------- both readers, round trip, gate
def test_diffusers_and_our_loader_read_the_same_weights(tiny2):
    from parity import local_model

    refs = local_model.build_references(tiny2["path"], quiet=True)  # raises if any tensor differs
    assert refs.cfg == tiny_sd2() and refs.scheduler_config["prediction_type"] == "v_prediction"
    text = {f"text_model.{k}": v for k, v in refs.networks["text_encoder"].state_dict().items()
            if not k.endswith("position_ids")}
    ours = clip.from_diffusers(text, refs.cfg.text)
    assert all(torch.equal(ours[k[len("text_encoder."):]], v) for k, v in tiny2["state"].items()
               if k.startswith("text_encoder."))


def test_single_to_folder_to_single_round_trips_bit_for_bit(tiny2, capsys):
    d = tiny2["dir"]
    folder, back, folder2, back2 = d / "folder", d / "back.safetensors", d / "folder2", d / "back2.safetensors"
    for argv in (["convert", tiny2["path"], "--to", "diffusers", "--out", folder],
                 ["convert", folder, "--to", "single", "--out", back],
                 ["convert", back, "--to", "diffusers", "--out", folder2],
                 ["convert", folder2, "--to", "single", "--out", back2]):
        rc, out, err = run(argv, capsys)
        assert rc == 0, out + err
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    src, one, two = tiny2["ldm"], load_file(str(back)), load_file(str(back2))
    dropped = {k for keys in sf.read(src).ignored.values() for k in keys}
    assert set(one) == set(src) - dropped and all(torch.equal(one[k], src[k]) for k in one)
    assert set(two) == set(one) and all(torch.equal(two[k], one[k]) for k in one)
    assert loading.read_model(back).cfg == tiny_sd2()


@pytest.mark.slow
@pytest.mark.ci
def test_check_gates_the_sd2_file(tiny2, capsys):
    out = tiny2["dir"] / "run"
    rc, stdout, err = run(["check", "--model", tiny2["path"], "--size", "64", "--steps", "2", "--num-seeds", "1",
                           "--no-plots", "--quiet", "--out", out], capsys)
    assert rc == 0 and stdout.startswith("PASS"), stdout + err
    summary = (out / "summary.md").read_text()
    assert "prediction type: v_prediction" in summary + err, summary[-2000:] + err


@pytest.mark.slow
@pytest.mark.ci
def test_prediction_type_option_reaches_convert_check_and_generate(tiny2, capsys):
    """--prediction-type overrides diffusers' rule (this file: v_prediction, no metadata, no global_step)
    in every reader of a single file, and is refused where the prediction type is not the file's to say."""
    d, path = tiny2["dir"], tiny2["path"]
    rc, out, err = run(["convert", path, "--to", "diffusers", "--prediction-type", "epsilon", "--out", d / "eps"],
                       capsys)
    assert rc == 0 and "prediction type: epsilon (as given (--prediction-type))" in err, out + err
    assert json.loads((d / "eps" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    rc, out, err = run(["check", "--model", path, "--prediction-type", "epsilon", "--components", "unet,pipeline",
                        "--modes", "txt2img", "--steps", "2", "--num-seeds", "1", "--no-plots", "--quiet",
                        "--out", d / "eps-run"], capsys)
    assert rc == 0 and "prediction type: epsilon (as given" in (d / "eps-run" / "summary.md").read_text() + err
    images = {}
    for pred in ("epsilon", None):  # the same weights and noise: only the scheduler's reading differs
        png = d / f"gen-{pred}.png"
        rc, out, err = run(["generate", "--model", path, "--prompt", "a fox", "--steps", "2", "--no-progress",
                            "--out", png] + (["--prediction-type", pred] if pred else []), capsys)
        assert rc == 0, out + err
        images[pred] = png.read_bytes()
    assert images["epsilon"] != images[None]
    for argv, phrase in ((["check", "--preset", "tiny", "--prediction-type", "v_prediction"],
                          "--prediction-type applies to --model single files"),
                         (["check", "--model", d / "eps", "--prediction-type", "epsilon"],
                          "--prediction-type applies to original single files only"),
                         (["check", "--model", path, "--prediction-type", "x0"], "--prediction-type: invalid choice"),
                         (["convert", "--preset", "tiny-sd2", "--prediction-type", "epsilon", "--to", "scratch",
                           "--out", d / "never.safetensors"], "a --preset fixes its own")):
        rc, out, err = run(argv + ["--out", d / "never"] if argv[0] == "check" else argv, capsys)
        assert rc == 2 and phrase in one_error(err), (argv, err)
    assert not (d / "never").exists() and not (d / "never.safetensors").exists()


# --------------------------------------------------------------------------- strictness
def _bad(ldm: dict) -> dict[str, tuple[dict, str]]:
    k_qkv = f"{RB}0.attn.in_proj_weight"
    last = max(int(k[len(RB):].split(".")[0]) for k in ldm if k.startswith(RB))  # the unused one
    fc = f"{RB}{last}.mlp.c_fc.weight"
    return {
        "missing": ({k: v for k, v in ldm.items() if k != k_qkv}, k_qkv),
        "extra": ({**ldm, OC + "transformer.extra.weight": torch.zeros(2)}, "transformer.extra.weight"),
        "misshaped": ({**ldm, k_qkv: torch.zeros(5, 32)}, k_qkv),
        "last resblock of the wrong width": ({**ldm, fc: torch.zeros(128, 32)}, fc),
        "last resblock incomplete": ({k: v for k, v in ldm.items() if k != fc}, fc),
        "text_projection of the wrong width": ({**ldm, OC + "text_projection": torch.zeros(8, 16)}, "text_projection"),
        "two text towers": ({**ldm, "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32)},
                            "two text encoders"),
        "inpainting": ({**ldm, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)},
                       "inpainting"),
    }


@pytest.mark.parametrize("case", ["missing", "extra", "misshaped", "last resblock of the wrong width",
                                  "last resblock incomplete", "text_projection of the wrong width",
                                  "two text towers", "inpainting"])
def test_bad_sd2_files_fail_in_one_line(case, tiny2, tmp_path, capsys):
    state, phrase = _bad(tiny2["ldm"])[case]
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    target = tmp_path / "never.safetensors"
    rc, _, err = run(["convert", path, "--to", "scratch", "--out", target], capsys)
    assert rc == 2 and phrase in one_error(err), err
    assert not target.exists()
