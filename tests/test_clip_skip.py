"""clip_skip as diffusers' pipeline uses it (issue #19): the prompt embeddings from an inner layer
of the text encoder, through its final LayerNorm, gated in the swap matrix and the scratch pipeline
with `--clip-skip N`; a candidate that gets the hidden states wrong fails; one that cannot give them
is a skipped row with the reason."""
from __future__ import annotations

import csv

import pytest
import torch

from parity.gate import GateSettings, SettingsError, run_gate
from sdparity.main import main

QUICK = ["--preset", "tiny", "--dtypes", "fp32", "--modes", "txt2img", "--num-seeds", "1", "--no-plots", "--quiet"]


def _rows(folder):
    with open(folder / "parity.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_reference_pipeline_really_runs_clip_skip(tiny_refs):
    """diffusers' pipeline with clip_skip=1 changes the prompt's embeddings and (as diffusers 0.42
    does) not the negative prompt's; transformers' own hidden states give the expected values."""
    from parity.pipelines import diffusers_scheduler
    from parity.trace import PROMPTS, run_pipeline

    parts = {"tokenizer": tiny_refs.tokenizer, **tiny_refs.networks}
    sched = lambda: diffusers_scheduler("pndm", tiny_refs.scheduler_config)  # noqa: E731
    plain = run_pipeline(parts, sched(), "txt2img", 0, 1, 64)
    skipped = run_pipeline(parts, sched(), "txt2img", 0, 1, 64, clip_skip=1)
    n = len(PROMPTS)
    te = tiny_refs.networks["text_encoder"]
    ids = tiny_refs.tokenizer(list(PROMPTS), padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    with torch.no_grad():
        out = te(ids, output_hidden_states=True)
        expected = te.final_layer_norm(out.hidden_states[-2])
    cond, uncond = skipped.text_embeddings[0][:n], skipped.text_embeddings[0][n:]
    assert torch.equal(cond, expected)
    assert not torch.equal(cond, plain.text_embeddings[0][:n])
    assert torch.equal(uncond, plain.text_embeddings[0][n:])


@pytest.mark.parametrize("n", [1, 2])
def test_scratch_passes_with_clip_skip(n, tiny_refs):
    settings = GateSettings.make(preset="tiny", components="text_encoder,pipeline", dtypes="fp32", modes="txt2img",
                                 num_seeds=1, clip_skip=n)
    result = run_gate(settings, references=tiny_refs)
    compared = result.compared
    assert compared and not result.failed
    piped = [r for r in compared if r.mode == "txt2img"]
    assert {r.component for r in piped} == {"text_encoder", "all_swapped", "pipeline"}
    assert all(r.case == f"seed=0 clip_skip={n}" for r in piped)


def test_a_hidden_states_bug_fails_only_with_clip_skip(tmp_path):
    spec = "candidate_fixtures:hidden_states_off_by_one"
    args = ["check", "--candidates", spec, "--components", "text_encoder"] + QUICK
    assert main(args + ["--out", str(tmp_path / "plain")]) == 0
    assert main(args + ["--clip-skip", "1", "--out", str(tmp_path / "skip")]) == 1
    bad = [r for r in _rows(tmp_path / "skip") if r["passed"] == "False"]
    assert bad and {r["tensor"] for r in bad} >= {"text_embeddings"}
    assert all(r["mode"] == "txt2img" and r["case"] == "seed=0 clip_skip=1" for r in bad)


def test_a_candidate_without_hidden_states_is_skipped_with_the_reason(tmp_path):
    out = tmp_path / "c"
    assert main(["check", "--candidates", "candidate_fixtures:last_layer_only_text_encoder", "--components",
                 "text_encoder", "--clip-skip", "1", "--out", str(out)] + QUICK) == 0
    rows = _rows(out)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert skipped and all("does not take output_hidden_states" in r["reason"] for r in skipped)
    assert [r for r in rows if r["status"] == "compared" and r["mode"] == "direct"]  # still gated directly


@pytest.mark.parametrize("value, words", [("0", "--clip-skip must be an integer >= 1"),
                                          ("3", "--clip-skip 3 is beyond the 2-layer text encoder")])
def test_bad_clip_skip_is_exit_2(value, words, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["check", "--components", "text_encoder", "--clip-skip", value, "--out", str(out)] + QUICK) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not out.exists()


def test_scratch_pipeline_refuses_a_bad_clip_skip(tiny_refs):
    from parity.pipelines import scratch_pipeline_from_references

    pipe = scratch_pipeline_from_references(tiny_refs)
    for bad in (-1, 3, 1.5, True):
        with pytest.raises(ValueError, match="`clip_skip` must be an integer from 0 to 2"):
            pipe("a fox", num_inference_steps=1, height=64, width=64, output_type="pt", progress=False,
                 clip_skip=bad)
    with pytest.raises(SettingsError):
        GateSettings.make(clip_skip=-2)


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_sd15_passes_with_clip_skip_fp32(n):
    settings = GateSettings.make(preset="sd15", components="text_encoder,pipeline", dtypes="fp32", modes="txt2img",
                                 num_seeds=1, clip_skip=n)
    result = run_gate(settings)
    piped = [r for r in result.compared if r.mode == "txt2img"]
    assert piped and not result.failed
    assert all(r.case == f"seed=0 clip_skip={n}" for r in piped)
