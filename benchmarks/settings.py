"""The settings of one `sdparity bench` run: a frozen dataclass, checked and filled from the
preset's defaults by `BenchSettings.make(...)` (every bad value a ValueError naming the option),
and the cases it plans."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks import cases as C
from parity.gate import names_list
from scratch_sd.config import PRESETS, TINY_PRESETS

# tiny presets (tiny, tiny-sd2): whole run under a minute, every component and sweep exercised.
_TINY_DEFAULTS = dict(warmup=1, repeats=5, sweep_warmup=1, sweep_repeats=3, pipeline_warmup=1, pipeline_repeats=5,
                      steps=4, resolutions="32,64,128", batch_sizes="1,2,4", batch_resolution=64,
                      memory_scope="main", memory_warmup=1, memory_components=",".join(C.CASE_COMPONENTS),
                      min_time_s=0.2)
# full-size presets (sd15, sd2-base, sd21): sd15 is ~20 minutes on 2 CPU cores in fp32 + bf16 (README,
# "Measured here": 1168 s). The pipeline's stages run at the main cases' shapes, which warmed them up already.
_FULL_DEFAULTS = dict(warmup=1, repeats=3, sweep_warmup=0, sweep_repeats=2, pipeline_warmup=0, pipeline_repeats=2,
                      steps=2, resolutions="256,384,512", batch_sizes="1,2,4", batch_resolution=256,
                      memory_scope="main", memory_warmup=0,
                      memory_components="text_encoder,unet,vae_decode,vae_encode,scheduler_step",
                      min_time_s=5.0)  # the text encoder (~0.15 s a call) then gets ~15 rounds, not 3
PRESET_DEFAULTS = {name: _TINY_DEFAULTS if name in TINY_PRESETS else _FULL_DEFAULTS for name in PRESETS}


class BenchSettingsError(ValueError):
    """A bench setting is out of range or unknown (the CLI: exit 2)."""


def _names(text: str, known, what: str, open_ended: bool = False) -> tuple[str, ...]:
    return names_list(text, known, what, BenchSettingsError, open_ended)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchSettingsError(f"--{what} must be a comma list of integers, got {text!r}") from None
    if not values:
        raise BenchSettingsError(f"--{what} is empty")
    return values


def _resolution(r: int, what: str) -> int:
    if r <= 0 or r % 8:
        raise BenchSettingsError(f"{what} {r} is not a positive multiple of 8")
    return r


def _positive(v: int, what: str, zero_ok: bool = False) -> int:
    if v < 0 or (v == 0 and not zero_ok):
        raise BenchSettingsError(f"{what} must be {'>= 0' if zero_ok else '>= 1'}, got {v}")
    return v


@dataclass(frozen=True)
class BenchSettings:
    preset: str
    model: str | None
    components: tuple[str, ...]
    impls: tuple[str, ...]  # built-in impls (cases.IMPLS) and any candidate name (parity.candidates)
    dtypes: tuple[str, ...]
    device: str
    resolution: int
    images: int
    resolutions: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    batch_resolution: int
    sweep_components: tuple[str, ...]
    warmup: int
    repeats: int
    min_time_s: float
    sweep_warmup: int
    sweep_repeats: int
    pipeline_warmup: int
    pipeline_repeats: int
    steps: int
    scheduler: str
    memory: str
    memory_warmup: int
    memory_components: tuple[str, ...]
    memory_scope: str
    max_call_s: float
    threads: int | None
    seed: int
    out: str | None

    @classmethod
    def make(cls, preset: str = "tiny", model=None, components=",".join(C.CASE_COMPONENTS),
             impls="scratch,diffusers", dtypes="fp32,bf16,fp16", device="cpu", resolution=None, images=1,
             resolutions=None, batch_sizes=None, batch_resolution=None, sweep_components="unet", warmup=None,
             repeats=None, min_time_s=None, sweep_warmup=None, sweep_repeats=None, pipeline_warmup=None,
             pipeline_repeats=None, steps=None, scheduler="ddim", memory="subprocess", memory_warmup=None,
             memory_components=None, memory_scope=None, max_call_s=30.0, threads=None, seed=0,
             out=None) -> "BenchSettings":
        from scratch_sd.config import preset as make_preset
        from scratch_sd.pipeline import PIPELINE_SCHEDULERS

        if preset not in PRESET_DEFAULTS:
            raise BenchSettingsError(f"unknown preset {preset!r}; known: {', '.join(PRESET_DEFAULTS)}")
        if device not in ("cpu", "cuda"):
            raise BenchSettingsError(f"unknown device {device!r}; known: cpu, cuda")
        d = PRESET_DEFAULTS["sd15" if model is not None else preset]  # a local model: full-size defaults
        cfg = make_preset(preset) if model is None else None
        v = dict(preset=preset, model=model, device=device, scheduler=scheduler, memory=memory, seed=seed, out=out)
        v["components"] = _names(components, C.CASE_COMPONENTS, "components")
        v["impls"] = _names(impls, C.IMPLS, "impls", open_ended=True)
        v["dtypes"] = tuple(sorted(_names(dtypes, C.DTYPE_ORDER, "dtypes"), key=C.DTYPE_ORDER.index))
        v["sweep_components"] = _names(sweep_components, C.CASE_COMPONENTS, "sweep-components")
        default_res = cfg.image_size if cfg is not None else 512
        v["resolution"] = _resolution(default_res if resolution is None else resolution, "--resolution")
        v["resolutions"] = tuple(_resolution(r, "--resolutions value")
                                 for r in _ints(resolutions or d["resolutions"], "resolutions"))
        v["batch_sizes"] = tuple(_positive(b, "--batch-sizes value")
                                 for b in _ints(batch_sizes or d["batch_sizes"], "batch-sizes"))
        v["batch_resolution"] = _resolution(d["batch_resolution"] if batch_resolution is None else batch_resolution,
                                            "--batch-resolution")
        v["images"] = _positive(images, "--images")
        given = dict(warmup=warmup, repeats=repeats, sweep_warmup=sweep_warmup, sweep_repeats=sweep_repeats,
                     pipeline_warmup=pipeline_warmup, pipeline_repeats=pipeline_repeats, steps=steps,
                     memory_warmup=memory_warmup)
        for name, value in given.items():
            v[name] = _positive(d[name] if value is None else value, f"--{name.replace('_', '-')}",
                                zero_ok=name.endswith("warmup"))
        v["min_time_s"] = d["min_time_s"] if min_time_s is None else min_time_s
        if not v["min_time_s"] >= 0 or v["min_time_s"] == float("inf"):
            raise BenchSettingsError(f"--min-time-s must be a finite number >= 0, got {min_time_s}")
        if not (max_call_s > 0 and max_call_s != float("inf")):
            raise BenchSettingsError(f"--max-call-s must be a finite number > 0, got {max_call_s}")
        v["max_call_s"] = max_call_s
        v["memory_scope"] = memory_scope or d["memory_scope"]
        if v["memory_scope"] not in ("main", "all"):
            raise BenchSettingsError(f"unknown memory scope {memory_scope!r}; known: main, all")
        if memory not in ("subprocess", "none"):
            raise BenchSettingsError(f"unknown memory method {memory!r}; known: subprocess, none")
        v["memory_components"] = _names(memory_components or d["memory_components"], C.CASE_COMPONENTS,
                                        "memory-components")
        v["threads"] = None if threads is None else _positive(threads, "--threads")
        if scheduler not in PIPELINE_SCHEDULERS:
            raise BenchSettingsError(f"unknown scheduler {scheduler!r}; known: {', '.join(PIPELINE_SCHEDULERS)}")
        if model is not None and not Path(model).exists():
            raise FileNotFoundError(2, "No such model", str(model))
        return cls(**v)


def plan_cases(s: BenchSettings) -> list[C.Case]:
    """Main cases (every component at the main size) plus the sweeps, one Case per distinct size."""
    cases: dict[tuple, C.Case] = {}

    def add(component, dtype, images, res, tag):
        res = 0 if component == "text_encoder" else res  # no image size: one case per batch
        case = C.Case(component, dtype, images, res, (tag,))
        if case.key in cases:
            old = cases[case.key]
            case = C.Case(component, dtype, images, res, tuple(dict.fromkeys(old.sweeps + (tag,))))
        cases[case.key] = case

    for dtype in s.dtypes:
        for comp in s.components:
            add(comp, dtype, s.images, s.resolution, "main")
        for comp in (c for c in s.sweep_components if c in s.components):
            if comp == "text_encoder":
                continue  # no resolution; its batch sweep below still applies
            for res in s.resolutions:
                add(comp, dtype, s.images, res, "resolution")
        for comp in (c for c in s.sweep_components if c in s.components):
            for b in s.batch_sizes:
                add(comp, dtype, b, s.batch_resolution, "batch")
    return list(cases.values())
