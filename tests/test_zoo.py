"""Reference zoo: deterministic, offline, well-scaled; tokenizer offline."""
from dataclasses import replace

import pytest
import torch

from parity import zoo
from scratch_sd.config import preset


def test_seeded_weights_are_deterministic_and_seed_dependent(tiny_cfg):
    a = zoo.reference_unet(tiny_cfg, seed=0).state_dict()
    b = zoo.reference_unet(tiny_cfg, seed=0).state_dict()
    c = zoo.reference_unet(tiny_cfg, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_activations_are_well_scaled(tiny_cfg):
    refs = zoo.reference_components(tiny_cfg, seed=0)
    tok = zoo.preset_tokenizer(tiny_cfg)
    ids = tok(["a photo of a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        emb = refs["text_encoder"](ids)[0]
        z = refs["vae"].encode(torch.rand(1, 3, 64, 64) * 2 - 1).latent_dist.mean
        img = refs["vae"].decode(z).sample
        eps = refs["unet"](torch.randn(2, 4, 8, 8), 500, encoder_hidden_states=emb).sample
    for name, t in (("text", emb), ("latent", z), ("image", img), ("eps", eps)):
        assert torch.isfinite(t).all(), name
        assert 0.05 < float(t.std()) < 20, f"{name} std {float(t.std())}"


def test_shipped_vocabulary_is_clips(tiny_cfg):
    """The presets tokenize with CLIP's real 49408-token vocabulary: CLIP's own example prompt gives
    the ids OpenAI's CLIP README and every SD 1.x tokenizer give."""
    tok = zoo.preset_tokenizer(tiny_cfg)
    assert tiny_cfg.text.vocab_size == len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_placeholder_vocabulary_is_gone():
    assert not hasattr(zoo, "clip_vocab")
    with pytest.raises(ValueError, match="49408"):
        zoo.preset_tokenizer(replace(preset("tiny"), text=replace(preset("tiny").text, vocab_size=1000)))


def test_tokenizer_offline_pads_to_77(tiny_cfg):
    tok = zoo.preset_tokenizer(tiny_cfg)
    ids = tok(["a photo of an astronaut"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert max(ids) < tiny_cfg.text.vocab_size


def test_sd15_vocabulary_size(sd15_cfg):
    assert len(zoo.preset_tokenizer(sd15_cfg)) == sd15_cfg.text.vocab_size == 49408


def test_folder_tokenizer(tmp_path, tiny_cfg):
    zoo.write_clip_tokenizer_files(tmp_path / "tokenizer")
    tok = zoo.folder_tokenizer(tmp_path)
    assert tok("a cat").input_ids == zoo.preset_tokenizer(tiny_cfg)("a cat").input_ids
