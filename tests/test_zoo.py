"""Reference zoo: deterministic, offline, well-scaled; tokenizer offline."""
import torch

from parity import zoo


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


def test_generated_vocabulary_is_clip_format(tiny_cfg):
    vocab, merges = zoo.clip_vocab(tiny_cfg.text.vocab_size)
    assert len(vocab) == tiny_cfg.text.vocab_size == len(set(vocab.values()))
    assert vocab["<|startoftext|>"] == tiny_cfg.text.vocab_size - 2
    assert vocab["<|endoftext|>"] == tiny_cfg.text.vocab_size - 1
    for m in merges:  # every merge joins two tokens that exist, into one that exists
        a, b = m.split(" ")
        assert a in vocab and b in vocab and a + b in vocab


def test_tokenizer_offline_pads_to_77(tiny_cfg):
    tok = zoo.preset_tokenizer(tiny_cfg)
    ids = tok(["a photo of an astronaut"], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and tok.eos_token_id in ids
    assert max(ids) < tiny_cfg.text.vocab_size


def test_sd15_vocabulary_size(sd15_cfg):
    vocab, _ = zoo.clip_vocab(sd15_cfg.text.vocab_size)
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407


def test_folder_tokenizer(tmp_path, tiny_cfg):
    zoo.write_clip_tokenizer_files(tmp_path / "tokenizer", tiny_cfg.text.vocab_size)
    tok = zoo.folder_tokenizer(tmp_path)
    assert tok("a cat").input_ids == zoo.preset_tokenizer(tiny_cfg)("a cat").input_ids
