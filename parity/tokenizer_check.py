"""Tokenizer parity: scratch_sd.tokenizer against transformers' CLIPTokenizer and CLIPTokenizerFast,
id for id, on the same vocab.json + merges.txt, over the seeded prompt corpus (parity/prompt_corpus.py).

Per reference, three rows (component `tokenizer`, mode `corpus`, max_abs = the number of
mismatching ids or texts, mean_abs = that as a fraction, atol 0):
  input_ids    the pipeline's call: padding="max_length", max_length=77, truncation=True, as a tensor;
  full_ids     truncation=False (the pipeline decodes the dropped tail from these to warn);
  decoded      decode() of the reference's full ids, with and without the special tokens.
A failing row's reason names the first mismatching prompt, its category and position, and both ids.

In transformers 5.x CLIPTokenizerFast is the same class as CLIPTokenizer (the `tokenizers`-backed
one; the pure-Python CLIP tokenizer of transformers 4.x is gone): both are still gated, and the
row's case says whether they are one class. Token ids are integers, not a dtype: the rows are
recorded once per run, under its first dtype (so summary.md's table shows them).
"""
from __future__ import annotations

import time
from pathlib import Path

from parity.prompt_corpus import build_corpus
from scratch_sd.tokenizer import DATA, CLIPTokenizer

REFERENCES = ("CLIPTokenizer", "CLIPTokenizerFast")


def tokenizer_folder(model: Path | None) -> Path:
    """The files both sides read: a model folder's tokenizer/ when it has one, else CLIP's shipped files."""
    if model is not None:
        model = Path(model)
        for folder in (model / "tokenizer", model):
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                return folder
    return DATA


def _first_mismatch(corpus, ours, theirs) -> tuple[int, int, str]:
    """(mismatching positions, compared positions, what the first mismatch was)."""
    bad, total, first = 0, 0, ""
    for (cat, prompt), a, b in zip(corpus, ours, theirs):
        n = max(len(a), len(b))
        total += n
        diff = [k for k in range(n) if k >= len(a) or k >= len(b) or a[k] != b[k]]
        if diff and not first:
            k = diff[0]
            first = (f"first mismatch: {cat} prompt {prompt!r:.120} at position {k}: ours "
                     f"{a[k] if k < len(a) else 'none'} vs reference {b[k] if k < len(b) else 'none'} "
                     f"(lengths {len(a)} vs {len(b)})")
        bad += len(diff)
    return bad, total, first


def _row(name: str, tensor: str, shape: str, bad: int, total: int, first: str, case: str) -> dict:
    return dict(component="tokenizer", tensor=tensor, shape=shape, max_abs=float(bad),
                mean_abs=bad / total if total else 0.0, atol=0, rtol=0, passed=bad == 0,
                mode="corpus", case=case, reason=first if bad else "", scheduler="", step="",
                status="compared", reference_name=name)


def run_tokenizer_checks(folder: Path = DATA, corpus: list[tuple[str, str]] | None = None,
                         max_length: int = 77) -> tuple[list[dict], dict]:
    """Rows (plain dicts) and timings for our tokenizer vs each transformers reference."""
    import transformers

    corpus = build_corpus() if corpus is None else corpus
    prompts = [p for _, p in corpus]
    t0 = time.perf_counter()
    ours = CLIPTokenizer.from_pretrained(folder)
    our_full = [ours(p).input_ids for p in prompts]
    our_ids = ours(prompts, padding="max_length", max_length=max_length, truncation=True,
                   return_tensors="pt").input_ids.tolist()
    timings = {"ours_s": time.perf_counter() - t0}
    rows = []
    same_class = getattr(transformers, "CLIPTokenizerFast", None) is transformers.CLIPTokenizer
    transformers.logging.set_verbosity_error()  # "sequence longer than 77" for every long prompt
    for name in REFERENCES:
        t1 = time.perf_counter()
        ref = getattr(transformers, name).from_pretrained(str(folder), local_files_only=True)
        ref_ids = ref(prompts, padding="max_length", max_length=max_length, truncation=True,
                      return_tensors="pt").input_ids.tolist()
        ref_full = ref(prompts, truncation=False).input_ids
        case = (f"reference {name} = transformers {transformers.__version__} {type(ref).__module__}."
                f"{type(ref).__name__}; {len(prompts)} prompts" + ("; CLIPTokenizerFast is CLIPTokenizer" if same_class else ""))
        rows.append(_row(name, "input_ids", f"{len(prompts)}x{max_length}",
                         *_first_mismatch(corpus, our_ids, ref_ids), case))
        rows.append(_row(name, "full_ids", f"{len(prompts)}x<={max(map(len, ref_full))}",
                         *_first_mismatch(corpus, our_full, ref_full), case))
        bad, first = 0, ""
        for (cat, prompt), ids in zip(corpus, ref_full):
            for skip in (False, True):
                a, b = ours.decode(ids, skip_special_tokens=skip), ref.decode(ids, skip_special_tokens=skip)
                if a != b:
                    bad += 1
                    first = first or (f"first mismatch: decode(skip_special_tokens={skip}) of the {cat} prompt "
                                      f"{prompt!r:.120}: ours {a!r:.80} vs reference {b!r:.80}")
        rows.append(_row(name, "decoded", f"{2 * len(prompts)} texts", bad, 2 * len(prompts), first, case))
        timings[f"{name}_s"] = time.perf_counter() - t1
    return rows, timings


def check_tokenizer(run, g) -> None:
    """The gate's `tokenizer` component: once per run, for the scratch candidates (ours is theirs)."""
    if "tokenizer" not in run.settings.components or not g.scratch_family:
        return
    folder = tokenizer_folder(run.settings.model)
    run.say(f"tokenizer: ours vs transformers' {' and '.join(REFERENCES)} on {folder}")
    rows, _ = run_tokenizer_checks(folder)
    for r in rows:
        r.pop("reference_name")
        run.rec.add(g, r, dtype=run.settings.dtypes[0], device="cpu", preset=run.rec.preset)
