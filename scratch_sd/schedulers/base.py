"""The thin class layer shared by every scheduler: a frozen config, config validation, outputs.

A scheduler's `__init__` signature *is* its config: keys and defaults are diffusers' own, so
`Ours.from_config(pipe.scheduler.config)` reads the same `scheduler_config.json` diffusers reads.
`@configured` checks every value against the class's `CHECKS` before `__init__` runs, so a bad
value fails at construction with the key and value named, not deep inside a sampling loop.
"""
from __future__ import annotations

import functools
import inspect
import math
import logging
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch

from .files import CONFIG_NAME, DIFFUSERS_VERSION, ConfigFiles  # noqa: F401 (re-exported)
from .outputs import (BaseOutput, PredX0SchedulerOutput, SchedulerOutput, SdeVeOutput,  # noqa: F401 (re-exported)
                      DDIMSchedulerOutput, DDPMSchedulerOutput, EulerAncestralDiscreteSchedulerOutput,
                      EulerDiscreteSchedulerOutput, LMSDiscreteSchedulerOutput)

logger = logging.getLogger("scratch_sd.schedulers")

# Config keys that belong to some diffusers scheduler a Stable Diffusion pipeline can load
# (KarrasDiffusionSchedulers, LCM, TCD, EDM, flow matching, ScoreSdeVe). `from_config` skips them
# when the class at hand has no such key, exactly as diffusers' `from_config` does; any other key
# is a typo or a config for something else, and is an error.
KNOWN_SCHEDULER_KEYS = frozenset({
    "algorithm_type", "base_image_seq_len", "base_shift", "beta_end", "beta_schedule", "beta_start",
    "clip_sample", "clip_sample_range", "correct_steps", "corrector_order", "disable_corrector",
    "dynamic_thresholding_ratio", "eta", "euler_at_final", "final_sigmas_type", "flow_shift",
    "interpolation_type", "invert_sigmas", "lambda_min_clipped", "lower_order_final", "max_image_seq_len",
    "max_shift", "num_train_timesteps", "original_inference_steps", "predict_x0", "prediction_type",
    "predictor_order", "rescale_betas_zero_snr", "rho", "s", "s_churn", "s_max", "s_min", "s_noise",
    "sample_max_value", "sampling_eps", "scaler", "set_alpha_to_one", "shift", "shift_terminal",
    "sigma_data", "sigma_max", "sigma_min", "sigma_schedule", "skip_prk_steps", "snr", "solver_order",
    "solver_p", "solver_type", "steps_offset", "stochastic_sampling", "tau_func", "thresholding",
    "time_shift_type", "timestep_scaling", "timestep_spacing", "timestep_type", "trained_betas",
    "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas",
    "use_karras_sigmas", "use_lu_lambdas", "variance_type",
})


class SchedulerConfig(dict):
    """Frozen dict with attribute access, like diffusers' FrozenDict: `cfg["k"]` and `cfg.k`.

    A dict subclass (as FrozenDict is), so diffusers' own `from_config(ours.config)` accepts it.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no key {name!r}") from None

    def _frozen(self, *args, **kwargs):
        raise AttributeError("scheduler config is frozen; build a new scheduler with from_config({**old.config, ...})")

    __setattr__ = __delattr__ = __setitem__ = __delitem__ = _frozen
    update = pop = popitem = setdefault = clear = _frozen

    def __reduce__(self):
        return (SchedulerConfig, (dict(self),))

    def __repr__(self) -> str:
        return f"SchedulerConfig({dict.__repr__(self)})"


# ---- value checks: each returns the (possibly normalised) value or raises ValueError ----------------

class Check:
    def __call__(self, key: str, value: Any, owner: str) -> Any:
        raise NotImplementedError

    @staticmethod
    def fail(owner: str, key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{owner}: unsupported value {key}={value!r}; expected {expected}")


class OneOf(Check):
    def __init__(self, *allowed: Any, why: str = ""):
        self.allowed, self.why = allowed, why

    def __call__(self, key, value, owner):
        if not any(value is a or (type(value) is type(a) and value == a) for a in self.allowed):
            raise self.fail(owner, key, value, "one of " + ", ".join(repr(a) for a in self.allowed) + self.why)
        return value


class Flag(Check):
    """A bool option. `supported=False` means: accepted only when off (None counts as off, as in diffusers)."""

    def __init__(self, supported: bool = True, why: str = ""):
        self.supported, self.why = supported, why

    def __call__(self, key, value, owner):
        if value is None:
            return value
        if not isinstance(value, bool):
            raise self.fail(owner, key, value, "True or False")
        if value and not self.supported:
            raise ValueError(f"{owner}: {key}=True is not supported by scratch_sd{self.why}; set it to False")
        return value


class Number(Check):
    def __init__(self, lo: float = -math.inf, hi: float = math.inf, integer: bool = False,
                 optional: bool = False, lo_open: bool = False):
        self.lo, self.hi, self.integer, self.optional, self.lo_open = lo, hi, integer, optional, lo_open

    def __call__(self, key, value, owner):
        if value is None and self.optional:
            return value
        kind = "an integer" if self.integer else "a number"
        ok_type = isinstance(value, int) if self.integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            raise self.fail(owner, key, value, kind + (" or None" if self.optional else ""))
        too_low = value <= self.lo if self.lo_open else value < self.lo
        if too_low or value > self.hi or (isinstance(value, float) and math.isnan(value)):
            bound = f"> {self.lo}" if self.lo_open else f">= {self.lo}"
            raise self.fail(owner, key, value, f"{kind} {bound} and <= {self.hi}")
        return value


class Betas(Check):
    """trained_betas: None or a 1-D sequence of floats in (0, 1)."""

    def __call__(self, key, value, owner):
        if value is None:
            return value
        try:
            betas = [float(b) for b in value]
        except (TypeError, ValueError):
            raise self.fail(owner, key, "<not a sequence of numbers>", "None or a list of floats") from None
        if not betas or not all(0.0 < b < 1.0 for b in betas):
            raise self.fail(owner, key, value if len(betas) < 8 else f"<{len(betas)} values>",
                            "None or a non-empty list of floats in (0, 1)")
        return list(value)


ANY = type("AnyCheck", (Check,), {"__call__": lambda self, key, value, owner: value})()

# Checks shared by the DDPM-family schedulers (keys and value sets as diffusers documents them).
COMMON_CHECKS: dict[str, Check] = {
    "num_train_timesteps": Number(1, integer=True),
    "beta_start": Number(0.0, 1.0, lo_open=True),
    "beta_end": Number(0.0, 1.0, lo_open=True),
    "beta_schedule": OneOf("linear", "scaled_linear", "squaredcos_cap_v2"),
    "trained_betas": Betas(),
    "prediction_type": OneOf("epsilon", "v_prediction", "sample"),
    "timestep_spacing": OneOf("linspace", "leading", "trailing"),
    "steps_offset": Number(0, integer=True),
    "set_alpha_to_one": Flag(),
    "clip_sample": Flag(),
    "clip_sample_range": Number(0.0, lo_open=True),
    "thresholding": Flag(),
    "dynamic_thresholding_ratio": Number(0.0, 1.0),
    "sample_max_value": Number(0.0, lo_open=True),
    "rescale_betas_zero_snr": Flag(),
}


def configured(init: Callable) -> Callable:
    """Decorator for `__init__`: bind arguments to the signature, check each value, freeze the config."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        owner = type(self).__name__
        private = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("_")}  # metadata, kept (as diffusers)
        unknown = [k for k in kwargs if k not in sig.parameters or k == "self"]
        if unknown:
            raise ValueError(f"{owner}: unknown config key {unknown[0]!r} (value {kwargs[unknown[0]]!r}); "
                             f"known keys: {', '.join(type(self).config_keys())}")
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {k: v for k, v in bound.arguments.items() if k != "self"}
        checks = type(self).CHECKS
        for key, value in values.items():
            if key not in checks:
                raise TypeError(f"{owner}: no check declared for config key {key!r}")  # a bug in this package
            values[key] = checks[key](key, value, owner)
        config = {**private, **values}
        defaults = sorted(set(values) - set(kwargs))  # as diffusers: keys that took the class default
        if defaults:
            config["_use_default_values"] = defaults
        self._internal_dict = SchedulerConfig(config)
        init(self, **values)

    return wrapper


class Scheduler(ConfigFiles):
    """Base of every scheduler. Subclasses set CHECKS, DIFFUSERS_NAME and decorate __init__ with @configured."""

    order = 1
    CHECKS: dict[str, Check] = {}
    DIFFUSERS_NAME = ""
    config_name = CONFIG_NAME

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("DIFFUSERS_NAME"):
            _SCHEDULER_CLASSES[cls.DIFFUSERS_NAME] = cls

    @property
    def config(self) -> SchedulerConfig:
        # `_internal_dict` as in diffusers' ConfigMixin: StableDiffusionPipeline.__init__ may replace it
        # (it rewrites an outdated steps_offset / clip_sample), and must see the change here.
        return self._internal_dict

    @classmethod
    def config_keys(cls) -> list[str]:
        return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]

    def register_to_config(self, **kwargs: Any) -> None:
        """Replace config entries (diffusers' ConfigMixin.register_to_config); the config stays frozen."""
        self._internal_dict = SchedulerConfig({**self._internal_dict, **kwargs})

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, return_unused_kwargs: bool = False,
                    **overrides: Any):
        """Build from a diffusers scheduler config (a scheduler_config.json dict or any `scheduler.config`).

        diffusers' `from_config` rules: keys listed in `_use_default_values` take this class's default;
        keys of the other schedulers (a DDIM or DEIS config loaded here) are skipped silently; any other
        unknown key is logged as a warning and ignored; `overrides` win over the config; the keys not used
        are kept in `.config` (so a chain of from_config calls loses nothing), `_class_name` naming this class.
        """
        if config is None:
            raise ValueError("Please make sure to provide a config as the first positional argument.")
        config = dict(config)
        used_defaults = config.get("_use_default_values", None) or []
        config = {k: v for k, v in config.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config)
        own = set(cls.config_keys())
        orig_name = config.get("_class_name", cls.DIFFUSERS_NAME)
        if not isinstance(orig_name, (str, list, tuple)):
            raise ValueError("Make sure that the `_class_name` is of type string or list of string (for custom pipelines).")
        from_cls = _SCHEDULER_CLASSES.get(orig_name) if isinstance(orig_name, str) else None
        skipped = set(KNOWN_SCHEDULER_KEYS) | (set(from_cls.config_keys()) if from_cls is not None else set())
        init: dict[str, Any] = {}
        unexpected: dict[str, Any] = {}
        for key, value in config.items():
            if key in own:
                init[key] = value
            elif not key.startswith("_") and key not in skipped and key != "quantization_config":
                unexpected[key] = value
        unused = {}
        for key, value in overrides.items():
            if key in own:
                init[key] = value
            else:
                unused[key] = value
        if unexpected:
            logger.warning(f"The config attributes {unexpected} were passed to {cls.__name__}, but are not expected "
                           f"and will be ignored. Please verify your {CONFIG_NAME} configuration file.")
        if unused:
            logger.warning(f"{cls.__name__}.from_config: keyword arguments {unused} are not config keys of "
                           f"{cls.__name__} and are ignored")
        model = cls(**init)
        hidden = {k: v for k, v in original.items() if k not in init}
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.DIFFUSERS_NAME
        model.register_to_config(**hidden)
        if return_unused_kwargs:
            return model, {**unexpected, **unused, **hidden}
        return model

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k != "trained_betas" and not k.startswith("_"))
        return f"{type(self).__name__}({items})"


_SCHEDULER_CLASSES: dict[str, type] = {}  # DIFFUSERS_NAME -> class, filled by Scheduler.__init_subclass__


def check_num_inference_steps(num_inference_steps: Any, num_train_timesteps: int | None) -> int:
    """0 steps, negative, non-integer, or more steps than training timesteps: a clear ValueError.

    diffusers raises the "cannot be larger" error in DDPM/DDIM and fails less clearly elsewhere
    (ZeroDivisionError for 0 with leading spacing, silently repeated timesteps for too many).
    """
    if isinstance(num_inference_steps, torch.Tensor) and num_inference_steps.numel() == 1:
        num_inference_steps = num_inference_steps.item()
    if isinstance(num_inference_steps, np.integer):
        num_inference_steps = int(num_inference_steps)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps}")
    if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`:"
            f" {num_train_timesteps} as the unet model trained with this scheduler can only handle"
            f" maximal {num_train_timesteps} timesteps.")
    return num_inference_steps


class StepIndexed(Scheduler):
    """The step bookkeeping of diffusers' sigma and multistep schedulers (Euler, DPM-Solver): which
    entry of the schedule the next `step` uses, and where img2img begins (`set_begin_index`).
    Subclasses define `index_for_timestep` and set `_step_index = _begin_index = None` in set_timesteps."""

    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """img2img: the pipeline starts part-way, at timesteps[begin_index]."""
        self._begin_index = begin_index

    def _init_step_index(self, timestep) -> None:
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index
