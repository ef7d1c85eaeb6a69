"""Reference networks from a local model: a diffusers folder, an original single file, or a
scratch checkpoint (`parity.references.build_references(model=PATH)` lands here).

Two independent readers of the same files, so that "same weights" is checked, not assumed:
- scratch side: scratch_sd.loading (our key tables, strict; no diffusers);
- reference side, per format:
  * diffusers folder: `UNet2DConditionModel.from_pretrained(folder/unet, local_files_only=True)`,
    `AutoencoderKL.from_pretrained(folder/vae, ...)`, `CLIPTextModel.from_pretrained(folder/text_encoder, ...)`;
  * single file: diffusers' own `StableDiffusionPipeline.from_single_file(path, config=DIR,
    local_files_only=True)`, DIR a temporary diffusers config folder (model_index.json, the three
    component configs, tokenizer, scheduler) written from the config our reader inferred; it works
    offline and converts with diffusers' convert_ldm_unet/vae/clip_checkpoint;
  * scratch checkpoint (no other reader exists): diffusers modules built from the config, with the
    weights through our tables' to_diffusers.
After loading, every reference tensor is converted through our key table and compared bit for bit
with what our strict reader read (`same_weights`); a difference is an error naming the tensors (the
reference loaders are not strict: a key they miss would stay randomly initialised). So the scratch
candidate, which converts the reference's tensors, holds exactly the file's weights.

Both sides are float32 (the gate casts per dtype). Tokenizer: the folder's tokenizer/, or for a
file `tokenizer=DIR`, else CLIP's real vocabulary (scratch_sd/data/clip; a note says so, and warns
when the file's text encoder has another vocabulary size).
Scheduler config: the folder's scheduler/scheduler_config.json, else SD 1.5's.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from parity.reference_set import References, quiet_libraries
from scratch_sd import loading
from scratch_sd.names import NETWORKS

DIFFUSERS_CLASSES = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}


def note(text: str) -> None:
    print(f"sdparity: note: {text}", file=sys.stderr)


# --------------------------------------------------------------------------- config folders
def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=list))


def component_config(name: str, cfg) -> dict:
    """The config.json of one component of a diffusers folder, for our SDConfig."""
    import diffusers

    if name == "text_encoder":
        from transformers import CLIPTextConfig

        rc = CLIPTextConfig(**cfg.text.to_reference())
        rc.architectures = ["CLIPTextModel"]
        return rc.to_dict()
    sub = cfg.unet if name == "unet" else cfg.vae
    return _jsonable({"_class_name": DIFFUSERS_CLASSES[name], "_diffusers_version": diffusers.__version__,
                      **sub.to_reference()})


def write_config_folder(folder: Path, cfg, tokenizer_dir: Path | None = None,
                        scheduler_config: dict | None = None) -> list[str]:
    """A diffusers folder without weights: model_index.json, {unet,vae,text_encoder}/config.json,
    tokenizer/ (copied from `tokenizer_dir`, else CLIP's shipped files), scheduler/. Returns notes."""
    import diffusers

    from parity import zoo
    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG

    folder = Path(folder)
    notes = []
    # no folder to copy one from: SD 1.5's, with the model's prediction type (sd21: v_prediction)
    scheduler_config = scheduler_config or {**SD15_SCHEDULER_CONFIG, "prediction_type": cfg.prediction_type}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", scheduler_config["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    for name in NETWORKS:
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(component_config(name, cfg), indent=2), encoding="utf-8")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config, indent=2), encoding="utf-8")
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        src = tokenizer_dir / "tokenizer" if (tokenizer_dir / "tokenizer").is_dir() else tokenizer_dir
        zoo.folder_tokenizer(src)  # fails early, in one line, on a folder without a tokenizer
        shutil.copytree(src, folder / "tokenizer", dirs_exist_ok=True)
        notes.append(f"tokenizer: {src}")
    else:
        zoo.write_clip_tokenizer_files(folder / "tokenizer")
        notes.append("tokenizer: CLIP's vocabulary (scratch_sd/data/clip)" if cfg.text.vocab_size == zoo.CLIP_VOCAB_SIZE
                     else f"tokenizer: CLIP's {zoo.CLIP_VOCAB_SIZE}-token vocabulary, but the text encoder has "
                          f"{cfg.text.vocab_size} tokens: pass --tokenizer DIR for its own")
    return notes


# --------------------------------------------------------------------------- reference readers
def _quiet():
    import diffusers
    import transformers

    quiet_libraries()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def reference_from_folder(root: Path, name: str, variant: str | None = None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    files = loading.weight_files(root / name, name, variant)
    v = next((p for p in (variant, "fp16") if p and any(f".{p}{c}" in files[0].name for c in ".-")), None)
    kw = dict(local_files_only=True, torch_dtype=torch.float32, variant=v)
    if name == "text_encoder":
        return CLIPTextModel.from_pretrained(str(root / name), attn_implementation="sdpa", **kw).eval()
    cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
    return cls.from_pretrained(str(root / name), **kw).eval()


def references_from_single_file(path: Path, config_dir: Path, ema: bool) -> dict:
    """The three networks as diffusers' StableDiffusionPipeline.from_single_file reads the file."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                    extract_ema=ema, safety_checker=None)
    return {"text_encoder": pipe.text_encoder, "vae": pipe.vae, "unet": pipe.unet}


def reference_from_config(name: str, cfg, scratch_state: dict):
    """A diffusers / transformers module built from `cfg`, holding `scratch_state` via to_diffusers."""
    with torch.device("meta"):
        module = {"text_encoder": lambda: _meta_text_encoder(cfg), "vae": lambda: _diffusers(name, cfg),
                  "unet": lambda: _diffusers(name, cfg)}[name]()
    module = module.to_empty(device="cpu")
    conv = loading.converter(name)
    sub = loading.sub_config(name, cfg)
    theirs = conv.to_diffusers(scratch_state, sub, prefix="") if name == "text_encoder" else conv.to_diffusers(scratch_state, sub)
    missing = module.load_state_dict(theirs, strict=False)
    if missing.unexpected_keys or [k for k in missing.missing_keys if not k.endswith("position_ids")]:
        raise RuntimeError(f"reference {name} does not take the converted keys: {missing}")
    for buf_name, buf in module.named_buffers():
        if buf_name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    return module.eval()


def _meta_text_encoder(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel

    rc = CLIPTextConfig(**cfg.text.to_reference())
    rc._attn_implementation = "sdpa"
    return CLIPTextModel(rc)


def _diffusers(name: str, cfg):
    import diffusers

    cls = getattr(diffusers, DIFFUSERS_CLASSES[name])
    return cls(**(cfg.unet if name == "unet" else cfg.vae).to_reference())


# --------------------------------------------------------------------------- same weights
@torch.no_grad()
def same_weights(name: str, reference, scratch, cfg) -> list[str]:
    """Scratch keys whose tensor differs between the reference (through our table) and the scratch network."""
    theirs = {k: v for k, v in reference.state_dict().items() if not k.endswith("position_ids")}
    converted = loading.converter(name).from_diffusers(theirs, loading.sub_config(name, cfg))
    ours = scratch.state_dict()
    return [k for k, v in ours.items() if not torch.equal(converted[k].to(v.dtype), v)]


def _check_same(name: str, reference, scratch, cfg, source: str) -> None:
    bad = same_weights(name, reference, scratch, cfg)
    if bad:
        raise ValueError(f"{source}: diffusers and the scratch loader read different {name} weights for "
                         f"{len(bad)} tensors ({', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''})")


# --------------------------------------------------------------------------- entry point
def build_references(path, components=NETWORKS, ema: bool = False, tokenizer: str | Path | None = None,
                     variant: str | None = None, quiet: bool = False, prediction_type: str | None = None) -> References:
    """The reference networks (float32, CPU), tokenizer and scheduler config of a local model, each
    network checked bit for bit against our own strict reading of the same file. `prediction_type`
    (single files): what the UNet predicts, over the file's metadata and diffusers' rule."""
    from parity import zoo
    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG

    path = Path(path)
    say = (lambda _t: None) if quiet else note
    _quiet()
    if path.is_dir():  # every missing part named before seconds of loading
        loading.check_folder(path, NETWORKS + (("tokenizer",) if tokenizer is None else ()))
    cfg, nets, model = loading.load_networks(path, components, ema=ema, variant=variant,  # strict, first
                                             prediction_type=prediction_type)
    notes = list(model.notes)
    scheduler_config = dict(SD15_SCHEDULER_CONFIG)
    if model.kind == "diffusers":
        refs = {n: reference_from_folder(path, n, variant) for n in components}
        tok = zoo.folder_tokenizer(tokenizer or path)
        sched_path = path / "scheduler" / "scheduler_config.json"
        if sched_path.is_file():
            scheduler_config = loading.read_json(sched_path)
        else:
            notes.append("scheduler: the folder has no scheduler/scheduler_config.json; using SD 1.5's")
    else:
        with tempfile.TemporaryDirectory(prefix="sdparity-config-") as tmp:
            notes += write_config_folder(Path(tmp), cfg, tokenizer)
            tok = zoo.folder_tokenizer(Path(tmp))
            if model.kind == "single":
                refs = references_from_single_file(path, Path(tmp), ema)
            else:
                refs = {n: reference_from_config(n, cfg, model.component(n)) for n in components}
        scheduler_config["prediction_type"] = cfg.prediction_type  # the reader's note says what decided it
        notes.append(f"scheduler: SD 1.5's PNDMScheduler config (a single file holds none), prediction_type "
                     f"{cfg.prediction_type}")
    networks = {}
    for name in components:
        ref = refs[name].to(torch.float32).eval()
        _check_same(name, ref, nets.pop(name), cfg, str(path))
        networks[name] = ref
    for text in notes:
        say(text)
    return References(cfg, networks, tok, scheduler_config, str(path), path, notes)
