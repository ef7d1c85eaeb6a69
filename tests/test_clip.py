"""CLIP text encoder: key tables, strict conversion, and parity with transformers' CLIPTextModel.

tiny runs in CI; sd15 cases are marked slow (one of them also `ci`).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from parity import metrics, zoo
from scratch_sd import layers
from scratch_sd.clip import CLIPTextModel
from scratch_sd.config import preset
from scratch_sd.convert import clip as convert
from scratch_sd.convert.common import ConversionError, load_strict

PRESETS = ["tiny", pytest.param("sd15", marks=pytest.mark.slow)]
PROMPTS = [
    "a photo of a cat",
    "an astronaut riding a horse on mars, highly detailed, 8k",
    "",
    "a very long prompt " * 30,  # truncated at 77 tokens: no padding, eos in the last slot
]
MAX_REL_L2, MIN_PSNR = 1e-5, 90.0


# --------------------------------------------------------------------------- fixtures
def models(name: str, seed: int = 0, **text_options):
    """(reference, scratch, text cfg): the zoo's seeded transformers model and ours with converted weights."""
    cfg = preset(name)
    return _models(replace(cfg, text=replace(cfg.text, **text_options)), seed)


@functools.lru_cache(maxsize=None)
def _models(cfg, seed: int):
    ref = zoo.reference_text_encoder(cfg, seed)
    ours = CLIPTextModel(cfg.text).eval()
    load_strict(ours, convert.from_diffusers(ref.state_dict(), cfg.text))
    return ref, ours, cfg.text


def token_batch(cfg, seed: int, batch: int = 4) -> torch.Tensor:
    """Tokenizer-shaped random prompts: bos, words, eos, then padding (eos as SD 1.x pads, or 0 as SD 2.x)."""
    g = torch.Generator().manual_seed(seed)
    bos, eos, t = cfg.vocab_size - 2, cfg.vocab_size - 1, cfg.max_positions
    ids = torch.randint(0, cfg.vocab_size - 2, (batch, t), generator=g)
    for row in range(batch):
        n = int(torch.randint(0, t - 1, (1,), generator=g))  # words; n = t - 2 fills the window
        pad = eos if row % 2 == 0 else 0
        ids[row, 0], ids[row, n + 1] = bos, eos
        ids[row, n + 2:] = pad
    return ids


@functools.lru_cache(maxsize=None)
def _tokenizer(vocab_size: int):
    return zoo.preset_tokenizer(replace(preset("tiny"), text=replace(preset("tiny").text, vocab_size=vocab_size)))


def tokenized(cfg) -> torch.Tensor:
    return _tokenizer(cfg.vocab_size)(PROMPTS, padding="max_length", max_length=cfg.max_positions, truncation=True,
               return_tensors="pt").input_ids


@torch.no_grad()
def run_both(ref, ours, ids):
    r = ref(ids)
    hidden = ours(ids)
    return (r.last_hidden_state, hidden), (r.pooler_output, ours.pooled(hidden, ids))


def assert_parity(ref_t, out_t, what: str):
    e = metrics.compare(ref_t, out_t)
    assert e.finite and e.rel_l2 <= MAX_REL_L2 and e.psnr_db >= MIN_PSNR, f"{what}: {e}"


# --------------------------------------------------------------------------- key tables
@pytest.mark.parametrize("name", PRESETS)
def test_table_covers_both_sides_one_to_one(name):
    ref, ours, cfg = models(name)
    live = convert.diffusers_table(cfg, prefix="")  # transformers >= 5.6 flattened CLIPTextModel
    assert sorted(live.theirs_keys()) == sorted(ref.state_dict())
    assert sorted(live.ours_keys()) == sorted(ours.state_dict())
    assert len(set(live.theirs_keys())) == len(live.theirs_keys())  # one-to-one (KeyTable also checks)
    assert not any(k.endswith("position_ids") for k in ref.state_dict()), "position_ids is a non-persistent buffer"
    canonical = convert.diffusers_table(cfg)
    assert canonical.theirs_keys() == ["text_model." + k for k in live.theirs_keys()]
    n_layer_keys = 16 * cfg.layers  # q, k, v, out, 2 norms, 2 fc: weight and bias each
    assert len(canonical.theirs_keys()) == 2 + n_layer_keys + 2


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip_is_identity(name):
    ref, _, cfg = models(name)
    theirs = ref.state_dict()
    back = convert.to_diffusers(convert.from_diffusers(theirs, cfg), cfg, prefix="")
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], theirs[k]) for k in theirs)
    # The canonical on-disk form converts the same way.
    file_form = {"text_model." + k: v for k, v in theirs.items()}
    again = convert.to_diffusers(convert.from_diffusers(file_form, cfg), cfg)
    assert again.keys() == file_form.keys() and all(torch.equal(again[k], file_form[k]) for k in file_form)


def test_converted_weights_load_into_the_reference():
    ref, ours, cfg = models("tiny")
    fresh = copy.deepcopy(ref)
    for p in fresh.parameters():
        p.data.zero_()
    fresh.load_state_dict(convert.to_diffusers(ours.state_dict(), cfg, prefix=""), strict=True)
    ids = token_batch(cfg, 0)
    with torch.no_grad():
        assert torch.equal(fresh(ids).last_hidden_state, ref(ids).last_hidden_state)


def test_qkv_is_fused_in_q_k_v_order():
    ref, ours, _ = models("tiny")
    attn = ref.encoder.layers[1].self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(ours.layers[1].attn.qkv.weight, w)


@pytest.mark.parametrize("defect", ["missing", "extra", "misshaped"])
def test_bad_state_dict_names_the_key(defect):
    ref, _, cfg = models("tiny")
    state = dict(ref.state_dict())
    key = "encoder.layers.1.mlp.fc1.weight"
    if defect == "missing":
        del state[key]
    elif defect == "extra":
        key = "encoder.layers.1.mlp.fc3.weight"
        state[key] = torch.zeros(1)
    else:
        state[key] = state[key][:, :-1]
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
        convert.from_diffusers(state, cfg)


def test_bad_scratch_state_dict_names_the_key():
    _, ours, cfg = models("tiny")
    state = dict(ours.state_dict())
    state["layers.0.attn.qkv.weight"] = state["layers.0.attn.qkv.weight"][:-3]
    with pytest.raises(ConversionError, match=r"layers\.0\.attn\.qkv\.weight"):
        convert.to_diffusers(state, cfg)
    del state["norm.bias"]
    with pytest.raises(ConversionError, match=r"norm\.bias"):
        convert.to_ldm(state, cfg)


def test_position_ids_are_dropped_by_name_only():
    ref, ours, cfg = models("tiny")
    old = {"text_model." + k: v for k, v in ref.state_dict().items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # transformers < 4.31 files
    converted = convert.from_diffusers(old, cfg)
    assert all(torch.equal(converted[k], v) for k, v in ours.state_dict().items())
    old["text_model.embeddings.other_ids"] = torch.arange(77)[None]
    with pytest.raises(ConversionError, match=r"other_ids"):
        convert.from_diffusers(old, cfg)


# --------------------------------------------------------------------------- LDM single file
@pytest.mark.parametrize("name", PRESETS)
def test_ldm_round_trip_and_names(name):
    _, ours, cfg = models(name)
    ldm = convert.ldm_table(cfg)
    assert ldm.theirs_keys() == ["cond_stage_model.transformer." + k for k in convert.diffusers_table(cfg).theirs_keys()]
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm.theirs_keys())
    state = ours.state_dict()
    back = convert.from_ldm(convert.to_ldm(state, cfg), cfg)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_ldm_old_form_and_position_ids_are_normalized():
    _, ours, cfg = models("tiny")
    canonical = convert.to_ldm(ours.state_dict(), cfg)
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in canonical.items()}
    old["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77.0)[None]
    assert not any("text_model" in k for k in old)
    assert convert.normalize_ldm_clip_keys(old).keys() == canonical.keys()
    back = convert.from_ldm(old, cfg)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    both = dict(canonical, **{"cond_stage_model.transformer.final_layer_norm.weight": canonical[
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"]})
    with pytest.raises(ConversionError, match=r"final_layer_norm\.weight"):
        convert.normalize_ldm_clip_keys(both)


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", [
    "tiny", pytest.param("sd15", marks=[pytest.mark.slow, pytest.mark.ci])])
def test_fp32_parity_random_and_tokenized_prompts(name):
    ref, ours, cfg = models(name)
    for seed in range(3):
        ids = token_batch(cfg, seed)
        (r, o), (rp, op) = run_both(ref, ours, ids)
        assert_parity(r, o, f"{name} last_hidden_state seed {seed}")
        assert_parity(rp, op, f"{name} pooled seed {seed}")
    ids = tokenized(cfg)
    (r, o), (rp, op) = run_both(ref, ours, ids)
    assert_parity(r, o, f"{name} last_hidden_state, tokenized prompts")
    assert_parity(rp, op, f"{name} pooled, tokenized prompts")


def test_fp32_parity_other_weights_short_sequence_and_gelu():
    for seed, activation in ((1, "quick_gelu"), (2, "gelu")):
        ref, ours, cfg = models("tiny", seed=seed, activation=activation)
        ids = token_batch(cfg, seed)[:, :20]  # shorter than 77: positions 0..19
        (r, o), (rp, op) = run_both(ref, ours, ids)
        assert_parity(r, o, f"seed {seed} activation {activation}")
        assert_parity(rp, op, f"pooled seed {seed} activation {activation}")


def test_pooling_rules():
    # Legacy rule (eos_token_id == 2): argmax of the ids; new rule: first position equal to eos.
    ids = torch.tensor([[998, 5, 999, 999, 999], [998, 999, 7, 999, 0]])
    for eos, expected in ((2, [2, 1]), (7, [0, 2]), (999, [2, 1])):
        model = CLIPTextModel(replace(preset("tiny").text, eos_token_id=eos))
        hidden = torch.randn(2, 5, model.cfg.width)
        assert torch.equal(model.pooled(hidden, ids), hidden[torch.arange(2), torch.tensor(expected)])
    ref, ours, cfg = models("tiny", eos_token_id=999)
    ids = torch.cat([ids, torch.full((2, 3), 5)], dim=1)
    (r, o), (rp, op) = run_both(ref, ours, ids)
    assert_parity(rp, op, "pooled with eos_token_id=999")


def test_hidden_states_for_clip_skip():
    ref, ours, cfg = models("tiny")
    ids = tokenized(cfg)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True)
        last, hidden = ours(ids, output_hidden_states=True)
        assert len(hidden) == len(r.hidden_states) == cfg.layers + 1
        for i, (a, b) in enumerate(zip(r.hidden_states, hidden)):
            assert_parity(a, b, f"hidden_states[{i}]")
        # clip skip 1, as diffusers' pipeline does it
        assert_parity(ref.final_layer_norm(r.hidden_states[-2]), ours.norm(hidden[-2]), "clip skip 1")
        assert torch.equal(last, ours(ids))


def test_bf16_is_finite_and_close_to_fp32():
    ref, ours, cfg = models("tiny")
    ids = tokenized(cfg)
    with torch.no_grad():
        fp32 = ref(ids).last_hidden_state
        ours16 = CLIPTextModel(cfg).to(torch.bfloat16).eval()
        ours16.load_state_dict(ours.state_dict())
        out = ours16(ids)
        ref16 = copy.deepcopy(ref).to(torch.bfloat16)(ids).last_hidden_state
    assert out.dtype == torch.bfloat16
    e, e_ref = metrics.compare(fp32, out), metrics.compare(fp32, ref16)
    assert e.finite and e.cosine_distance < 1e-2, f"scratch bf16 vs fp32: {e}"
    assert e_ref.finite and e.rel_l2 < 2 * e_ref.rel_l2 + 1e-3, f"scratch bf16 {e} vs transformers bf16 {e_ref}"


def test_meta_build_then_to_empty_loads_and_matches():
    ref, ours, cfg = models("tiny")
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model = load_strict(model.to_empty(device="cpu"), convert.from_diffusers(ref.state_dict(), cfg)).eval()
    for m in model.modules():  # the project's protocol: to_empty() loses non-persistent buffers
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    ids = tokenized(cfg)
    with torch.no_grad():
        assert torch.equal(model(ids), ours(ids))


def test_fp16_runs_and_is_finite():
    _, ours, cfg = models("tiny")
    half = CLIPTextModel(cfg).to(torch.float16).eval()
    half.load_state_dict(ours.state_dict())
    with torch.no_grad():
        out = half(tokenized(cfg))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------- invariants and localiser
def test_causal_and_every_parameter_gets_a_gradient():
    _, ours, cfg = models("tiny")
    model = CLIPTextModel(cfg)
    model.load_state_dict(ours.state_dict())
    ids = token_batch(cfg, 0, batch=2)
    changed = ids.clone()
    changed[:, 40:] = 3
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :40], b[:, :40]) and not torch.equal(a[:, 40:], b[:, 40:])
    model.pooled(model(ids), ids).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == [], f"parameters without gradient: {no_grad}"


def test_gate_notices_an_injected_bug(monkeypatch):
    ref, ours, cfg = models("tiny")
    ids = tokenized(cfg)
    monkeypatch.setattr(layers, "quick_gelu", F.gelu)
    (r, o), _ = run_both(ref, ours, ids)
    e = metrics.compare(r, o)
    assert e.rel_l2 > 1e-3, f"erf GELU instead of QuickGELU went unnoticed: {e}"


def _outputs(model, names, ids):
    got = {}

    def keep(name):
        def hook(module, args, out):  # returns None: the output is left alone
            got.setdefault(name, (out[0] if isinstance(out, tuple) else out).clone())  # later ops may run in place
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return got


def test_module_pairs_exist_and_match():
    ref, ours, cfg = models("tiny")
    pairs = convert.module_pairs(cfg)
    ours_names, ref_names = [o for o, _ in pairs], [t for _, t in pairs]
    ours_mods, ref_mods = dict(ours.named_modules()), dict(ref.named_modules())
    assert [n for n in ours_names if n not in ours_mods] == [] and [n for n in ref_names if n not in ref_mods] == []
    assert len(set(ours_names)) == len(pairs) == len(set(ref_names))
    ids = tokenized(cfg)
    a, b = _outputs(ours, ours_names, ids), _outputs(ref, ref_names, ids)
    assert list(a) == ours_names, "pairs are not in execution order"
    for o, t in pairs:
        e = metrics.compare(b[t], a[o])
        assert e.rel_l2 <= MAX_REL_L2, f"{o} vs {t}: {e}"
