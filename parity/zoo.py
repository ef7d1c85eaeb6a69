"""Reference components (diffusers / transformers) for a preset or a local model.

Presets get seeded random weights, built offline and deterministically: the modules
are constructed on the meta device (no init cost), materialised empty, then every
parameter is filled from one seeded generator in named order with a fan-in scaled
normal, so activations stay O(1) through the network (no NaN, no collapse).
The presets' tokenizer is generated in code: a valid CLIP-format byte-level BPE
vocabulary (vocab.json + merges.txt) sized to the preset's vocab, loaded by
transformers' CLIPTokenizer. Real weights and vocabularies come only from a local path.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from scratch_sd.config import SDConfig
from scratch_sd.names import NETWORKS

COMPONENTS = NETWORKS


# --------------------------------------------------------------------------- random weights
POOL_SIZE = 1 << 24  # 16.7M standard normals drawn once per fill
GAIN_LO, GAIN_HI = 0.05, 2.0  # per-output-channel gains of linears and convs (see fill_seeded_)


def _fill_from_pool_(out: torch.Tensor, pool: torch.Tensor, g: torch.Generator, scale: float, shift: float) -> None:
    """out = shift + scale * (normals from a seeded offset into the pool, wrapping around)."""
    flat = out.view(-1)
    offset = int(torch.randint(0, pool.numel(), (1,), generator=g))
    pos = 0
    while pos < flat.numel():
        take = min(pool.numel() - offset, flat.numel() - pos)
        torch.mul(pool[offset:offset + take], scale, out=flat[pos:pos + take])
        pos, offset = pos + take, 0
    if shift:
        flat.add_(shift)


@torch.no_grad()
def fill_seeded_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter of `module` deterministically from `seed` (in place).

    Weights of linears/convs: N(0, 1/fan_in) times a per-output-channel gain; embeddings:
    N(0, 0.02^2) (they are layer-normed before use); norm weights 1 + N(0, 0.1^2); biases
    N(0, 0.02^2).

    The gains are log-uniform in [GAIN_LO, GAIN_HI] and sorted, so neighbouring channels
    (one GroupNorm group) share a scale while groups differ by 40x, as in trained networks.
    Without them every group has variance ~1 and a wrong GroupNorm eps (1e-5 for 1e-6)
    moves the UNet by ~4e-6, below any sane gate; with them by ~1e-3, as on real SD weights.
    Values come from windows at seeded offsets into one pool of 2^24 seeded normals:
    drawing 1e9 fresh normals costs ~8 s here, copying windows well under 2 s, and
    parity needs well-scaled, deterministic weights, not independent ones.
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL_SIZE, generator=g)
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                scale, shift = 0.1, (1.0 if p_name == "weight" else 0.0)
            elif isinstance(mod, nn.Embedding):
                scale, shift = 0.02, 0.0
            elif p.ndim >= 2:
                scale, shift = 1.0 / math.sqrt(math.prod(p.shape[1:])), 0.0
            else:
                scale, shift = 0.02, 0.0
            _fill_from_pool_(p.data, pool, g, scale, shift)
            if p.ndim >= 2 and not isinstance(mod, nn.Embedding):
                gain = torch.empty(p.shape[0]).uniform_(math.log(GAIN_LO), math.log(GAIN_HI), generator=g)
                p.data.mul_(gain.exp().sort().values.view(-1, *([1] * (p.ndim - 1))))
    return module


def _materialize(factory, seed: int) -> nn.Module:
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
        else:  # pragma: no cover - a new reference buffer must be initialised explicitly here
            raise RuntimeError(f"zoo does not know how to initialise buffer {name!r}")
    return fill_seeded_(module, seed).eval()


def reference_text_encoder(cfg: SDConfig, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    rc = CLIPTextConfig(**cfg.text.to_reference())
    rc._attn_implementation = "sdpa"
    return _materialize(lambda: CLIPTextModel(rc), seed)


def reference_vae(cfg: SDConfig, seed: int = 0):
    from diffusers import AutoencoderKL

    return _materialize(lambda: AutoencoderKL(**cfg.vae.to_reference()), seed + 1)


def reference_unet(cfg: SDConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    return _materialize(lambda: UNet2DConditionModel(**cfg.unet.to_reference()), seed + 2)


BUILDERS = {"text_encoder": reference_text_encoder, "vae": reference_vae, "unet": reference_unet}


def reference_components(cfg: SDConfig, seed: int = 0, components=COMPONENTS) -> dict[str, nn.Module]:
    return {name: BUILDERS[name](cfg, seed) for name in components}


# --------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab(vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """A deterministic CLIP-format vocabulary of exactly `vocab_size` tokens.

    Layout as CLIP's: 256 byte characters, the same with '</w>', then merged tokens,
    then <|startoftext|> and <|endoftext|> as the last two ids. The merges build all
    lowercase strings by length (ab, ab</w>, abc, abc</w>, ...): each merge joins two
    tokens that already exist, so the BPE is valid.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    n_merges = vocab_size - len(tokens) - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(tokens) + 2} byte and special tokens")
    merges: list[str] = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    level = list(letters)
    while len(merges) < n_merges:
        nxt = []
        for prefix in level:
            for c in letters:
                if len(merges) >= n_merges:
                    break
                merges.append(f"{prefix} {c}")
                tokens.append(prefix + c)
                nxt.append(prefix + c)
                if len(merges) >= n_merges:
                    break
                merges.append(f"{prefix} {c}</w>")
                tokens.append(prefix + c + "</w>")
        level = nxt
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: Path, vocab_size: int, max_length: int = 77) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab(vocab_size)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer"}), encoding="utf-8")
    return folder


def preset_tokenizer(cfg: SDConfig):
    """transformers CLIPTokenizer over the generated vocabulary (offline)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp), cfg.text.vocab_size, cfg.text.max_positions)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)


def folder_tokenizer(path: str | Path):
    """The tokenizer of a local model folder (`tokenizer/` with vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    path = Path(path)
    folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder} (expected vocab.json + merges.txt or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
