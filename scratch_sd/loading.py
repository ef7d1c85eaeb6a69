"""Real weights for the scratch networks: local diffusers folders, original single files,
scratch checkpoints. Pure torch + safetensors (no diffusers, no transformers).

    model = read_model("path/to/sd15")                        # a diffusers folder
    model = read_model("v1-5-pruned-emaonly.safetensors")     # an original single file (.ckpt too)
    nets = {name: network(name, model.cfg, model.component(name)) for name in NETWORKS}
    export_single_file(nets, "out.safetensors", model.cfg)    # and back to a single file

Formats (`kind_of(path)`):
- "diffusers": a folder with unet/, vae/, text_encoder/ (config.json + weights: safetensors
  before .bin, the plain file before the fp16 variant, sharded files through their index),
  plus tokenizer/ and scheduler/ that the harness reads.
- "single": an original LDM checkpoint (.safetensors / .ckpt / .bin / .pt), read by the key
  rules of scratch_sd/convert/single_file.py; its config is inferred from the tensor shapes,
  or read from the metadata our exporter writes.
- "scratch": a .safetensors with our own keys (`unet.*`, `vae.*`, `text_encoder.*`) and the
  SDConfig in its metadata (`format: sd_parity_scratch`).

Every read is strict: a missing, extra or mis-shaped tensor is an error naming it; keys that
are not weights are dropped only by named rules, listed in `Model.ignored`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from scratch_sd import storage
from scratch_sd.config import PRESETS, CLIPTextConfig, SDConfig, UNetConfig, VAEConfig
from scratch_sd.names import DTYPES, NETWORKS
from scratch_sd.convert import single_file
from scratch_sd.convert.common import ConversionError, load_strict

Tensor = torch.Tensor

WEIGHT_NAMES = {  # component -> file stem of its weights (diffusers models / transformers models)
    "text_encoder": "model", "vae": "diffusion_pytorch_model", "unet": "diffusion_pytorch_model",
}
BIN_NAMES = {"text_encoder": "pytorch_model", "vae": "diffusion_pytorch_model", "unet": "diffusion_pytorch_model"}
FOLDER_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SCRATCH_FORMAT = "sd_parity_scratch"  # safetensors metadata "format" of a scratch checkpoint


@dataclass
class Model:
    """Weights read from a path, in scratch keys (`unet.*`, `vae.*`, `text_encoder.*`)."""

    cfg: SDConfig
    state: dict[str, Tensor]
    kind: str  # "diffusers" | "single" | "scratch"
    path: Path
    ignored: dict[str, list[str]] = field(default_factory=dict)  # rule name -> keys it dropped
    notes: list[str] = field(default_factory=list)

    def component(self, name: str) -> dict[str, Tensor]:
        prefix = name + "."
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------- networks
def build_network(component: str, cfg: SDConfig) -> nn.Module:
    """An empty scratch network (random init; build it under torch.device('meta') to skip the init)."""
    from scratch_sd.clip import CLIPTextModel
    from scratch_sd.unet import UNet
    from scratch_sd.vae import AutoencoderKL

    if component not in NETWORKS:
        raise ValueError(f"unknown component {component!r}; known: {', '.join(NETWORKS)}")
    return {"text_encoder": lambda: CLIPTextModel(cfg.text), "vae": lambda: AutoencoderKL(cfg.vae),
            "unet": lambda: UNet(cfg.unet)}[component]()


def network(component: str, cfg: SDConfig, state: Mapping[str, Tensor]) -> nn.Module:
    """A float32 scratch network in eval mode holding `state` (scratch keys; other float dtypes are
    cast on load), loaded strictly: a missing, extra or mis-shaped key is a named error."""
    with torch.device("meta"):
        model = build_network(component, cfg)
    model = model.to_empty(device="cpu")
    load_strict(model, state, f"scratch {component}")
    for m in model.modules():  # non-persistent buffers are lost by to_empty()
        if hasattr(m, "reset_buffers"):
            m.reset_buffers()
    return model.eval()


def converter(component: str):
    from scratch_sd.convert import clip, unet, vae

    return {"text_encoder": clip, "vae": vae, "unet": unet}[component]


def sub_config(component: str, cfg: SDConfig):
    return {"text_encoder": cfg.text, "vae": cfg.vae, "unet": cfg.unet}[component]


# --------------------------------------------------------------------------- diffusers folders
def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(2, "No such config file", str(path))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def check_folder(root: Path, parts=FOLDER_PARTS) -> None:
    """A one-line error naming the components a diffusers folder lacks."""
    if not root.is_dir():
        raise FileNotFoundError(2, "No such model folder", str(root))
    missing = [p for p in parts if not (root / p).is_dir()]
    if missing:
        raise FileNotFoundError(2, f"Model folder lacks {', '.join(p + '/' for p in missing)} (a diffusers "
                                   f"folder has {', '.join(p + '/' for p in FOLDER_PARTS)})", str(root))


def load_sd_config(root: Path) -> SDConfig:
    root = Path(root)
    text = CLIPTextConfig.from_reference(read_json(root / "text_encoder" / "config.json"))
    vae = VAEConfig.from_reference(read_json(root / "vae" / "config.json"))
    unet = UNetConfig.from_reference(read_json(root / "unet" / "config.json"))
    sched = root / "scheduler" / "scheduler_config.json"  # what the UNet predicts is the scheduler's config
    pred = read_json(sched).get("prediction_type", "epsilon") if sched.is_file() else "epsilon"
    cfg = SDConfig(name=root.name, text=text, vae=vae, unet=unet, image_size=unet.sample_size * vae.downsample_factor,
                   prediction_type=pred)
    return preset_named(cfg)


def preset_named(cfg: SDConfig) -> SDConfig:
    """`cfg` named after the preset it equals in every field (so that e.g. a tiny folder is "tiny")."""
    for name, make in PRESETS.items():
        if replace(cfg, name=name) == make():
            return make()
    return cfg


def weight_files(folder: Path, component: str, variant: str | None = None) -> list[Path]:
    """The weight file(s) of one component folder: safetensors before .bin, the plain file before
    the `variant` (e.g. fp16) one unless a variant is asked for; sharded files via their index."""
    stems = [WEIGHT_NAMES[component], BIN_NAMES[component]]
    exts = (".safetensors", ".bin")
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        for stem, ext in zip(stems, exts):
            name = f"{stem}.{v}{ext}" if v else f"{stem}{ext}"
            if (folder / name).is_file():
                return [folder / name]
            index = folder / f"{name}.index.json"
            if index.is_file():
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise ValueError(f"{index}: empty weight_map")
                return [folder / s for s in shards]
    raise FileNotFoundError(2, f"No {component} weights (expected {stems[0]}{'.' + variant if variant else ''}"
                               ".safetensors or .bin)", str(folder))


def folder_state(root: Path, component: str, variant: str | None = None) -> dict[str, Tensor]:
    """One component's weights as stored (diffusers / transformers keys), shards merged."""
    state: dict[str, Tensor] = {}
    for f in weight_files(Path(root) / component, component, variant):
        part = storage.load_state_dict(f)
        twice = set(part) & set(state)
        if twice:
            raise ConversionError(f"{f}: keys also in another shard: {', '.join(sorted(twice)[:4])}")
        state.update(part)
    return state


def load_network(root: Path, component: str, cfg: SDConfig, variant: str | None = None) -> nn.Module:
    """One scratch network with a diffusers folder's weights, converted and loaded strictly."""
    state = converter(component).from_diffusers(folder_state(root, component, variant), sub_config(component, cfg))
    return network(component, cfg, state)


def read_folder(root: Path, components=NETWORKS, variant: str | None = None) -> Model:
    root = Path(root)
    check_folder(root, NETWORKS)
    cfg = load_sd_config(root)
    state: dict[str, Tensor] = {}
    notes = []
    for name in components:
        files = weight_files(root / name, name, variant)
        notes.append(f"{name}: {', '.join(f.name for f in files)}")
        ours = converter(name).from_diffusers(folder_state(root, name, variant), sub_config(name, cfg))
        state.update({f"{name}.{k}": v for k, v in ours.items()})
    return Model(cfg, state, "diffusers", root, {}, notes)


# --------------------------------------------------------------------------- single files
def read_single_file(path: Path, ema: bool = False, prediction_type: str | None = None) -> Model:
    """An original LDM checkpoint -> scratch keys (config from our metadata, else from the shapes;
    `prediction_type` overrides both, see single_file.read)."""
    path = Path(path)
    meta = storage.read_metadata(path)
    state = storage.load_state_dict(path)
    cfg = single_file.config_from_json(meta[single_file.CONFIG_METADATA]) if single_file.CONFIG_METADATA in meta else None
    reading = single_file.read(state, ema=ema, cfg=cfg, name=path.stem, prediction_type=prediction_type)
    notes = (["architecture: from the file's sd_parity_config metadata"] if cfg else []) + reading.notes
    if single_file.schedule_matches_sd15(state) is False:
        notes.append("the file's alphas_cumprod is not SD 1.x's scaled_linear(0.00085, 0.012) schedule: "
                     "the scheduler config used may not be the one it was trained with")
    for rule, keys in reading.ignored.items():
        notes.append(f"ignored by rule {rule}: {len(keys)} keys ({', '.join(sorted(keys)[:3])}"
                     f"{', ...' if len(keys) > 3 else ''})")
    return Model(reading.cfg, reading.state, "single", path, reading.ignored, notes)


# --------------------------------------------------------------------------- scratch checkpoints
def read_scratch(path: Path) -> Model:
    path = Path(path)
    meta = storage.read_metadata(path)
    if meta.get("format") != SCRATCH_FORMAT or single_file.CONFIG_METADATA not in meta:
        raise storage.CheckpointError(f"{path}: not a scratch checkpoint (no format={SCRATCH_FORMAT} metadata)")
    cfg = single_file.config_from_json(meta[single_file.CONFIG_METADATA])
    state = storage.load_state_dict(path)
    from scratch_sd.convert.common import check_shapes

    check_shapes(state, single_file.scratch_shapes(cfg), "scratch checkpoint")
    return Model(cfg, state, "scratch", path, {}, ["architecture: from the file's sd_parity_config metadata"])


# --------------------------------------------------------------------------- any path
def kind_of(path: str | os.PathLike) -> str:
    """"diffusers" (a folder), "scratch" (our safetensors) or "single" (an original checkpoint)."""
    path = Path(path)
    if path.is_dir():
        return "diffusers"
    if not path.exists():
        raise FileNotFoundError(2, "No such model file or folder", str(path))
    if path.suffix.lower() in storage.SAFETENSORS and storage.read_metadata(path).get("format") == SCRATCH_FORMAT:
        return "scratch"
    return "single"


def prediction_type_applies(path, prediction_type: str | None, kind: str | None = None, error=ValueError) -> None:
    """A given prediction type is for an original single file (a folder's scheduler config says its own;
    a scratch checkpoint carries its config)."""
    if prediction_type is None:
        return
    kind = kind or kind_of(path)
    if kind != "single":
        raise error(f"--prediction-type applies to original single files only ({path} is a {kind} "
                    f"{'folder: its scheduler config says it' if kind == 'diffusers' else 'checkpoint'})")


def read_model(path: str | os.PathLike, components=NETWORKS, ema: bool = False, variant: str | None = None,
               prediction_type: str | None = None) -> Model:
    """Weights of any accepted format, in scratch keys. `ema` and `prediction_type` apply to single
    files (the UNet's EMA copy; what the UNet predicts); `variant` to diffusers folders (e.g. "fp16")."""
    kind = kind_of(path)
    if ema and kind != "single":
        raise ValueError(f"--ema applies to original single files only ({path} is a {kind} "
                         f"{'folder' if kind == 'diffusers' else 'checkpoint'})")
    prediction_type_applies(path, prediction_type, kind)
    if kind == "diffusers":
        return read_folder(Path(path), components, variant)
    model = read_single_file(Path(path), ema, prediction_type) if kind == "single" else read_scratch(Path(path))
    model.state = {k: v for k, v in model.state.items() if k.split(".", 1)[0] in components}
    return model


def load_networks(path: str | os.PathLike, components=NETWORKS, ema: bool = False, variant: str | None = None,
                  prediction_type: str | None = None) -> tuple[SDConfig, dict[str, nn.Module], Model]:
    """Scratch networks with the weights at `path`: (config, {component: network}, what was read)."""
    model = read_model(path, components, ema, variant, prediction_type)
    nets = {name: network(name, model.cfg, model.component(name)) for name in components}
    return model.cfg, nets, model


# --------------------------------------------------------------------------- export
def scratch_state(source: Any, cfg: SDConfig | None = None) -> tuple[dict[str, Tensor], SDConfig]:
    """(scratch keys, config) of: a Model, a mapping {network name: nn.Module or state dict} holding
    all three networks, or a flat scratch state dict (`unet.*`, ...). The last two need `cfg`."""
    if isinstance(source, Model):
        return source.state, source.cfg
    if cfg is None:
        raise ValueError("exporting networks or a state dict needs its SDConfig (cfg=...)")
    if set(source) & set(NETWORKS):
        missing = [n for n in NETWORKS if n not in source]
        if missing:
            raise ValueError(f"cannot export a model without its {', '.join(missing)}")
        return single_file.join({n: (v.state_dict() if isinstance(v, nn.Module) else v)
                                 for n, v in source.items() if n in NETWORKS}), cfg
    return dict(source), cfg


def cast(state: Mapping[str, Tensor], dtype: str | None) -> dict[str, Tensor]:
    """Floating tensors to fp32 / fp16 / bf16 (None keeps every tensor's dtype)."""
    if dtype is None:
        return dict(state)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}


def _save_pickle(state: Mapping[str, Tensor], path: Path) -> Path:
    with storage.atomic_path(path, path.suffix) as tmp:
        torch.save({"state_dict": {k: v.detach().contiguous() for k, v in state.items()}}, str(tmp))
    return path


def export_single_file(models_or_state: Any, path: str | os.PathLike, cfg: SDConfig | None = None,
                       dtype: str | None = None) -> Path:
    """Write an original LDM single file (.safetensors, or .ckpt as {"state_dict": ...}), atomically.
    A .safetensors also records the SDConfig as metadata, so that head counts survive the trip."""
    path = Path(path)
    state, cfg = scratch_state(models_or_state, cfg)
    ldm = cast(single_file.write(state, cfg), dtype)
    if path.suffix.lower() in storage.SAFETENSORS:
        return storage.save_state_dict(ldm, path, {"format": "pt", single_file.CONFIG_METADATA: single_file.config_to_json(cfg)})
    if path.suffix.lower() in storage.PICKLES:
        return _save_pickle(ldm, path)
    raise ValueError(f"{path}: a single file ends in .safetensors or .ckpt")


def export_scratch(models_or_state: Any, path: str | os.PathLike, cfg: SDConfig | None = None,
                   dtype: str | None = None) -> Path:
    """Write a scratch checkpoint: our keys, the SDConfig as metadata, one .safetensors, atomically."""
    state, cfg = scratch_state(models_or_state, cfg)
    from scratch_sd.convert.common import check_shapes

    check_shapes(state, single_file.scratch_shapes(cfg), "scratch state dict")
    return storage.save_state_dict(cast(state, dtype), path,
                              {"format": SCRATCH_FORMAT, single_file.CONFIG_METADATA: single_file.config_to_json(cfg)})


__all__ = ["Model", "read_model", "load_networks", "network", "build_network", "load_network", "load_sd_config",
           "weight_files", "folder_state", "check_folder", "kind_of", "read_single_file", "read_scratch",
           "read_folder", "export_single_file", "export_scratch", "cast"]
