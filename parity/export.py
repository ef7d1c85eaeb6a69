"""Writing a model as a diffusers folder (configs from our SDConfig, weights through our key
tables, the tokenizer copied or the shipped one), whole: into a temporary sibling, moved into place."""
from __future__ import annotations

from pathlib import Path

from parity.outputs import writing_dir


def write_diffusers_folder(model, out: Path, tokenizer: Path | None = None, dtype: str | None = None,
                           force: bool = False) -> list[str]:
    """Write `model` (scratch_sd.loading.Model) as a diffusers folder at `out`. Returns notes."""
    from parity.local_model import write_config_folder
    from scratch_sd import loading, storage

    with writing_dir(out, force=force) as tmp:
        scheduler_config = None
        if model.kind == "diffusers":
            sched = model.path / "scheduler" / "scheduler_config.json"
            scheduler_config = loading.read_json(sched) if sched.is_file() else None
            if tokenizer is None and (model.path / "tokenizer").is_dir():
                tokenizer = model.path / "tokenizer"
        notes = write_config_folder(tmp, model.cfg, tokenizer, scheduler_config)
        for name, stem in (("text_encoder", "model"), ("vae", "diffusion_pytorch_model"),
                           ("unet", "diffusion_pytorch_model")):
            conv, sub = loading.converter(name), loading.sub_config(name, model.cfg)
            theirs = conv.to_diffusers(model.component(name), sub)  # text encoder: canonical `text_model.` keys
            storage.save_state_dict(loading.cast(theirs, dtype), tmp / name / f"{stem}.safetensors", {"format": "pt"})
        storage.set_default_mode(tmp)
    return notes
