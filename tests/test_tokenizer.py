"""scratch_sd.tokenizer: CLIP's BPE from scratch, id for id with transformers' CLIPTokenizer and
CLIPTokenizerFast (the expected ids always come from transformers), the shipped vocabulary, the
gate's tokenizer component, and the scratch pipeline with transformers unavailable."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from sdparity.generate import MAX_ABS
from parity.prompt_corpus import CATEGORIES, build_corpus, category_counts
from scratch_sd import tokenizer as tk
from scratch_sd.tokenizer import DATA, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer()


@pytest.fixture(scope="module", params=["CLIPTokenizer", "CLIPTokenizerFast"])
def theirs(request):
    import transformers

    transformers.logging.set_verbosity_error()
    return getattr(transformers, request.param).from_pretrained(str(DATA), local_files_only=True)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


# --------------------------------------------------------------------------- the shipped files
def test_shipped_vocabulary(ours):
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == len(set(vocab.values())) == 49408 == len(ours)
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.model_max_length) == (49406, 49407, 49407, 77)
    notice = (DATA / "NOTICE").read_text(encoding="utf-8")
    assert "Permission is hereby granted, free of charge" in notice and "open_clip_torch 3.3.0" in notice


def test_the_one_bytes_to_unicode():
    """tools/derive_clip_vocab.py builds the vocabulary with scratch_sd's table (no copy of it)."""
    src = (ROOT / "tools" / "derive_clip_vocab.py").read_text(encoding="utf-8")
    assert "from scratch_sd.tokenizer import bytes_to_unicode" in src and "def bytes_to_unicode" not in src
    table = tk.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    vocab = json.loads((DATA / "vocab.json").read_text(encoding="utf-8"))
    assert [vocab[c] for c in table.values()] == list(range(256))  # the vocabulary opens with the byte table


def test_clips_own_example(ours):
    """OpenAI CLIP's README example, as every SD 1.x tokenizer gives it."""
    assert ours("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# --------------------------------------------------------------------------- id for id
def test_corpus_size_and_categories(corpus):
    counts = category_counts(corpus)
    assert len(corpus) >= 5000 and set(counts) == set(CATEGORIES) and min(counts.values()) >= 300, counts
    assert build_corpus() == corpus  # seeded: the same list every time
    text = "".join(p for _, p in corpus)
    scripts = {"CJK": "CJK UNIFIED", "HIRAGANA": "HIRAGANA", "HANGUL": "HANGUL", "CYRILLIC": "CYRILLIC",
               "ARABIC": "ARABIC", "DEVANAGARI": "DEVANAGARI", "GREEK": "GREEK", "HEBREW": "HEBREW", "THAI": "THAI"}
    named = {unicodedata.name(c, "") for c in set(text)}
    for script, prefix in scripts.items():
        assert any(n.startswith(prefix) for n in named), script
    assert "\u200d" in text and "\xa0" in text and "\t" in text and "<|endoftext|>" in text and "\u0301" in text
    assert any(len(p) > 400 for _, p in corpus)


def test_corpus_id_for_id(ours, theirs, corpus):
    prompts = [p for _, p in corpus]
    expected = theirs(prompts).input_ids
    got = [ours(p).input_ids for p in prompts]
    bad = [(cat, p, e, g) for (cat, p), e, g in zip(corpus, expected, got) if e != g]
    assert not bad, f"{len(bad)}/{len(prompts)} prompts differ; first: {bad[0][:2]} {bad[0][2]} vs ours {bad[0][3]}"


def test_pipeline_call_pads_and_truncates_as_transformers(ours, theirs, corpus):
    prompts = [p for _, p in corpus]
    kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    a, b = ours(prompts, **kw), theirs(prompts, **kw)
    assert a.input_ids.dtype == b.input_ids.dtype == torch.long and a.input_ids.shape == (len(prompts), 77)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.attention_mask, b.attention_mask)
    long = ours("a " * 200, **kw).input_ids[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] == 320).all()  # bos, 75 words, eos


@pytest.mark.parametrize("kwargs", [{}, {"padding": True}, {"padding": "longest"}, {"truncation": True},
                                    {"truncation": True, "max_length": 10},
                                    {"padding": "max_length", "max_length": 12},
                                    {"padding": "max_length", "max_length": 12, "truncation": True},
                                    {"add_special_tokens": False}])
def test_call_options(ours, theirs, kwargs):
    prompts = ["a photo of a cat", "", "an astronaut riding a horse on mars, " * 3, "<|endoftext|> x"]
    a, b = ours(prompts, **kwargs), theirs(prompts, **kwargs)
    assert a.input_ids == b.input_ids and a.attention_mask == b.attention_mask
    assert ours(prompts[0], **kwargs).input_ids == theirs(prompts[0], **kwargs).input_ids  # one string: a flat list


@pytest.mark.parametrize("prompt", ["<|endoftext|>", "a<|endoftext|>b", "<|ENDOFTEXT|>", "<|startoftext|>x<|endoftext|>",
                                    "<<|endoftext|>>", "<|endoftext", " <|endoftext|> ", "<|endoftext|><|endoftext|>",
                                    "</w>", "a</w>b"])
def test_special_token_text(ours, theirs, prompt):
    assert ours(prompt).input_ids == theirs(prompt).input_ids


def test_decode(ours, theirs, corpus):
    for _, prompt in corpus[::7]:
        ids = theirs(prompt).input_ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), prompt
    cut = theirs("日本語のテキスト").input_ids[1:4]  # a multi-byte character cut in half: U+FFFD as theirs
    assert ours.decode(cut) == theirs.decode(cut) and "\ufffd" in ours.decode(cut)
    ids = torch.tensor(theirs("a cat").input_ids)
    assert ours.decode(ids) == theirs.decode(ids.tolist())
    assert ours.batch_decode([ids.tolist()], skip_special_tokens=True) == ["a cat"]


def test_character_classes_over_every_code_point(ours, theirs):
    """Every BMP code point and a stride through the other planes, in a string that tells a letter
    from a number from whitespace from the rest ("a{c}a {c}{c}"), normalisation included. The only
    differences allowed are code points this Python's unicodedata does not know (category Cn):
    characters assigned after its Unicode version, which the Rust side may class as letters."""
    cps = [c for c in range(0x10000) if not 0xD800 <= c < 0xE000] + list(range(0x10000, 0x110000, 97))
    strings = [f"a{chr(c)}a {chr(c)}{chr(c)}" for c in cps]
    expected = theirs(strings).input_ids
    bad = [c for c, s, e in zip(cps, strings, expected) if ours(s).input_ids != e]
    unknown = [c for c in bad if unicodedata.category(chr(c)) != "Cn"]
    assert not unknown, f"{len(unknown)} assigned code points differ: {[hex(c) for c in unknown[:20]]}"
    assert len(bad) < 0.02 * len(cps)  # the post-{unicodedata.unidata_version} assignments are few


def test_whitespace_is_unicode_white_space_not_isspace(ours, theirs):
    assert "\x1c" not in tk.WHITESPACE and "\x1c".isspace()  # str.isspace() would be wrong here
    for c in ("\x1c", "\x1f", "\xa0", "\u3000", "\u200b", "\u180e", "\x85", "\ufeff"):
        assert ours(f"a{c}b").input_ids == theirs(f"a{c}b").input_ids, hex(ord(c))


def test_final_sigma_and_dotted_i(ours, theirs):
    """Lowercase is per character (Σ -> σ even at a word's end), as the Rust side does; str.lower()
    would give ς."""
    for p in ("ΟΔΟΣ", "İSTANBUL", "ǅ"):
        assert ours(p).input_ids == theirs(p).input_ids
    assert tk.normalize("ΟΔΟΣ") == "οδοσ" != "ΟΔΟΣ".lower()


# --------------------------------------------------------------------------- files
def test_from_pretrained_reads_the_files_transformers_saves(tmp_path, ours, theirs):
    theirs.save_pretrained(tmp_path / "tokenizer")  # transformers 5: tokenizer.json + tokenizer_config.json
    loaded = CLIPTokenizer.from_pretrained(tmp_path)  # finds tokenizer/
    assert loaded.encoder == ours.encoder and loaded.bpe_ranks == ours.bpe_ranks and loaded.model_max_length == 77
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer"):
        CLIPTokenizer.from_pretrained(tmp_path / "nothing")
    bad = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    bad["model"]["end_of_word_suffix"] = None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match="not CLIP's tokenizer"):
        CLIPTokenizer.from_pretrained(tmp_path / "other")


# --------------------------------------------------------------------------- the gate
def test_gate_component_passes_and_names_the_first_mismatch(monkeypatch):
    from parity import gate

    settings = gate.GateSettings.make(components="tokenizer")
    assert "tokenizer" in gate.DEFAULT_COMPONENTS and not settings.needs_networks
    result = gate.run_gate(settings)
    rows = [r for r in result.rows if r.component == "tokenizer"]
    assert len(rows) == 6 and all(r.compared and r.passed and r.max_abs == 0 for r in rows), rows
    assert {r.tensor for r in rows} == {"input_ids", "full_ids", "decoded"}

    from parity.tokenizer_check import run_tokenizer_checks

    monkeypatch.setattr(tk, "normalize", lambda text: text)  # no lowercasing: "A" is not "a"
    failed, _ = run_tokenizer_checks(corpus=[("caption", "a cat"), ("caption", "A Cat")])
    ids = [r for r in failed if r["tensor"] == "input_ids"]
    assert ids and all(not r["passed"] and r["max_abs"] >= 1 for r in ids)
    assert "'A Cat' at position 1" in ids[0]["reason"], ids[0]["reason"]


# --------------------------------------------------------------------------- no transformers
BLOCKED = textwrap.dedent("""
    import sys
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("transformers", "tokenizers", "diffusers"):
                raise ImportError(f"{name} is blocked in this test")
            return None
    sys.meta_path.insert(0, Blocker())
    try:
        import transformers
    except ImportError:
        pass
    else:
        raise SystemExit("the import hook does not work")
    import numpy as np, torch
    from scratch_sd.pipeline import ScratchPipeline
    pipe = ScratchPipeline.from_pretrained(sys.argv[1], scheduler="ddim")
    out = pipe("a red fox in the snow", num_inference_steps=2, output_type="np", progress=False,
               generator=torch.Generator().manual_seed(0)).images
    np.save(sys.argv[2], out)
    assert not any(m.split(".")[0] in ("transformers", "tokenizers", "diffusers") for m in sys.modules)
    print(type(pipe.tokenizer).__module__)
""")


@pytest.mark.slow
@pytest.mark.ci
def test_scratch_pipeline_runs_with_transformers_uninstalled(tiny_refs, tmp_path):
    """A tiny diffusers folder (written by diffusers and transformers), then, in a subprocess where
    importing transformers, tokenizers or diffusers raises, ScratchPipeline.from_pretrained on it and
    one image; the image equals diffusers' own from the same folder and seed."""
    from parity.pipelines import reference_pipeline

    ref = reference_pipeline(tiny_refs, "ddim")
    ref.save_pretrained(tmp_path / "model")
    out = tmp_path / "image.npy"
    proc = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path / "model"), str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "scratch_sd.tokenizer"
    ours = np.load(out)
    theirs = ref("a red fox in the snow", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= MAX_ABS  # issue 5's bar for final images (sdparity.generate)
