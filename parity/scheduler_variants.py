"""The scheduler config variants parity/scheduler_check.py runs: one factor at a time around SD 1.5's
scheduler_config.json, plus crosses, plus every option diffusers 0.42 implements for the scheduler (as data:
`OPTION_VARIANTS` lists config overrides and step() kwargs per registry name)."""
from __future__ import annotations

from dataclasses import dataclass, field

from scratch_sd import schedulers as ours_mod

SD15 = {k: v for k, v in ours_mod.SD15_SCHEDULER_CONFIG.items() if not k.startswith("_")}


@dataclass
class Variant:
    """One config of one scheduler: config overrides on the base, step() kwargs, the model's output shape."""

    name: str  # registry name
    label: str  # e.g. "ddim[spacing=trailing,pred=v_prediction,eta=0.0]"
    config: dict
    step_kwargs: dict = field(default_factory=dict)
    model: str = "eps"  # "eps" | "learned" | "learned_range" (DDPM: model also predicts the variance)
    long: bool = False  # also run the 1000-step loop
    unet: bool = False  # also run the loop with the real UNet, when one is given (the SD 1.5 config variant)


# ---- every further option diffusers 0.42 implements (issue #19), as data: (label parts, config overrides on SD 1.5,
# step() kwargs, model kind). Thresholding uses ratio 0.9 / max 2.5 so that both the quantile and the clamp act
# (at sample_max_value 1 it is plain clipping); "ints" puts ints where diffusers documents floats.
THRESH = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.5}
TRAINED_BETAS = [round(0.0001 + i * (0.02 - 0.0001) / 999, 8) for i in range(1000)]  # a trained_betas list (JSON-like)
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}
DEIS = {"_class_name": "DEISMultistepScheduler", "algorithm_type": "deis", "solver_type": "logrho", "solver_order": 2,
        "lower_order_final": True, **SIGMA_MIN}
UNIPC = {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "predict_x0": True, "disable_corrector": [],
         "solver_p": None, "sigma_min": None, "sigma_max": None, "shift_terminal": None}
OPTION_VARIANTS: dict[str, list[tuple[dict, dict, dict, str]]] = {
    "ddpm": [
        ({"thresholding": True}, THRESH, {}, "eps"),
        ({"thresholding": True, "pred": "v_prediction"}, {**THRESH, "prediction_type": "v_prediction"}, {}, "eps"),
        ({"thresholding": True, "pred": "sample"}, {**THRESH, "prediction_type": "sample"}, {}, "eps"),
        ({"variance": "fixed_large_log"}, {"variance_type": "fixed_large_log"}, {}, "eps"),
        ({"variance": None, "from": "DPMSolverMultistep"}, {"_class_name": "DPMSolverMultistepScheduler",
                                                          "variance_type": None, "solver_order": 2}, {}, "eps"),
        ({"trained_betas": "list"}, {"trained_betas": TRAINED_BETAS}, {}, "eps"),
        ({"ints": True}, {"clip_sample": True, "clip_sample_range": 2, "beta_end": 0.012, "sample_max_value": 3}, {}, "eps"),
    ],
    "ddim": [
        ({"thresholding": True, "eta": 0.0}, THRESH, {"eta": 0.0}, "eps"),
        ({"thresholding": True, "eta": 1.0, "pred": "v_prediction"}, {**THRESH, "prediction_type": "v_prediction"},
         {"eta": 1.0}, "eps"),
        ({"clip_sample": True, "range": 2, "eta": 0.0}, {"clip_sample": True, "clip_sample_range": 2}, {"eta": 0.0}, "eps"),
        ({"trained_betas": "list", "eta": 0.0}, {"trained_betas": TRAINED_BETAS}, {"eta": 0.0}, "eps"),
        ({"zero_snr": True, "alpha_one": True, "pred": "v_prediction", "eta": 0.0},
         {"rescale_betas_zero_snr": True, "set_alpha_to_one": True, "timestep_spacing": "trailing",
          "prediction_type": "v_prediction"}, {"eta": 0.0}, "eps"),
    ],
    "pndm": [
        ({"trained_betas": "list"}, {"trained_betas": TRAINED_BETAS}, {}, "eps"),
        ({"from": "DDIM", "clip_sample": True}, {"_class_name": "DDIMScheduler", "clip_sample": True,
                                                  "thresholding": True}, {}, "eps"),
    ],
    "euler": [
        ({"sigmas": "exponential"}, {"use_exponential_sigmas": True}, {}, "eps"),
        ({"sigmas": "exponential", "sigma_min": 0.1, "sigma_max": 10.0},
         {"use_exponential_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, {}, "eps"),
        ({"sigmas": "beta"}, {"use_beta_sigmas": True}, {}, "eps"),
        ({"sigmas": "beta", "spacing": "trailing", "pred": "v_prediction", "final_sigma": "sigma_min"},
         {"use_beta_sigmas": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction", **SIGMA_MIN}, {}, "eps"),
        ({"trained_betas": "list", "karras": True}, {"trained_betas": TRAINED_BETAS, "use_karras_sigmas": True}, {}, "eps"),
    ],
    "euler_ancestral": [
        ({"trained_betas": "list"}, {"trained_betas": TRAINED_BETAS}, {}, "eps"),
        ({"from": "Euler", "karras": True}, {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True,
                                             "interpolation_type": "linear"}, {}, "eps"),
    ],
    "lms": [
        ({"sigmas": "exponential"}, {"use_exponential_sigmas": True}, {}, "eps"),
        ({"sigmas": "beta"}, {"use_beta_sigmas": True}, {}, "eps"),
        ({"from": "Euler", "sigma_min": 0.1, "karras": True}, {"_class_name": "EulerDiscreteScheduler", "sigma_min": 0.1,
                                                              "use_karras_sigmas": True, "timestep_type": "discrete"}, {}, "eps"),
    ],
    "dpmpp_2m": [
        ({"thresholding": True}, THRESH, {}, "eps"),
        ({"thresholding": True, "pred": "v_prediction", "order": 3}, {**THRESH, "prediction_type": "v_prediction",
                                                                      "solver_order": 3}, {}, "eps"),
        ({"algorithm": "dpmsolver", "final_sigma": "sigma_min"}, {"algorithm_type": "dpmsolver", **SIGMA_MIN}, {}, "eps"),
        ({"algorithm": "dpmsolver", "solver_type": "heun", "final_sigma": "sigma_min"},
         {"algorithm_type": "dpmsolver", "solver_type": "heun", **SIGMA_MIN}, {}, "eps"),
        ({"algorithm": "dpmsolver", "order": 3, "pred": "v_prediction", "thresholding": True},
         {"algorithm_type": "dpmsolver", "solver_order": 3, "prediction_type": "v_prediction", **THRESH, **SIGMA_MIN}, {}, "eps"),
        ({"algorithm": "dpmsolver", "pred": "sample", "final_sigma": "sigma_min"},
         {"algorithm_type": "dpmsolver", "prediction_type": "sample", **SIGMA_MIN}, {}, "eps"),
        ({"algorithm": "sde-dpmsolver", "final_sigma": "sigma_min"}, {"algorithm_type": "sde-dpmsolver", **SIGMA_MIN}, {}, "eps"),
        ({"algorithm": "sde-dpmsolver", "solver_type": "heun", "spacing": "trailing"},
         {"algorithm_type": "sde-dpmsolver", "solver_type": "heun", "timestep_spacing": "trailing", **SIGMA_MIN}, {}, "eps"),
        ({"algorithm": "sde-dpmsolver++", "solver_type": "heun"},
         {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, {}, "eps"),
        ({"lu_lambdas": True}, {"use_lu_lambdas": True}, {}, "eps"),
        ({"lu_lambdas": True, "spacing": "trailing", "final_sigma": "sigma_min"},
         {"use_lu_lambdas": True, "timestep_spacing": "trailing", **SIGMA_MIN}, {}, "eps"),
        ({"sigmas": "exponential"}, {"use_exponential_sigmas": True}, {}, "eps"),
        ({"sigmas": "beta", "order": 3}, {"use_beta_sigmas": True, "solver_order": 3}, {}, "eps"),
        ({"from": "DEIS"}, DEIS, {}, "eps"),
        ({"from": "UniPC"}, UNIPC, {}, "eps"),
        ({"from": "DDPM", "variance": "fixed_small"}, {"_class_name": "DDPMScheduler", "variance_type": "fixed_small",
                                                      "clip_sample": False}, {}, "eps"),
    ],
}


# --------------------------------------------------------------------------------------------- variants


def _label(name: str, parts: dict) -> str:
    return f"{name}[" + ",".join(f"{k}={v}" for k, v in parts.items()) + "]"


def variants_for(name: str) -> list[Variant]:
    """The config variants checked for one scheduler (one factor at a time around SD 1.5, plus crosses)."""
    cls = ours_mod.SCHEDULERS[name]
    keys = set(cls.config_keys())
    out: list[Variant] = []

    def add(parts: dict, config: dict, step_kwargs: dict | None = None, model: str = "eps", long: bool = False,
            unet: bool = False):
        out.append(Variant(name, _label(name, parts), config, step_kwargs or {}, model, long, unet))

    if name == "sde_ve":
        add({"config": "default"}, {}, long=True)
        add({"correct_steps": 0}, {"correct_steps": 0})
        add({"correct_steps": 2}, {"correct_steps": 2})
        add({"snr": 0.3, "sigma_max": 50.0}, {"snr": 0.3, "sigma_max": 50.0})
        add({"sampling_eps": 1e-3, "sigma_min": 0.02}, {"sampling_eps": 1e-3, "sigma_min": 0.02})
        return out

    preds = cls.CHECKS["prediction_type"].allowed
    preds = [p for p in preds if p != "original_sample"]
    eta = {"eta": 0.0} if name == "ddim" else {}
    # 1. SD 1.5 itself (its scheduler_config.json), with the 1000-step loop
    add({"config": "sd15", **eta}, dict(SD15), {"eta": 0.0} if eta else {}, long=True, unet=True)
    # 2. every spacing x every prediction type
    for spacing in ("leading", "linspace", "trailing"):
        for pred in preds:
            if spacing == "leading" and pred == "epsilon":
                continue  # = sd15
            add({"spacing": spacing, "pred": pred, **eta}, {**SD15, "timestep_spacing": spacing, "prediction_type": pred},
                {"eta": 0.0} if eta else {})
    # 3. steps_offset 0 (diffusers' default; with it the leading grid stays inside [0, T-1] at 1000 steps)
    add({"offset": 0, **eta}, {**SD15, "steps_offset": 0}, {"eta": 0.0} if eta else {}, long=True)
    # 4. set_alpha_to_one
    if "set_alpha_to_one" in keys:
        add({"alpha_one": True, **eta}, {**SD15, "set_alpha_to_one": True}, {"eta": 0.0} if eta else {})
    # 5. other beta schedules, zero terminal SNR
    add({"beta": "linear"}, {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"eta": 0.0} if eta else {})
    add({"beta": "squaredcos_cap_v2"}, {**SD15, "beta_schedule": "squaredcos_cap_v2"}, {"eta": 0.0} if eta else {})
    if "rescale_betas_zero_snr" in keys:
        add({"zero_snr": True, "spacing": "trailing", "pred": "v_prediction"},
            {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
            {"eta": 0.0} if eta else {})
    # 6. the scheduler's own options
    if name == "ddpm":
        for vt in ("fixed_small_log", "fixed_large", "learned", "learned_range"):
            add({"variance": vt}, {**SD15, "variance_type": vt}, model=vt if vt.startswith("learned") else "eps")
        add({"clip_sample": True, "range": 1.5}, {**SD15, "clip_sample": True, "clip_sample_range": 1.5})
        for beta in ("sigmoid", "laplace"):  # schedules only DDPMScheduler has
            add({"beta": beta}, {**SD15, "beta_schedule": beta})
    elif name == "ddim":
        for e in (0.5, 1.0):
            add({"eta": e}, dict(SD15), {"eta": e})
        add({"spacing": "trailing", "eta": 1.0}, {**SD15, "timestep_spacing": "trailing"}, {"eta": 1.0})
        add({"clip_sample": True, "eta": 0.0, "clipped_eps": True}, {**SD15, "clip_sample": True},
            {"eta": 0.0, "use_clipped_model_output": True})
    elif name == "pndm":
        add({"skip_prk_steps": False}, {**SD15, "skip_prk_steps": False})
        add({"skip_prk_steps": False, "spacing": "linspace", "pred": "v_prediction"},
            {**SD15, "skip_prk_steps": False, "timestep_spacing": "linspace", "prediction_type": "v_prediction"})
    elif name == "euler":
        add({"karras": True}, {**SD15, "use_karras_sigmas": True})
        add({"karras": True, "spacing": "trailing", "pred": "v_prediction"},
            {**SD15, "use_karras_sigmas": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"})
        add({"interpolation": "log_linear"}, {**SD15, "interpolation_type": "log_linear"})
        add({"final_sigma": "sigma_min"}, {**SD15, "final_sigmas_type": "sigma_min"})
        add({"timestep_type": "continuous", "pred": "v_prediction"},
            {**SD15, "timestep_type": "continuous", "prediction_type": "v_prediction"})
        add({"churn": 1.0}, dict(SD15), {"s_churn": 1.0})
        add({"karras": True, "sigma_min": 0.1, "sigma_max": 10.0},
            {**SD15, "use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0})
    elif name == "dpmpp_2m":
        add({"karras": True}, {**SD15, "use_karras_sigmas": True})
        add({"karras": True, "spacing": "trailing"}, {**SD15, "use_karras_sigmas": True, "timestep_spacing": "trailing"})
        add({"lower_order_final": False}, {**SD15, "lower_order_final": False})
        add({"karras": True, "lower_order_final": False}, {**SD15, "use_karras_sigmas": True, "lower_order_final": False})
        add({"final_sigma": "sigma_min"}, {**SD15, "final_sigmas_type": "sigma_min"})
        add({"final_sigma": "sigma_min", "euler_at_final": True},
            {**SD15, "final_sigmas_type": "sigma_min", "euler_at_final": True})
        add({"solver_type": "heun"}, {**SD15, "solver_type": "heun"})
        add({"order": 1}, {**SD15, "solver_order": 1})
        add({"order": 3}, {**SD15, "solver_order": 3})
        add({"algorithm": "sde-dpmsolver++"}, {**SD15, "algorithm_type": "sde-dpmsolver++"})
        add({"algorithm": "sde-dpmsolver++", "karras": True, "order": 3},
            {**SD15, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "solver_order": 3})
        add({"beta": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
            {**SD15, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1})
    elif name == "lms":
        add({"karras": True}, {**SD15, "use_karras_sigmas": True})
        add({"karras": True, "spacing": "trailing", "pred": "v_prediction"},
            {**SD15, "use_karras_sigmas": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"})
    # 7. the options added for issue #19 (table above)
    for parts, overrides, step_kwargs, model in OPTION_VARIANTS.get(name, []):
        add(parts, {**SD15, **overrides}, {**({"eta": 0.0} if eta else {}), **step_kwargs}, model=model)
    return out


