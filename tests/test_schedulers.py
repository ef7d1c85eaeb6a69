"""scratch_sd.schedulers against diffusers: exact schedules, fp32-equal sampling loops, config handling,
img2img start step, and the schedulers swapped into diffusers' own Stable Diffusion pipelines."""
from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from parity import scheduler_check as sc
from scratch_sd import schedulers as S
from scratch_sd.schedulers.quadpack import qags

SCHED_DIR = Path(S.__file__).parent
SD15 = dict(S.SD15_SCHEDULER_CONFIG)
DISCRETE = [n for n in S.SCHEDULERS if n != "sde_ve"]
PARITY_STEPS = (1, 2, 10, 20, 50)
ALL_VARIANTS = [v for name in S.SCHEDULERS for v in sc.variants_for(name)]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a busy machine (restored after)."""
    with sc.single_thread():
        yield


def _fail_report(rows: list[dict]) -> str:
    bad = [r for r in rows if not r["passed"]]
    return "\n".join(f"{r['scheduler']} steps={r['step']} {r['tensor']}: max_abs={r['max_abs']} atol={r['atol']} "
                     f"{r['note']}" for r in bad)


def _diffusers_cls(name: str):
    import diffusers
    return getattr(diffusers, S.DIFFUSERS_CLASS_NAMES[name])


def _gen(sched) -> dict:
    """A seeded generator for `step` when it takes one (each call: a fresh generator, same seed)."""
    import inspect
    return {"generator": torch.Generator().manual_seed(0)} if "generator" in inspect.signature(sched.step).parameters else {}


def _pair(name: str, config: dict):
    with sc._quiet_diffusers():
        ref = _diffusers_cls(name).from_config(dict(config))
    return ref, S.SCHEDULERS[name].from_config(dict(config))


# ------------------------------------------------------------------------------------- import hygiene


def test_schedulers_import_no_diffusers_transformers_scipy():
    """Statically (every import statement) and dynamically (a fresh interpreter's sys.modules)."""
    banned = ("diffusers", "transformers", "scipy")
    for path in sorted(SCHED_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                assert mod.split(".")[0] not in banned, f"{path.name} imports {mod}"
    code = ("import sys, scratch_sd.schedulers as s; s.get_scheduler('lms', s.SD15_SCHEDULER_CONFIG).set_timesteps(5);"
            "print(sorted(m for m in ('diffusers', 'transformers', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=SCHED_DIR.parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------------------------------- registry


def test_registry_names_and_diffusers_classes():
    import diffusers
    assert list(S.SCHEDULERS) == ["ddpm", "ddim", "pndm", "euler", "euler_ancestral", "dpmpp_2m", "lms", "sde_ve"]
    for name, cls_name in S.DIFFUSERS_CLASS_NAMES.items():
        ref_cls = getattr(diffusers, cls_name)
        assert cls_name == S.SCHEDULERS[name].__name__
        # same config keys as diffusers' class (signature of __init__)
        import inspect
        ref_keys = [k for k in inspect.signature(ref_cls.__init__).parameters if k != "self"]
        assert S.SCHEDULERS[name].config_keys() == ref_keys, name


def test_unknown_scheduler_name():
    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'; known: ddpm, ddim, pndm"):
        S.get_scheduler("heun", SD15)
    with pytest.raises(ValueError, match="unknown scheduler 'nope'"):
        sc.run_scheduler_checks(["nope"])


def test_known_foreign_keys_cover_diffusers_sd_schedulers():
    import inspect
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
    import diffusers
    for e in KarrasDiffusionSchedulers:
        keys = set(inspect.signature(getattr(diffusers, e.name).__init__).parameters) - {"self", "kwargs", "args"}
        assert keys <= S.KNOWN_SCHEDULER_KEYS, (e.name, keys - S.KNOWN_SCHEDULER_KEYS)


# ------------------------------------------------------------------------------------- parity sweep


@pytest.mark.parametrize("variant", ALL_VARIANTS, ids=[v.label for v in ALL_VARIANTS])
def test_parity_variant(variant):
    """Timesteps and sigmas bit-equal; loop latents and add_noise within 1e-6 (they come out bit-equal)."""
    rows = sc.check_variant(variant, PARITY_STEPS)
    assert len({r["step"] for r in rows}) == len(PARITY_STEPS), "a step count produced no row"
    compared = [r for r in rows if r["max_abs"] is not None]
    assert {r["tensor"] for r in compared} >= {"timesteps", "latents", "add_noise"}
    assert all(r["passed"] for r in rows), _fail_report(rows)
    for r in rows:  # every compared tensor bit-equal, loops included (NaN rows: same NaN mask, checked by the row)
        if r["max_abs"] is not None and not r["note"].startswith("diffusers output is non-finite too"):
            assert r["max_abs"] == 0.0, r


@pytest.mark.parametrize("name", ["ddim", "euler", "euler_ancestral", "lms"])
def test_thousand_step_loop(name):
    """The 1000-step loop (steps_offset=0 so the leading grid stays in range). LMS is the interesting one: its
    close sigmas send QUADPACK into subdivision. The other schedulers' 1000-step loops run in
    `python -m parity.scheduler_check` (kept out of the unit tests for time)."""
    variant = next(v for v in sc.variants_for(name) if v.long and "offset=0" in v.label)
    rows = [r for r in sc.check_variant(variant, (1000,)) if r["tensor"] == "latents"]
    assert len(rows) == 1 and rows[0]["passed"], _fail_report(rows)
    assert rows[0]["max_abs"] is not None and rows[0]["max_abs"] <= 1e-6


def test_sd15_thousand_steps_out_of_range_fails_like_diffusers():
    """SD 1.5's steps_offset=1 pushes the leading grid to t=1000 at 1000 steps: both sides raise IndexError."""
    variant = sc.variants_for("ddim")[0]
    row = [r for r in sc.check_variant(variant, (1000,)) if r["tensor"] == "latents"][0]
    assert row["passed"] and row["note"].startswith("skipped: diffusers raises IndexError"), row


def test_check_catches_a_wrong_scheduler(monkeypatch):
    """The harness is not vacuous: perturbing one update rule by 1 ulp-ish fails the latents row."""
    from scratch_sd.schedulers import ddim
    orig = ddim.ddim_update
    monkeypatch.setattr(ddim, "ddim_update", lambda *a: orig(*a) * (1 + 1e-6))
    rows = sc.check_variant(sc.variants_for("ddim")[0], (10,))
    latents = [r for r in rows if r["tensor"] == "latents"][0]
    assert not latents["passed"] and latents["max_abs"] > 1e-6


def test_unet_loop_rows():
    """(c): the same loop driven by a tiny random-weight diffusers UNet."""
    unet = sc.tiny_unet_fn()
    rows = sc.run_scheduler_checks(["euler", "dpmpp_2m"], steps=(2,), unet=unet)
    unet_rows = [r for r in rows if r["tensor"] == "latents_unet"]
    assert len(unet_rows) == 2, [r["scheduler"] for r in unet_rows]
    assert all(r["passed"] and r["max_abs"] <= 1e-6 for r in unet_rows), _fail_report(unet_rows)


def test_run_scheduler_checks_rows_have_contract_columns():
    rows = sc.run_scheduler_checks(["euler"], steps=(2,))
    cols = {"component", "scheduler", "step", "tensor", "shape", "max_abs", "mean_abs", "rel_l2", "cosine_distance",
            "psnr_db", "atol", "rtol", "min_psnr_db", "passed"}
    assert rows and all(cols <= set(r) for r in rows)
    assert rows[0]["component"] == "scheduler" and rows[0]["scheduler"].startswith("euler[")
    assert all(r["passed"] for r in rows)


# ------------------------------------------------------------------------------------- stochastic samplers


STOCHASTIC = [("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler_ancestral", {}), ("sde_ve", {}),
              ("euler", {"s_churn": 1.0}), ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"})]


@pytest.mark.parametrize("name,opts", STOCHASTIC, ids=[n for n, _ in STOCHASTIC])
def test_stochastic_samplers_consume_one_generator_identically(name, opts):
    config = {} if name == "sde_ve" else dict(SD15)
    step_kwargs = {k: v for k, v in opts.items() if k in ("eta", "s_churn")}
    config.update({k: v for k, v in opts.items() if k not in step_kwargs})
    variant = sc.Variant(name, name, config, step_kwargs)
    ref, ours = sc.make_pair(variant)
    noise = torch.randn(sc.LATENT_SHAPE, generator=torch.Generator().manual_seed(3))
    model = sc.score_fn if name == "sde_ve" else sc.model_fn
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    fresh = torch.Generator().manual_seed(7).get_state()
    with torch.no_grad(), sc._quiet_diffusers():
        a = sc.sample_loop(ref, variant, 5, noise.clone(), model, generator=g_ref)
        b = sc.sample_loop(ours, variant, 5, noise.clone(), model, generator=g_ours)
    assert not torch.equal(g_ref.get_state(), fresh), "the sampler drew no noise"
    assert torch.equal(g_ref.get_state(), g_ours.get_state()), "generators consumed differently"
    assert torch.equal(a, b), f"max_abs {(a - b).abs().max().item()}"
    # and the noise matters: another seed gives another result
    c = sc.sample_loop(S.SCHEDULERS[name].from_config(config), variant, 5, noise.clone(), model,
                       generator=torch.Generator().manual_seed(8))
    assert not torch.equal(b, c)


# ------------------------------------------------------------------------------------- config handling


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_from_config_sd15_dict_matches_diffusers_config(name):
    ref, ours = _pair(name, SD15)
    assert isinstance(ours, S.SCHEDULERS[name])
    for key in ours.config_keys():
        assert ours.config[key] == ref.config[key], (key, ours.config[key], ref.config[key])
        assert getattr(ours.config, key) == ours.config[key]
    norm = lambda c: {k: (sorted(v) if k == "_use_default_values" else v) for k, v in dict(c).items()}  # noqa: E731
    assert norm(ours.config) == norm(ref.config)  # hidden keys and metadata too, as diffusers keeps them
    assert ours.config["_class_name"] == ref.config["_class_name"] == S.DIFFUSERS_CLASS_NAMES[name]
    assert ours.order == ref.order == 1
    assert float(torch.as_tensor(ours.init_noise_sigma)) == float(torch.as_tensor(ref.init_noise_sigma))
    assert len(ours) == len(ref)


def test_config_is_frozen_mapping_with_attribute_access():
    s = S.get_scheduler("ddim", SD15)
    assert s.config.steps_offset == 1 and s.config["steps_offset"] == 1 and dict(s.config)["clip_sample"] is False
    assert getattr(s.config, "not_a_key", "default") == "default"
    with pytest.raises(AttributeError, match="frozen"):
        s.config.steps_offset = 0
    with pytest.raises(AttributeError, match="frozen"):
        s.config["steps_offset"] = 0
    import copy
    import diffusers
    assert copy.deepcopy(s.config) == s.config
    # diffusers' from_config takes our config (it is a dict, as diffusers' FrozenDict)
    assert diffusers.DDIMScheduler.from_config(s.config).config.steps_offset == 1
    rebuilt = S.DDIMScheduler.from_config({**s.config, "steps_offset": 0})
    assert rebuilt.config.steps_offset == 0


def test_use_default_values_follow_diffusers():
    """A config loaded without timestep_spacing records it in _use_default_values; from_config then uses the
    target class's default (Euler: linspace), exactly as diffusers does."""
    import diffusers
    legacy = {k: v for k, v in SD15.items() if k != "timestep_spacing"}
    pndm = diffusers.PNDMScheduler.from_config(legacy)
    assert "timestep_spacing" in pndm.config["_use_default_values"]
    with sc._quiet_diffusers():
        ref = diffusers.EulerDiscreteScheduler.from_config(pndm.config)
    ours = S.EulerDiscreteScheduler.from_config(pndm.config)
    assert ours.config.timestep_spacing == ref.config.timestep_spacing == "linspace"
    ref.set_timesteps(7)
    ours.set_timesteps(7)
    assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)


@pytest.mark.parametrize("name", list(S.SCHEDULERS))
def test_unknown_key_raises_naming_it(name, caplog):
    """from_config ignores an unknown key with diffusers' warning; the constructor refuses it (diffusers: TypeError)."""
    with caplog.at_level("WARNING", logger="scratch_sd.schedulers"):
        s = S.SCHEDULERS[name].from_config({**SD15, "beta_strat": 0.001})
    assert "'beta_strat': 0.001" in caplog.text and "will be ignored" in caplog.text
    assert s.config["beta_strat"] == 0.001 and "beta_strat" not in s.config_keys()
    with pytest.raises(ValueError, match="unknown config key 'beta_strat'"):
        S.SCHEDULERS[name](beta_strat=0.001)


@pytest.mark.parametrize("name,key,value", [
    ("ddpm", "beta_schedule", "foo"), ("ddim", "timestep_spacing", "bar"), ("euler", "prediction_type", "x0"),
    ("pndm", "prediction_type", "sample"), ("ddim", "thresholding", "on"), ("ddpm", "variance_type", "fixed_big"),
    ("dpmpp_2m", "solver_order", 4), ("dpmpp_2m", "algorithm_type", "dpmsolver+"), ("dpmpp_2m", "use_flow_sigmas", True),
    ("euler", "use_exponential_sigmas", 1), ("lms", "use_beta_sigmas", "yes"), ("euler_ancestral", "prediction_type", "sample"),
    ("ddim", "steps_offset", -1), ("ddim", "num_train_timesteps", 0), ("ddim", "clip_sample", "yes"),
    ("ddpm", "trained_betas", [0.5, 2.0]), ("sde_ve", "snr", -1.0), ("euler", "interpolation_type", "cubic"),
])
def test_bad_value_raises_naming_key_and_value(name, key, value):
    config = {} if name == "sde_ve" else dict(SD15)
    with pytest.raises(ValueError) as info:
        S.SCHEDULERS[name].from_config({**config, key: value})
    msg = str(info.value)
    assert f"{key}={value!r}" in msg, msg


@pytest.mark.parametrize("name,kwargs", [
    ("ddpm", {"timesteps": [999, 700, 400, 100, 0]}),
    ("euler", {"timesteps": [999.0, 650.5, 300.0, 10.0]}),
    ("euler", {"sigmas": [14.0, 5.0, 1.0, 0.1, 0.0]}),
    ("dpmpp_2m", {"timesteps": [999, 800, 500, 200, 50]}),
])
def test_custom_timesteps_and_sigmas_match_diffusers(name, kwargs):
    """retrieve_timesteps(timesteps=...) / (sigmas=...) path of the pipelines: same schedule, same loop."""
    import inspect
    ref, ours = _pair(name, SD15)
    assert set(inspect.signature(ours.set_timesteps).parameters) == set(inspect.signature(ref.set_timesteps).parameters)
    ref.set_timesteps(**kwargs)
    ours.set_timesteps(**kwargs)
    assert ref.timesteps.dtype == ours.timesteps.dtype and torch.equal(ref.timesteps, ours.timesteps)
    if hasattr(ref, "sigmas"):
        assert torch.equal(ref.sigmas, ours.sigmas)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    with sc._quiet_diffusers():
        for t in ref.timesteps:
            x = ref.step(sc.model_fn(ref.scale_model_input(x, t), t), t, x, **_gen(ref)).prev_sample
    for t in ours.timesteps:
        y = ours.step(sc.model_fn(ours.scale_model_input(y, t), t), t, y, **_gen(ours)).prev_sample
    assert torch.equal(x, y)


def test_trained_betas_length_must_match():
    with pytest.raises(ValueError, match="trained_betas has 3 values but num_train_timesteps is 1000"):
        S.DDIMScheduler.from_config({**SD15, "trained_betas": [0.1, 0.2, 0.3]})


def test_trained_betas_match_diffusers():
    betas = np.linspace(1e-4, 0.03, 50).tolist()
    config = {**SD15, "num_train_timesteps": 50, "trained_betas": betas}
    for name in ("ddim", "euler", "dpmpp_2m"):
        ref, ours = _pair(name, config)
        assert torch.equal(ref.alphas_cumprod, ours.alphas_cumprod)


def test_other_schedulers_keys_are_skipped_like_diffusers():
    """SD 1.5's dict carries PNDM keys (skip_prk_steps, set_alpha_to_one): Euler ignores them, as diffusers."""
    s = S.EulerDiscreteScheduler.from_config({**SD15, "solver_order": 3, "use_karras_sigmas": False})
    assert "skip_prk_steps" not in s.config_keys() and "solver_order" not in s.config_keys()
    import diffusers
    ref = diffusers.EulerDiscreteScheduler.from_config({**SD15, "solver_order": 3, "use_karras_sigmas": False})
    assert s.config["skip_prk_steps"] == ref.config["skip_prk_steps"] is True  # kept as a hidden key, as diffusers
    s = S.EulerDiscreteScheduler.from_config(SD15, skip_prk_steps=False)  # an override it has no use for: ignored
    assert s.config["skip_prk_steps"] is True


@pytest.mark.parametrize("name", DISCRETE)
def test_zero_and_too_many_steps_raise(name):
    s = S.get_scheduler(name, SD15)
    with pytest.raises(ValueError, match="must be a positive integer, got 0"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="cannot be larger than `self.config.train_timesteps`: 1000"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="positive integer"):
        s.set_timesteps(2.5)
    ref, _ = _pair(name, SD15)
    if name == "dpmpp_2m":  # diffusers silently returns an empty schedule
        ref.set_timesteps(0)
        assert len(ref.timesteps) == 0
    else:  # diffusers fails too, less clearly (ZeroDivisionError with leading spacing)
        with pytest.raises(ZeroDivisionError):
            ref.set_timesteps(0)
    if name in ("ddpm", "ddim"):  # where diffusers checks the upper bound, the message is the same
        with pytest.raises(ValueError) as ref_info:
            ref.set_timesteps(1001)
        with pytest.raises(ValueError) as our_info:
            s.set_timesteps(1001)
        assert str(ref_info.value) == str(our_info.value)


def test_sde_ve_steps():
    s = S.ScoreSdeVeScheduler()
    with pytest.raises(ValueError, match="positive integer, got 0"):
        s.set_timesteps(0)
    s.set_timesteps(3000)  # continuous time: more steps than num_train_timesteps is fine (as diffusers)
    assert s.timesteps.shape == (3000,) and s.timesteps.dtype == torch.float32


def test_step_before_set_timesteps_raises():
    for name in ("ddim", "dpmpp_2m"):
        s = S.get_scheduler(name, SD15)
        with pytest.raises(ValueError, match="set_timesteps"):
            s.step(torch.zeros(1, 4, 2, 2), 10, torch.zeros(1, 4, 2, 2))


def test_step_outputs_tuple_and_object():
    for name in DISCRETE:
        s = S.get_scheduler(name, SD15)
        s.set_timesteps(3)
        x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
        t = s.timesteps[0]
        out = s.step(sc.model_fn(s.scale_model_input(x, t), t), t, x, return_dict=True, **_gen(s))
        assert out.prev_sample.shape == x.shape and out[0] is out.prev_sample
        ref, _ = _pair(name, SD15)
        ref.set_timesteps(3)
        with sc._quiet_diffusers():
            ref_out = ref.step(sc.model_fn(ref.scale_model_input(x, t), t), t, x, return_dict=True, **_gen(ref))
        assert torch.equal(ref_out.prev_sample, out.prev_sample)
        assert hasattr(ref_out, "pred_original_sample") == hasattr(out, "pred_original_sample"), name
        s2 = S.get_scheduler(name, SD15)
        s2.set_timesteps(3)
        tup = s2.step(sc.model_fn(s2.scale_model_input(x, t), t), t, x, return_dict=False, **_gen(s2))
        assert isinstance(tup, tuple) and torch.equal(tup[0], out.prev_sample)


def test_euler_rejects_integer_timesteps_like_diffusers():
    s = S.get_scheduler("euler", SD15)
    s.set_timesteps(3)
    with pytest.raises(ValueError, match="integer indices"):
        s.step(torch.zeros(1, 4, 2, 2), 1, torch.zeros(1, 4, 2, 2))


# ------------------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("name", DISCRETE)
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_timesteps_match_diffusers(name, strength):
    from diffusers import StableDiffusionImg2ImgPipeline
    ref, ours = _pair(name, SD15)
    n = 10
    ref.set_timesteps(n)
    ref_ts, ref_steps = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=ref), n, strength,
                                                                   "cpu")
    ts, steps = S.img2img_timesteps(ours, n, strength)
    assert steps == ref_steps and ts.dtype == ref_ts.dtype and torch.equal(ts, ref_ts)
    assert getattr(ours, "begin_index", None) == getattr(ref, "begin_index", None)
    # the img2img start: add_noise at the first kept timestep, then the first step
    x0 = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t0 = ts[:1].repeat(2)
    a, b = ref.add_noise(x0, eps, t0), ours.add_noise(x0, eps, t0)
    assert torch.equal(a, b), (a - b).abs().max()
    t = ts[0]
    with sc._quiet_diffusers():
        ra = ref.step(sc.model_fn(ref.scale_model_input(a, t), t), t, a, **_gen(ref)).prev_sample
    oa = ours.step(sc.model_fn(ours.scale_model_input(b, t), t), t, b, **_gen(ours)).prev_sample
    assert torch.equal(ra, oa)


def test_img2img_strength_out_of_range():
    with pytest.raises(ValueError, match="strength"):
        S.img2img_timesteps(S.get_scheduler("ddim", SD15), 10, 1.5)


# ------------------------------------------------------------------------------------- LMS coefficients


def test_qags_port_equals_scipy_quad():
    """QUADPACK QAGS port vs scipy.integrate.quad, bit for bit, including subdivision and extrapolation."""
    from scipy import integrate
    cases = [(math.sqrt, 0.0, 1.0), (lambda x: 1 / math.sqrt(x) if x > 0 else 0.0, 0.0, 1.0),
             (lambda x: math.log(x) if x > 0 else 0.0, 0.0, 1.0), (math.sin, 0.0, 10.0),
             (lambda x: math.exp(-x * x), -3.0, 2.0), (lambda x: abs(x - 0.3), 0.0, 1.0)]
    for f, a, b in cases:
        for epsrel in (1.49e-8, 1e-4):
            assert qags(f, a, b, epsrel=epsrel)[0] == integrate.quad(f, a, b, epsrel=epsrel)[0]
    # float32 Lagrange integrands with close nodes (the adaptive path LMS hits)
    g = torch.Generator().manual_seed(0)
    sig = torch.sort(torch.rand(60, generator=g) * 14.6 + 0.03, descending=True).values
    s32 = sig.numpy()
    for t in range(3, 58):
        for order in (2, 3, 4):
            for co in range(order):
                def f_ref(tau):
                    prod = 1.0
                    for k in range(order):
                        if co != k:
                            prod *= (tau - sig[t - k]) / (sig[t - co] - sig[t - k])
                    return prod
                from scratch_sd.schedulers.lms import lms_coefficient
                ref = integrate.quad(f_ref, sig[t], sig[t + 1], epsrel=1e-4)[0]
                assert lms_coefficient(s32, order, t, co) == ref, (t, order, co)


def test_lms_coefficients_equal_diffusers():
    ref, ours = _pair("lms", SD15)
    ref.set_timesteps(30)
    ours.set_timesteps(30)
    for t in (0, 1, 2, 3, 10, 28, 29):
        for order in range(1, min(t + 1, 4) + 1):
            for co in range(order):
                assert ours.get_lms_coefficient(order, t, co) == ref.get_lms_coefficient(order, t, co)


# ------------------------------------------------------------------------------------- inside diffusers' pipelines


def _tiny_tokenizer(tmp: Path):
    from transformers import CLIPTokenizer
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 512, 513
    vocab["ca"], vocab["cat</w>"] = 514, 515  # the results of the two merges below
    (tmp / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\nc a\nca t</w>\n", encoding="utf-8")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=16)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    tok = _tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8, norm_num_groups=8)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=516, hidden_size=32, intermediate_size=37,
                                                num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16,
                                                bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=32))
    pipe = StableDiffusionPipeline(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tok,
                                   scheduler=PNDMScheduler.from_config(SD15), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _decode(pipe, latents):
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("name", DISCRETE)
def test_swapped_into_diffusers_pipelines(tiny_pipe, name):
    """pipe.scheduler = Ours.from_config(pipe.scheduler.config): same latents and image as diffusers' scheduler,
    in txt2img (CFG, eta, generator) and img2img (strength -> set_begin_index, add_noise)."""
    from diffusers import PNDMScheduler, StableDiffusionImg2ImgPipeline
    base = PNDMScheduler.from_config(SD15).config  # what the pipeline was built with
    ref_cls, our_cls = _diffusers_cls(name), S.SCHEDULERS[name]
    results = {}
    for side, make in (("ref", lambda: ref_cls.from_config(base)), ("ours", lambda: our_cls.from_config(base))):
        tiny_pipe.scheduler = make()
        with sc._quiet_diffusers():
            lat = tiny_pipe("a cat", num_inference_steps=3, guidance_scale=3.0, eta=1.0, output_type="latent",
                            generator=torch.Generator().manual_seed(0), height=64, width=64).images
            i2i = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
            i2i.set_progress_bar_config(disable=True)
            init = torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64)
            lat2 = i2i("a cat", image=init, strength=0.5, num_inference_steps=4, guidance_scale=2.0, eta=1.0,
                       output_type="latent", generator=torch.Generator().manual_seed(1)).images
        results[side] = (lat, _decode(tiny_pipe, lat), lat2)
    assert isinstance(tiny_pipe.scheduler, our_cls)
    for what, a, b in zip(("latents", "image", "img2img latents"), results["ref"], results["ours"]):
        assert torch.isfinite(a).all() and a.abs().max() > 0
        err = (a - b).abs().max().item()
        assert err <= 1e-6, f"{name} {what}: max_abs {err}"


def test_pipeline_constructor_rewrites_outdated_config(tiny_pipe):
    """StableDiffusionPipeline(scheduler=ours) with steps_offset=0 rewrites scheduler._internal_dict (as for
    diffusers' schedulers); our config reads it."""
    from diffusers import StableDiffusionPipeline
    ours = S.DDIMScheduler.from_config({**SD15, "steps_offset": 0})
    comps = {**tiny_pipe.components, "scheduler": ours}
    with sc._quiet_diffusers(), pytest.warns(FutureWarning):
        StableDiffusionPipeline(**comps)
    assert ours.config.steps_offset == 1
    ours.set_timesteps(10)
    assert int(ours.timesteps[-1]) == 1
