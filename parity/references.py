"""The reference side of every comparison: diffusers' / transformers' networks, the tokenizer and
the scheduler config, for a preset (seeded random weights, parity.zoo) or a local model
(parity.local_model). Candidates (parity.candidates) are built from these.

    refs = build_references("tiny")                    # or build_references(model="path/to/sd15")
    refs.networks["unet"]                              # diffusers UNet2DConditionModel, fp32, CPU, eval
    refs.weights_hash("unet")                          # sha256 of its config and tensors
"""
from __future__ import annotations

from pathlib import Path

from parity.reference_set import References, module_hash, quiet_libraries  # noqa: F401 (re-exported: the harness's entry)
from scratch_sd.config import preset
from scratch_sd.names import NETWORKS


def build_references(preset_name: str = "tiny", model: str | Path | None = None, components=NETWORKS,
                     seed: int = 0, *, ema: bool = False, tokenizer: str | Path | None = None,
                     variant: str | None = None, quiet: bool = False) -> References:
    """The reference networks (`components` of them) for a preset (seeded) or a local model
    (ema, tokenizer, variant: see parity.local_model.build_references)."""
    if model is not None:
        from parity import local_model

        return local_model.build_references(Path(model), components, ema=ema, tokenizer=tokenizer,
                                            variant=variant, quiet=quiet)
    from parity import zoo
    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG

    cfg = preset(preset_name)
    # SD 1.5's scheduler_config.json with the preset's prediction type: every scheduler of the run, on
    # both sides (diffusers' from_config and the candidate's from diffusers' config), is built from it.
    scheduler_config = {**SD15_SCHEDULER_CONFIG, "prediction_type": cfg.prediction_type}
    return References(cfg, zoo.reference_components(cfg, seed, components), zoo.preset_tokenizer(cfg),
                      scheduler_config, f"preset:{preset_name}")
