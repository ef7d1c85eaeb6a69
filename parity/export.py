"""Writing a model as a diffusers folder (configs from our SDConfig, weights through our key
tables, the tokenizer copied or the shipped one), whole: into a temporary sibling, moved into place;
and the embedded presets as a model (`preset_model`), so that `sdparity convert --preset` can write
the seeded tiny/sd15 networks the gate uses to disk."""
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


def preset_model(name: str, seed: int = 0):
    """The seeded reference networks of preset `name` (the same weights `sdparity check --preset`
    builds), as a scratch_sd.loading.Model in scratch keys (kind "preset")."""
    from parity.candidates.scratch import network_from_reference
    from parity.references import build_references
    from scratch_sd import loading
    from scratch_sd.names import NETWORKS

    refs = build_references(name, seed=seed)
    nets = {n: network_from_reference(n, refs.networks[n], refs.cfg) for n in NETWORKS}
    state, cfg = loading.scratch_state(nets, refs.cfg)
    return loading.Model(cfg, state, "preset", Path(f"preset:{name}"),
                         notes=[f"preset {name}: seeded reference weights (seed {seed})"])
