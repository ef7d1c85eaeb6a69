"""Reference components (diffusers / transformers) for a preset or a local model.

Presets get seeded random weights, built offline and deterministically: the modules
are constructed on the meta device (no init cost), materialised empty, then every
parameter is filled from one seeded generator in named order with a fan-in scaled
normal, so activations stay O(1) through the network (no NaN, no collapse).
The presets' tokenizer is CLIP's real vocabulary (vocab.json + merges.txt shipped in
scratch_sd/data/clip, 49408 tokens), loaded by transformers' CLIPTokenizer. Real weights come
only from a local path.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from torch import nn

from scratch_sd.config import SDConfig
from scratch_sd.names import NETWORKS
from scratch_sd.tokenizer import DATA as CLIP_DATA

CLIP_VOCAB_SIZE = 49408

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
def write_clip_tokenizer_files(folder: Path) -> Path:
    """CLIP's tokenizer files (the shipped vocab.json, merges.txt, tokenizer_config.json, NOTICE) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "NOTICE"):
        shutil.copyfile(CLIP_DATA / name, folder / name)
    return folder


def preset_tokenizer(cfg: SDConfig):
    """transformers' CLIPTokenizer over CLIP's real vocabulary (shipped in scratch_sd/data/clip, offline)."""
    from transformers import CLIPTokenizer

    if cfg.text.vocab_size != CLIP_VOCAB_SIZE:
        raise ValueError(f"{cfg.name}: a {cfg.text.vocab_size}-token text encoder cannot take CLIP's "
                         f"{CLIP_VOCAB_SIZE}-token vocabulary")
    return CLIPTokenizer.from_pretrained(str(CLIP_DATA), local_files_only=True)


def folder_tokenizer(path: str | Path):
    """The tokenizer of a local model folder (`tokenizer/` with vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    path = Path(path)
    folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if not (folder / "vocab.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer in {folder} (expected vocab.json + merges.txt or tokenizer.json)")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
