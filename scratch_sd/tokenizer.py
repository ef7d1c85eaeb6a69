"""CLIP's byte-level BPE tokenizer, from scratch in plain Python (stdlib only).

    tok = CLIPTokenizer()                                   # the shipped vocabulary (data/clip/)
    tok = CLIPTokenizer.from_pretrained("path/to/sd15")     # a folder's tokenizer/ (vocab.json + merges.txt)
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids                # (1, 77): bos, 5 tokens, eos, eos padding

Step by step as transformers' CLIPTokenizer (5.x, backed by the `tokenizers` library) runs it, so
that the ids are the same id for id (the `tokenizer` component of `sdparity check` gates that):

1. special tokens: the raw text is cut around the literal strings "<|startoftext|>" and
   "<|endoftext|>" (case-sensitive, before any normalisation); each becomes its id;
2. normalise every other segment: NFC, each run of whitespace -> one space, lowercase one
   character at a time (so a final capital sigma becomes "σ", not "ς", as the Rust side does);
3. pre-tokenise with CLIP's pattern, keeping the matches and dropping what lies between them:
       <|startoftext|> | <|endoftext|> | 's 't 're 've 'm 'll 'd | \\p{L}+ | \\p{N} | [^\\s\\p{L}\\p{N}]+
   then GPT-2's byte-level pattern over each match (it only splits the special-token text that
   survived step 1, e.g. "<|ENDOFTEXT|>" -> "<|", "endoftext", "|>");
4. byte-level: each piece's UTF-8 bytes mapped to printable characters (bytes_to_unicode), so
   every string is representable (no unknown tokens);
5. BPE: the piece's characters, the last one with "</w>", merged pair by pair in the order of
   merges.txt (lowest rank first) until no listed pair is left;
6. bos + ids + eos; truncation keeps bos, the first max_length - 2 ids and eos; padding appends
   the pad id (eos for SD 1.x) up to max_length.

Character classes: the `regex` module's \\p{L} / \\p{N} are Unicode general categories L* / N*
(unicodedata.category), \\s is Unicode's White_Space property (the fixed list below; it is not
str.isspace(), which also counts U+001C..U+001F). Python's unicodedata is Unicode 14.0 on 3.11;
the Rust side may know code points assigned later, so a character assigned after 14.0 can be
classed differently (tests/test_tokenizer.py sweeps every code point and lists the difference).
"""
from __future__ import annotations

import json
import unicodedata
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "clip"  # CLIP's vocab.json + merges.txt (see its NOTICE)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in the pattern's order
# The pattern as tokenizer.json stores it (JSON-escaped), to recognise CLIP's tokenizer.json.
CLIP_PATTERN = json.dumps(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")[1:-1]

# Unicode's White_Space property (PropList.txt; unchanged since Unicode 6.3 dropped U+180E).
WHITESPACE = frozenset(
    [chr(c) for c in range(0x09, 0x0E)] + [" ", "\x85", "\xa0", "\u1680"]
    + [chr(c) for c in range(0x2000, 0x200B)] + ["\u2028", "\u2029", "\u202f", "\u205f", "\u3000"])


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table: printable Latin-1 bytes
    map to themselves, the other 68 to U+0100 onwards."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


# --------------------------------------------------------------------------- character classes
@lru_cache(maxsize=1 << 16)
def char_class(c: str) -> str:
    """'s' (White_Space), 'L' (a letter: Lu Ll Lt Lm Lo), 'N' (a number: Nd Nl No), or 'o'."""
    if c in WHITESPACE:
        return "s"
    major = unicodedata.category(c)[0]
    return major if major in "LN" else "o"


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, per-character lowercase (step 2)."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for c in text:
        if c in WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(c.lower())
            in_space = False
    return "".join(out)


def _scan(text: str, specials: tuple[str, ...], number_runs: bool) -> list[str]:
    """The matches of specials | 's|'t|'re|'ve|'m|'ll|'d | L+ | N (or N+) | [^sLN]+, left to right,
    whitespace between matches dropped (regex alternation: the first alternative that matches wins)."""
    out, i, n = [], 0, len(text)
    starts = {s[0] for s in specials}
    while i < n:
        c = text[i]
        if c in starts:
            special = next((s for s in specials if text.startswith(s, i)), None)
            if special is not None:
                out.append(special)
                i += len(special)
                continue
        if c == "'":
            tail = next((t for t in CONTRACTIONS if text.startswith(t, i + 1)), None)
            if tail is not None:
                out.append("'" + tail)
                i += 1 + len(tail)
                continue
        cls = char_class(c)
        if cls == "s":
            i += 1
            continue
        j = i + 1
        if cls == "L" or (cls == "N" and number_runs):
            while j < n and char_class(text[j]) == cls:
                j += 1
        elif cls == "o":
            while j < n and char_class(text[j]) == "o":
                j += 1
        out.append(text[i:j])
        i = j
    return out


def pre_tokenize(text: str) -> list[str]:
    """CLIP's pattern over normalised text, then GPT-2's byte-level pattern over each piece (step 3)."""
    return [sub for piece in _scan(text, (BOS, EOS), number_runs=False)
            for sub in _scan(piece, (), number_runs=True)]


def split_specials(text: str, specials: tuple[str, ...]) -> list[tuple[str, bool]]:
    """(segment, is_special) in order: the raw text cut around the literal special tokens (step 1),
    leftmost first, the longest where two start at the same place."""
    out, start = [], 0
    while True:
        found = [(at, -len(s), s) for s in specials if (at := text.find(s, start)) >= 0]
        if not found:
            break
        at, _, special = min(found)  # leftmost, then longest
        if start < at:
            out.append((text[start:at], False))
        out.append((special, True))
        start = at + len(special)
    if start < len(text):
        out.append((text[start:], False))
    return out


# --------------------------------------------------------------------------- the tokenizer
class Encoding(dict):
    """What a call returns: `.input_ids` and `.attention_mask` (also as keys), as transformers' BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CLIPTokenizer:
    """CLIP's BPE over a vocab.json + merges.txt pair, called as transformers' CLIPTokenizer is."""

    def __init__(self, vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None,
                 model_max_length: int = 77, bos_token: str = BOS, eos_token: str = EOS,
                 pad_token: str = EOS, unk_token: str = EOS):
        if vocab is None and merges is None:
            vocab, merges = read_vocab(DATA)
        elif vocab is None or merges is None:
            raise ValueError("give vocab and merges together (or neither, for the shipped CLIP files)")
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.model_max_length = int(model_max_length)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name) not in self.encoder:
                raise ValueError(f"{name} {getattr(self, name)!r} is not in the vocabulary")
        self.specials = tuple(dict.fromkeys((bos_token, eos_token, pad_token, unk_token)))
        self._bpe_cache: dict[str, list[str]] = {}

    # ---- construction
    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "CLIPTokenizer":
        """A folder holding vocab.json + merges.txt, or the tokenizer.json transformers 5 saves (and
        optionally tokenizer_config.json); or a model folder with them in tokenizer/."""
        folder = Path(path)
        if (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab, merges = read_vocab(folder)
        elif (folder / "tokenizer.json").is_file():
            vocab, merges = read_tokenizer_json(folder / "tokenizer.json")
        else:
            raise FileNotFoundError(f"no CLIP tokenizer in {folder} (expected vocab.json and merges.txt, or "
                                    "tokenizer.json)")
        conf_path = folder / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
        kwargs = {k: _token_text(conf[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in conf}
        if isinstance(conf.get("model_max_length"), int) and conf["model_max_length"] < 1 << 30:
            kwargs["model_max_length"] = conf["model_max_length"]
        return cls(vocab, merges, **{**kwargs, **overrides})

    # ---- ids
    @property
    def bos_token_id(self) -> int:
        return self.encoder[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self.encoder[self.eos_token]

    @property
    def pad_token_id(self) -> int:
        return self.encoder[self.pad_token]

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def __len__(self) -> int:
        return len(self.encoder)

    def bpe(self, piece: str) -> list[str]:
        """The BPE tokens of one byte-mapped piece (step 5)."""
        cached = self._bpe_cache.get(piece)
        if cached is not None:
            return cached
        word = list(piece[:-1]) + [piece[-1] + END_OF_WORD]
        while len(word) > 1:
            pairs = {(word[k], word[k + 1]) for k in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, k = [], 0
            while k < len(word):  # every occurrence of the pair, left to right
                if k < len(word) - 1 and (word[k], word[k + 1]) == best:
                    merged.append(word[k] + word[k + 1])
                    k += 2
                else:
                    merged.append(word[k])
                    k += 1
            word = merged
        if len(self._bpe_cache) < 100_000:
            self._bpe_cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """The ids of `text` without bos/eos (steps 1-5)."""
        unk = self.encoder[self.unk_token]
        ids: list[int] = []
        for segment, special in split_specials(text, self.specials):
            if special:
                ids.append(self.encoder[segment])
                continue
            for piece in pre_tokenize(normalize(segment)):
                mapped = "".join(BYTE_ENCODER[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder.get(t, unk) for t in self.bpe(mapped))
        return ids

    def __call__(self, text: str | list[str], padding: bool | str = False, max_length: int | None = None,
                 truncation: bool | None = None, return_tensors: str | None = None,
                 add_special_tokens: bool = True) -> Encoding:
        """input_ids (+ attention_mask) as transformers returns them: a list for one string, a list of
        lists for a list, a (batch, length) LongTensor with return_tensors="pt" (step 6)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        if padding not in (False, True, "max_length", "longest", "do_not_pad"):
            raise ValueError(f"padding must be False, True, 'longest' or 'max_length', got {padding!r}")
        if truncation not in (None, False, True, "longest_first", "do_not_truncate"):
            raise ValueError(f"unsupported truncation {truncation!r}")
        limit = max_length if max_length is not None else self.model_max_length
        rows = []
        for t in texts:
            ids = self.encode(t)
            if add_special_tokens:
                if truncation in (True, "longest_first"):
                    ids = ids[:max(limit - 2, 0)]
                ids = [self.bos_token_id] + ids + [self.eos_token_id]
            elif truncation in (True, "longest_first"):
                ids = ids[:limit]
            rows.append(ids)
        width = limit if padding == "max_length" else max(map(len, rows)) if padding in (True, "longest") else 0
        masks = [[1] * len(r) + [0] * max(width - len(r), 0) for r in rows]
        rows = [r + [self.pad_token_id] * max(width - len(r), 0) for r in rows]
        if return_tensors == "pt":
            import torch

            if len({len(r) for r in rows}) > 1:
                raise ValueError("rows of different lengths: pass padding='max_length' (or True) for a tensor")
            return Encoding(input_ids=torch.tensor(rows, dtype=torch.long),
                            attention_mask=torch.tensor(masks, dtype=torch.long))
        if return_tensors is not None:
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        return Encoding(input_ids=rows[0] if single else rows, attention_mask=masks[0] if single else masks)

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.decoder[int(i)] for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text back from ids: tokens joined, bytes decoded (invalid UTF-8 -> U+FFFD), each "</w>" a
        space, stripped, as transformers' CLIPTokenizer.decode."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        special_ids = {self.encoder[s] for s in self.specials}
        data = bytearray()
        for i in ids:
            if skip_special_tokens and int(i) in special_ids:
                continue
            token = self.decoder[int(i)]
            if all(c in BYTE_DECODER for c in token):
                data.extend(BYTE_DECODER[c] for c in token)
            else:  # a token outside the byte alphabet is taken as its own UTF-8 text
                data.extend(token.encode("utf-8"))
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]


def read_vocab(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) from folder/vocab.json and folder/merges.txt (a '#version' line skipped)."""
    vocab = json.loads((Path(folder) / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (Path(folder) / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{folder / 'merges.txt'}: not a merge (two tokens and a space): {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) from a `tokenizers` tokenizer.json, if it is CLIP's BPE (end-of-word "</w>",
    CLIP's pre-tokenisation pattern); anything else is refused rather than tokenized differently."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    model = data.get("model") or {}
    pattern = json.dumps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD or CLIP_PATTERN not in pattern:
        raise ValueError(f"{path}: not CLIP's tokenizer (a BPE with end-of-word '</w>' and CLIP's pattern)")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _token_text(value) -> str:
    """tokenizer_config.json holds a token as a string or as an AddedToken dict ({"content": ...})."""
    return value["content"] if isinstance(value, dict) else str(value)
