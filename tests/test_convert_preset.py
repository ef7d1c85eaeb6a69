"""`sdparity convert --preset` (issue #19): the embedded presets' seeded networks written to disk as
a single file, a diffusers folder or a scratch checkpoint, with CLIP's real tokenizer files; what
it wrote holds the very weights `check --preset` gates, and `check --model` on it passes."""
from __future__ import annotations

import json

import pytest
import torch

from sdparity.main import main

QUICK = ["--components", "text_encoder,unet", "--dtypes", "fp32", "--modes", "txt2img", "--num-seeds", "1",
         "--no-plots", "--quiet"]


@pytest.fixture(scope="module")
def preset_state():
    from parity.export import preset_model

    return preset_model("tiny").state


@pytest.mark.parametrize("to, name", [("single", "tiny.safetensors"), ("diffusers", "tiny"),
                                      ("scratch", "tiny-scratch.safetensors")])
def test_the_written_model_holds_the_preset_weights_and_passes_the_gate(to, name, preset_state, tmp_path):
    from scratch_sd import loading

    out = tmp_path / name
    assert main(["convert", "--preset", "tiny", "--to", to, "--out", str(out)]) == 0
    model = loading.read_model(out)
    assert model.cfg.name == "tiny"
    assert model.state.keys() == preset_state.keys()
    assert all(torch.equal(model.state[k], v) for k, v in preset_state.items())
    assert main(["check", "--model", str(out), "--out", str(tmp_path / "c")] + QUICK) == 0


def test_the_diffusers_folder_loads_in_diffusers_with_clips_tokenizer(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = tmp_path / "tiny"
    assert main(["convert", "--preset", "tiny", "--to", "diffusers", "--out", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    tok = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert pipe.text_encoder.config.vocab_size == 49408
    assert json.loads((out / "model_index.json").read_text())["tokenizer"] == ["transformers", "CLIPTokenizer"]


@pytest.mark.parametrize("args, words", [
    (["x.safetensors", "--preset", "tiny"], "give one source: a model path or --preset NAME"),
    ([], "give one source: a model path or --preset NAME"),
    (["--preset", "sd9"], "unknown preset 'sd9'"),
    (["--preset", "tiny", "--ema"], "--ema, --variant and --prediction-type read a model file"),
])
def test_bad_sources_are_exit_2(args, words, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert main(["convert", *args, "--to", "single", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not out.exists()
