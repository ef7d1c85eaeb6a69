"""Our schedulers in every use diffusers' are put to (issue #19): save_config / save_pretrained / from_pretrained
in diffusers' folder layout both ways, step() outputs that behave as diffusers' BaseOutput, sibling configs
mapped across as diffusers' from_config maps them, every config value diffusers accepts, and the values it
rejects rejected with one-line ValueErrors. Expected values always come from diffusers."""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import typing

import pytest
import torch

from parity import scheduler_check as sc
from parity.scheduler_variants import OPTION_VARIANTS
from scratch_sd import schedulers as S

SD15 = {k: v for k, v in S.SD15_SCHEDULER_CONFIG.items() if not k.startswith("_")}
DISCRETE = [n for n in S.SCHEDULERS if n != "sde_ve"]


@pytest.fixture(autouse=True)
def _one_thread():
    with sc.single_thread():
        yield


def _ref_cls(name: str):
    import diffusers
    return getattr(diffusers, S.DIFFUSERS_CLASS_NAMES[name])


def _norm(config) -> dict:
    """A config as a plain dict; `_use_default_values` is a list built from a set in diffusers (any order)."""
    return {k: (sorted(v) if k == "_use_default_values" else v) for k, v in dict(config).items()}


def _loop(sched, name: str, steps: int = 6) -> torch.Tensor:
    variant = sc.Variant(name, name, {}, {"eta": 1.0} if name == "ddim" else {})
    noise = torch.randn(sc.LATENT_SHAPE, generator=torch.Generator().manual_seed(5))
    model = sc.score_fn if name == "sde_ve" else sc.model_fn
    with torch.no_grad(), sc._quiet_diffusers():
        return sc.sample_loop(sched, variant, steps, noise, model, generator=torch.Generator().manual_seed(6))


SAVE_CASES = [(n, {} if n == "sde_ve" else dict(SD15)) for n in S.SCHEDULERS] + [
    ("dpmpp_2m", {**SD15, "use_karras_sigmas": True, "thresholding": True, "sample_max_value": 2.5}),
    ("dpmpp_2m", {**SD15, "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "use_lu_lambdas": True}),
    ("euler", {**SD15, "use_beta_sigmas": True, "timestep_spacing": "trailing", "sigma_min": 0.05}),
    ("ddpm", {**SD15, "thresholding": True, "trained_betas": [0.0001 + i * 2e-5 for i in range(1000)]}),
]
SAVE_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(SAVE_CASES)]


# ------------------------------------------------------------------------------------- files, both ways


@pytest.mark.parametrize("name,config", SAVE_CASES, ids=SAVE_IDS)
def test_saved_by_ours_loads_in_diffusers(tmp_path, name, config):
    ours = S.SCHEDULERS[name].from_config(config)
    ours.save_pretrained(tmp_path / "scheduler")
    written = json.loads((tmp_path / "scheduler" / S.CONFIG_NAME).read_text())
    assert written["_class_name"] == S.DIFFUSERS_CLASS_NAMES[name] and "_diffusers_version" in written
    with sc._quiet_diffusers():
        ref = _ref_cls(name).from_pretrained(tmp_path, subfolder="scheduler")
    back = S.SCHEDULERS[name].from_pretrained(tmp_path, subfolder="scheduler")
    assert _norm(ref.config) == _norm(back.config)
    assert torch.equal(_loop(ref, name), _loop(back, name))


@pytest.mark.parametrize("name,config", SAVE_CASES, ids=SAVE_IDS)
def test_saved_by_diffusers_loads_in_ours(tmp_path, name, config):
    with sc._quiet_diffusers():
        ref = _ref_cls(name).from_config(config)
        ref.save_pretrained(tmp_path)
        ref_loaded = _ref_cls(name).from_pretrained(tmp_path)
    ours = S.SCHEDULERS[name].from_pretrained(tmp_path)
    assert type(ours) is S.SCHEDULERS[name]
    assert _norm(ours.config) == _norm(ref_loaded.config)
    assert torch.equal(_loop(ref_loaded, name), _loop(ours, name))


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_save_config_writes_diffusers_bytes(tmp_path, name):
    """Same config in, byte-identical scheduler_config.json out (sorted keys, indent 2, metadata keys)."""
    import diffusers
    config = {} if name == "sde_ve" else SD15
    with sc._quiet_diffusers():
        ref = _ref_cls(name).from_config(config)
    ours = S.SCHEDULERS[name].from_config(config)
    ref.save_config(tmp_path / "ref")
    ours.save_config(tmp_path / "ours")
    assert S.DIFFUSERS_VERSION == diffusers.__version__
    assert (tmp_path / "ours" / S.CONFIG_NAME).read_text() == (tmp_path / "ref" / S.CONFIG_NAME).read_text()
    # diffusers' to_json_string writes the two metadata keys into its own config; so does ours
    assert _norm(ours.config) == _norm(ref.config)


def test_from_pretrained_errors_and_file_path(tmp_path):
    with pytest.raises(OSError, match="no file named scheduler_config.json"):
        S.DDIMScheduler.from_pretrained(tmp_path)
    (tmp_path / S.CONFIG_NAME).write_text("{not json")
    with pytest.raises(OSError, match="not a valid JSON file"):
        S.DDIMScheduler.from_pretrained(tmp_path)
    S.DDIMScheduler.from_config(SD15).save_config(tmp_path / "x")
    s = S.DDIMScheduler.from_pretrained(tmp_path / "x" / S.CONFIG_NAME, steps_offset=0)  # a file path, an override
    assert s.config.steps_offset == 0 and s.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="should be a directory"):
        s.save_config(tmp_path / "x" / S.CONFIG_NAME)


def test_pipeline_folder_with_scheduler_subfolder_switches_class(tmp_path):
    """The common use: a PNDM scheduler folder loaded as another class (diffusers drops PNDM's own keys)."""
    import diffusers
    diffusers.PNDMScheduler.from_config(S.SD15_SCHEDULER_CONFIG).save_pretrained(tmp_path / "scheduler")
    with sc._quiet_diffusers():
        ref = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    ours = S.EulerDiscreteScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert _norm(ours.config) == _norm(ref.config) and ours.config["_class_name"] == "EulerDiscreteScheduler"
    assert torch.equal(_loop(ref, "euler"), _loop(ours, "euler"))


# ------------------------------------------------------------------------------------- step() outputs


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_step_output_behaves_as_diffusers_output(name):
    config = {} if name == "sde_ve" else SD15
    outs = []
    for sched in (_ref_cls(name).from_config(config), S.SCHEDULERS[name].from_config(config)):
        sched.set_timesteps(4)
        x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
        t = sched.timesteps[0]
        step = sched.step_pred if name == "sde_ve" else sched.step
        kwargs = {"generator": torch.Generator().manual_seed(1)} if "generator" in inspect.signature(step).parameters else {}
        with sc._quiet_diffusers():
            out = step(sc.model_fn(sched.scale_model_input(x, t), t), t, x, **kwargs)
        kwargs = {"generator": torch.Generator().manual_seed(1)} if kwargs else {}
        sched2 = type(sched).from_config(config)
        sched2.set_timesteps(4)
        step2 = sched2.step_pred if name == "sde_ve" else sched2.step
        with sc._quiet_diffusers():
            tup = step2(sc.model_fn(sched2.scale_model_input(x, t), t), t, x, return_dict=False, **kwargs)
        outs.append((out, tup))
    (ref, ref_tup), (ours, our_tup) = outs
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(ref)]
    assert list(ours.keys()) == list(ref.keys())
    assert isinstance(ours, dict) and isinstance(ours, typing.Mapping)
    for key in ref.keys():
        assert torch.equal(ours[key], ref[key]) and ours[key] is getattr(ours, key)
    assert torch.equal(ours[0], ref[0]) and ours[0] is ours.prev_sample
    assert len(ours.to_tuple()) == len(ref.to_tuple()) == len(our_tup) == len(ref_tup)
    assert isinstance(our_tup, tuple) and all(torch.equal(a, b) for a, b in zip(our_tup, ref_tup))
    assert all(torch.equal(a, b) for a, b in zip(ours.to_tuple(), our_tup))
    assert hasattr(ours, "pred_original_sample") == hasattr(ref, "pred_original_sample")
    with pytest.raises(KeyError):
        ours["nope"]
    with pytest.raises(KeyError):
        ref["nope"]


def test_step_output_none_field_is_not_a_key():
    """As BaseOutput: a None field is left out of keys() and to_tuple(), and setting the attribute later does not
    add it (diffusers only mirrors attributes that are keys already); the mapping cannot shrink."""
    from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
    x = torch.ones(1)
    ref, ours = DDIMSchedulerOutput(prev_sample=x), S.PredX0SchedulerOutput(prev_sample=x)
    assert list(ref.keys()) == list(ours.keys()) == ["prev_sample"] and len(ours.to_tuple()) == 1
    ref.pred_original_sample = x
    ours.pred_original_sample = x
    assert list(ref.keys()) == list(ours.keys()) == ["prev_sample"] and ours.pred_original_sample is x
    ref.prev_sample = ours.prev_sample = 2 * x
    assert torch.equal(ours["prev_sample"], ref["prev_sample"]) and torch.equal(ours[0], 2 * x)
    import pickle
    again = pickle.loads(pickle.dumps(ours))
    assert type(again) is type(ours) and torch.equal(again.prev_sample, 2 * x)
    with pytest.raises(Exception):
        ours.pop("prev_sample")


# ------------------------------------------------------------------------------------- new options, bit-equal


OPTION_CASES = [v for name in OPTION_VARIANTS for v in sc.variants_for(name)[-len(OPTION_VARIANTS[name]):]]


@pytest.mark.parametrize("variant", OPTION_CASES, ids=[v.label for v in OPTION_CASES])
def test_new_option_bit_equal_full_loop(variant):
    rows = sc.check_variant(variant, (1, 2, 10, 25))
    assert all(r["passed"] for r in rows), [r for r in rows if not r["passed"]]
    compared = [r for r in rows if r["max_abs"] is not None]
    assert {r["tensor"] for r in compared} >= {"timesteps", "latents"}
    # fixed_large_log is NaN in diffusers (the square root of log beta); there the same elements must be NaN
    nan_ok = "fixed_large_log" in variant.label
    for r in compared:
        if nan_ok and r["note"].startswith("diffusers output is non-finite too"):
            continue
        assert r["max_abs"] == 0.0, (r["step"], r["tensor"], r["max_abs"], r["note"])
    assert not nan_ok or any(r["note"].startswith("diffusers output is non-finite too") for r in rows)


@pytest.mark.parametrize("name", ["euler", "lms", "dpmpp_2m"])
def test_beta_sigmas_equal_scipy_backed_diffusers_at_every_step_count(name):
    """Our Beta(0.6, 0.6) quantile (no scipy) gives diffusers' float32 sigmas at each n in 1..80."""
    config = {**SD15, "use_beta_sigmas": True}
    with sc._quiet_diffusers():
        ref = _ref_cls(name).from_config(config)
    ours = S.SCHEDULERS[name].from_config(config)
    for n in range(1, 81):
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        assert torch.equal(ref.sigmas, ours.sigmas) and torch.equal(ref.timesteps, ours.timesteps), n


# ------------------------------------------------------------------------------------- configs diffusers accepts


def _sibling_configs() -> list[tuple[str, dict]]:
    """Every Karras-compatible diffusers scheduler's default config as its scheduler_config.json holds it."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
    out = []
    for e in KarrasDiffusionSchedulers:
        try:
            sched = getattr(diffusers, e.name)()
        except (ImportError, OSError):  # DPMSolverSDEScheduler needs torchsde
            continue
        out.append((e.name, json.loads(sched.to_json_string())))
    return out


@pytest.mark.parametrize("target", DISCRETE)
def test_sibling_configs_map_across_like_diffusers(target):
    """A DEIS, UniPC, Heun, KDPM2... config loaded into each of ours: same config dict as diffusers builds, same
    schedule; where diffusers raises (a DEIS config into DPM-Solver keeps final_sigmas_type "zero"), ours raises."""
    for src, config in _sibling_configs():
        try:
            with sc._quiet_diffusers():
                ref = _ref_cls(target).from_config(config)
        except ValueError as e:
            with pytest.raises(ValueError) as info:
                S.SCHEDULERS[target].from_config(config)
            assert str(info.value) == str(e), (src, target)
            continue
        ours = S.SCHEDULERS[target].from_config(config)
        assert _norm(ours.config) == _norm(ref.config), (src, target)
        ref.set_timesteps(7)
        ours.set_timesteps(7)
        assert torch.equal(ref.timesteps, ours.timesteps), (src, target)


def _accepted_values(annotation, default) -> list:
    values = []
    for arg in typing.get_args(annotation) or ():
        values.extend(typing.get_args(arg) if typing.get_origin(arg) is typing.Literal else [])
    if typing.get_origin(annotation) is typing.Literal:
        values.extend(typing.get_args(annotation))
    if isinstance(default, bool):
        values.extend([True, False])
    elif isinstance(default, float) and 0 < default < 1e6 and default == int(default):
        values.append(int(default))  # an int where diffusers documents a float
    return list(dict.fromkeys(values))


@pytest.mark.parametrize("name", DISCRETE)
def test_every_value_diffusers_accepts_ours_accepts(name):
    """Each value of each key diffusers' signature offers (its Literals, both bools, ints for floats), one at a time
    on SD 1.5's config: when diffusers builds it and sets 10 steps, ours does too, with the same schedule.
    Flow-matching keys are the exception: refused with a ValueError (not an SD 1.x/2.x option)."""
    cls, ref_cls = S.SCHEDULERS[name], _ref_cls(name)
    tried = 0
    for key, param in inspect.signature(ref_cls.__init__).parameters.items():
        if key in ("self", "kwargs"):
            continue
        for value in _accepted_values(param.annotation, param.default):
            config = {**SD15, key: value}
            if key == "algorithm_type" and value in ("dpmsolver", "sde-dpmsolver"):
                config["final_sigmas_type"] = "sigma_min"
            try:
                with sc._quiet_diffusers():
                    ref = ref_cls.from_config(config)
                    ref.set_timesteps(10)
            except Exception:  # noqa: BLE001 - diffusers refuses: so may we
                continue
            if (key, value) in FLOW_ONLY:
                with pytest.raises(ValueError):
                    cls.from_config(config)
                continue
            ours = cls.from_config(config)
            ours.set_timesteps(10)
            tried += 1
            assert torch.equal(ref.timesteps, ours.timesteps), (key, value)
            if hasattr(ref, "sigmas"):
                assert torch.equal(ref.sigmas, ours.sigmas), (key, value)
    assert tried >= 2  # PNDM / Euler-ancestral have few keys; DPM-Solver dozens


FLOW_ONLY = {("use_flow_sigmas", True), ("prediction_type", "flow_prediction"), ("use_dynamic_shifting", True)}


def test_unknown_keys_are_ignored_with_diffusers_warning(caplog):
    config = {**SD15, "beta_strat": 0.001}
    with sc._quiet_diffusers():
        ref = _ref_cls("ddim").from_config(config)
    with caplog.at_level(logging.WARNING, logger="scratch_sd.schedulers"):
        ours = S.DDIMScheduler.from_config(config)
    assert "The config attributes {'beta_strat': 0.001} were passed to DDIMScheduler" in caplog.text
    assert _norm(ours.config) == _norm(ref.config) and ours.config["beta_strat"] == 0.001
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scratch_sd.schedulers"):
        S.EulerDiscreteScheduler.from_config(SD15)  # PNDM/DDIM keys of a sibling: silently skipped, as diffusers
    assert caplog.text == ""


# ------------------------------------------------------------------------------------- rejected values


@pytest.mark.parametrize("name,config,match", [
    ("dpmpp_2m", {"algorithm_type": "dpmsolver"}, "`final_sigmas_type` zero is not supported for `algorithm_type` dpmsolver"),
    ("dpmpp_2m", {"algorithm_type": "deis"}, "`final_sigmas_type` zero is not supported for `algorithm_type` deis"),
    ("euler", {"use_karras_sigmas": True, "use_beta_sigmas": True}, "Only one of `config.use_beta_sigmas`"),
    ("lms", {"use_exponential_sigmas": True, "use_karras_sigmas": True}, "Only one of `config.use_beta_sigmas`"),
    ("dpmpp_2m", {"use_exponential_sigmas": True, "use_beta_sigmas": True}, "Only one of `config.use_beta_sigmas`"),
])
def test_values_diffusers_rejects_are_rejected_with_its_message(name, config, match):
    with pytest.raises(ValueError, match=match):
        _ref_cls(name).from_config({**SD15, **config})
    with pytest.raises(ValueError, match=match) as info:
        S.SCHEDULERS[name].from_config({**SD15, **config})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,key,value", [
    ("dpmpp_2m", "algorithm_type", "foo"), ("dpmpp_2m", "solver_type", "rk4"), ("ddpm", "variance_type", "fixed_big"),
    ("dpmpp_2m", "use_flow_sigmas", True), ("euler", "timestep_spacing", "even"), ("ddim", "beta_schedule", "sigmoid"),
])
def test_bad_values_fail_at_construction_one_line(name, key, value):
    """diffusers raises NotImplementedError / ValueError for these (some only at set_timesteps); ours at once."""
    with pytest.raises(ValueError) as info:
        S.SCHEDULERS[name].from_config({**SD15, key: value})
    assert f"{key}={value!r}" in str(info.value) and "\n" not in str(info.value)


def test_sde_dpmsolver_third_order_fails_at_the_third_step_like_diffusers():
    config = {**SD15, "algorithm_type": "sde-dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}
    variant = sc.Variant("dpmpp_2m", "x", config)
    with sc._quiet_diffusers():
        ref, ours = sc.make_pair(variant)
    with pytest.raises(UnboundLocalError):
        _loop(ref, "dpmpp_2m", 20)
    with pytest.raises(ValueError, match="no third-order update"):
        _loop(ours, "dpmpp_2m", 20)
    few = sc.make_pair(variant)
    assert torch.equal(_loop(few[0], "dpmpp_2m", 2), _loop(few[1], "dpmpp_2m", 2))  # orders 1-2 still work


def test_beta_quantile_rounds_like_scipy_in_float32():
    """beta_ppf (no scipy) against scipy.stats.beta.ppf, the function diffusers calls: the float32 sigma built from
    each quantile is the same number at every grid point of 2..100 and 1000 steps."""
    import numpy as np
    import scipy.stats
    from scratch_sd.schedulers.common import beta_ppf
    sigma_min, sigma_max = 0.029167533, 14.614643  # SD 1.5's sigma range
    for n in list(range(2, 101)) + [1000]:
        for t in 1 - np.linspace(0, 1, n):
            ours, ref = beta_ppf(float(t), 0.6, 0.6), scipy.stats.beta.ppf(t, 0.6, 0.6)
            assert abs(ours - ref) <= 1e-13, (n, t, ours, ref)
            assert np.float32(sigma_min + ours * (sigma_max - sigma_min)) == np.float32(
                sigma_min + ref * (sigma_max - sigma_min)), (n, t)
