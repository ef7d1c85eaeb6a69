"""Regenerate scratch_sd/data/clip/ (CLIP's vocab.json + merges.txt) from the open_clip wheel.

CLIP's byte-level BPE table ships as `open_clip/bpe_simple_vocab_16e6.txt.gz` in the
`open_clip_torch` wheel on PyPI (MIT licence). Do not install that package (it pulls
torchvision and a CUDA torch); download the wheel alone and point this script at it:

    pip download open_clip_torch==3.3.0 --no-deps -d /tmp/oc
    python tools/derive_clip_vocab.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The vocabulary is built exactly as OpenAI CLIP's simple_tokenizer.py (and open_clip's
tokenizer.py) build it: the 256 bytes_to_unicode characters, the same 256 with '</w>',
one token per merge for the first 49152-256-2 merges (the file's line 0 is a header),
then <|startoftext|> (49406) and <|endoftext|> (49407): 49408 tokens. The files are
written in the format of Hugging Face's openai/clip-vit-large-patch14 tokenizer
(vocab.json sorted and indented, merges.txt headed by '#version: 0.2'), which
transformers' CLIPTokenizer reads.
Deterministic: same wheel, same bytes.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # as simple_tokenizer.py: merges[1:49152-256-2+1]
SPECIALS = ("<|startoftext|>", "<|endoftext|>")
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "scratch_sd" / "data" / "clip"
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: the one bytes_to_unicode is scratch_sd's
from scratch_sd.tokenizer import bytes_to_unicode  # noqa: E402

# SD 1.x's tokenizer folder (runwayml/stable-diffusion-v1-5 tokenizer/tokenizer_config.json,
# copied from openai/clip-vit-large-patch14): unk and pad are <|endoftext|>, as eos.
TOKENIZER_CONFIG = {
    "add_prefix_space": False,
    "bos_token": "<|startoftext|>",
    "do_lower_case": True,
    "eos_token": "<|endoftext|>",
    "errors": "replace",
    "model_max_length": 77,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "CLIPTokenizer",
    "unk_token": "<|endoftext|>",
}

NOTICE = """CLIP byte-level BPE vocabulary (vocab.json, merges.txt)

Source: open_clip/bpe_simple_vocab_16e6.txt.gz in the open_clip_torch {version} wheel
from PyPI ({wheel}, sha256 {wheel_sha});
sha256 of the .gz member: {gz_sha}.
The same file ships with OpenAI CLIP (https://github.com/openai/CLIP, MIT licence,
Copyright (c) 2021 OpenAI). Derived by tools/derive_clip_vocab.py exactly as CLIP's
simple_tokenizer.py builds its encoder: 256 byte characters, the same with '</w>',
the first 48894 merges joined, then <|startoftext|> = 49406, <|endoftext|> = 49407.

open_clip's licence (from the wheel's dist-info/licenses/LICENSE):

{license}"""


def derive(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) from the text of bpe_simple_vocab_16e6.txt."""
    merges = [tuple(m.split()) for m in bpe_text.split("\n")[1:N_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(SPECIALS)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(vocab) != 49408:
        raise ValueError(f"derived {len(tokens)} tokens ({len(vocab)} distinct), expected 49408")
    return vocab, [" ".join(m) for m in merges]


def read_wheel(wheel: Path) -> tuple[bytes, str, str]:
    """(gz bytes, licence text, version) from an open_clip_torch wheel."""
    with zipfile.ZipFile(wheel) as zf:
        gz = zf.read(BPE_MEMBER)
        lic = next(n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE"))
        version = lic.split("/")[0].removesuffix(".dist-info").split("-")[1]
        return gz, zf.read(lic).decode("utf-8"), version


def write(out: Path, wheel: Path) -> None:
    gz, license_text, version = read_wheel(wheel)
    vocab, merges = derive(gzip.decompress(gz).decode("utf-8"))
    out.mkdir(parents=True, exist_ok=True)
    # Byte layout of Hugging Face's openai/clip-vit-large-patch14 files: sorted keys, indent 2,
    # raw UTF-8, no trailing newline (a vendored copy of SD's tokenizer/ has the same length
    # once its CRLF line ends are counted).
    vocab_text = json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False)
    (out / "vocab.json").write_bytes(vocab_text.encode("utf-8"))
    (out / "merges.txt").write_bytes(("#version: 0.2\n" + "\n".join(merges)).encode("utf-8"))
    (out / "tokenizer_config.json").write_bytes((json.dumps(TOKENIZER_CONFIG, indent=2) + "\n").encode("utf-8"))
    notice = NOTICE.format(version=version, wheel=wheel.name, wheel_sha=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                           gz_sha=hashlib.sha256(gz).hexdigest(), license=license_text)
    (out / "NOTICE").write_bytes(notice.encode("utf-8"))
    for name in ("vocab.json", "merges.txt"):
        print(f"{name}: {hashlib.sha256((out / name).read_bytes()).hexdigest()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path, help="open_clip_torch-*.whl (pip download open_clip_torch --no-deps)")
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    args = ap.parse_args(argv)
    if not args.wheel.is_file():
        print(f"error: no wheel at {args.wheel}", file=sys.stderr)
        return 2
    write(args.out, args.wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
