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


def check_prediction_type(preset_name: str, model, prediction_type: str | None, error=ValueError) -> None:
    """A prediction type is given for a single file; a preset fixes its own, a folder's scheduler
    config says it."""
    if model is not None:
        from scratch_sd.loading import prediction_type_applies

        return prediction_type_applies(Path(model), prediction_type, error=error)
    if prediction_type is not None and prediction_type != preset(preset_name).prediction_type:
        raise error(f"--prediction-type applies to --model single files; preset {preset_name!r} predicts "
                    f"{preset(preset_name).prediction_type}")


def build_references(preset_name: str = "tiny", model: str | Path | None = None, components=NETWORKS,
                     seed: int = 0, *, ema: bool = False, tokenizer: str | Path | None = None,
                     variant: str | None = None, quiet: bool = False,
                     prediction_type: str | None = None) -> References:
    """The reference networks (`components` of them) for a preset (seeded) or a local model
    (ema, tokenizer, variant, prediction_type: see parity.local_model.build_references)."""
    if model is not None:
        from parity import local_model

        return local_model.build_references(Path(model), components, ema=ema, tokenizer=tokenizer,
                                            variant=variant, quiet=quiet, prediction_type=prediction_type)
    check_prediction_type(preset_name, None, prediction_type)
    from parity import zoo
    from scratch_sd.schedulers import SD15_SCHEDULER_CONFIG

    cfg = preset(preset_name)
    # SD 1.5's scheduler_config.json with the preset's prediction type: every scheduler of the run, on
    # both sides (diffusers' from_config and the candidate's from diffusers' config), is built from it.
    scheduler_config = {**SD15_SCHEDULER_CONFIG, "prediction_type": cfg.prediction_type}
    return References(cfg, zoo.reference_components(cfg, seed, components), zoo.preset_tokenizer(cfg),
                      scheduler_config, f"preset:{preset_name}")


def references_for(settings, components=NETWORKS, **kw) -> References:
    """The references of a gate's settings (parity.gate.GateSettings: preset or model, seed,
    prediction type): what `check`, `record`, a shard and the pytest plug-in all build."""
    return build_references(settings.preset, settings.model, components, seed=settings.seed,
                            prediction_type=settings.prediction_type, **kw)
