"""The parity gate: every candidate against diffusers, component by component.

    settings = GateSettings.make(preset="tiny", dtypes=("fp32", "bf16"), candidates=("scratch",))
    result = run_gate(settings, progress=print)
    result.failed        # the failing gating rows; result.rows has all of them (parity.rows.Row)

For each precision (fp32 first: it is the truth) and each candidate:
1. direct network checks (parity.network_check): each network the candidate builds against its
   reference on the same weights and inputs (several seeds; UNet at timesteps across 0..999; VAE
   encode and decode);
2. scheduler checks (our own schedulers, the scratch candidates): timesteps/sigmas and full
   sampling loops against diffusers (fp32);
3. the swap matrix (parity.swap_check): diffusers' pipeline with one candidate component swapped in
   at a time, and all of them, txt2img and img2img, every traced tensor compared with the
   all-diffusers baseline at the same precision (and, for fp16/bf16, both with the fp32 baseline);
4. the scratch pipeline end to end against diffusers' pipeline (component `pipeline`, scratch
   candidates);
5. (asked by name) the training step (component `train`, scratch candidates).
Library code: typed settings in, rows out; the command line (sdparity.check) writes the reports.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from parity import candidates as cands
from parity.lowp import Pool
from parity.pipelines import MODES
from parity.rows import Row
from parity.tolerances import Table, judge
from scratch_sd.config import TINY_PRESETS
from scratch_sd.names import DTYPES, NETWORKS

DEFAULT_COMPONENTS = NETWORKS + ("scheduler", "pipeline", "tokenizer")  # `all`; train is asked by name
GATE_COMPONENTS = DEFAULT_COMPONENTS + ("train",)
SCRATCH_FAMILY = ("scratch", "scratch-exact")


class SettingsError(ValueError):
    """A gate setting is out of range or unknown (the CLI: exit 2)."""


def names_list(value, allowed, what: str, error: type[Exception] | None = None,
               open_ended: bool = False) -> tuple[str, ...]:
    """A comma string or a sequence of names, each one of `allowed` (any name when `open_ended`),
    duplicates dropped; `error` (default SettingsError) names the first bad one."""
    error = error or SettingsError
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v]
    if not items:
        raise error(f"--{what} is empty")
    bad = [v for v in items if v not in allowed and not open_ended]
    if bad:
        raise error(f"unknown {what.rstrip('s')} {bad[0]!r}; known: {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class GateSettings:
    preset: str = "tiny"
    model: Path | None = None
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    dtypes: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    schedulers: tuple[str, ...] = ("pndm",)
    steps: int = 4
    size: int = 64
    seed: int = 0
    num_seeds: int = 2
    modes: tuple[str, ...] = MODES
    candidates: tuple[str, ...] = ("scratch",)
    informational: tuple[str, ...] = ()  # candidates reported but never failing the run
    tolerances: Path | None = None
    clip_skip: int | None = None  # diffusers' clip_skip in every pipeline run (None: the last layer)
    prediction_type: str | None = None  # a --model single file's (None: its metadata, else diffusers' rule)

    @classmethod
    def make(cls, preset: str = "tiny", model=None, components="all", dtypes="fp32", device: str = "cpu",
             scheduler: str = "pndm", steps: int | None = None, size: int | None = None, seed: int = 0,
             num_seeds: int = 2, modes="txt2img,img2img", candidates="scratch", informational=(),
             tolerances=None, clip_skip: int | None = None, prediction_type: str | None = None) -> "GateSettings":
        """Checked settings from user-level values; every bad value is a SettingsError naming it."""
        from parity.references import check_prediction_type
        from parity.trace import STRENGTH
        from scratch_sd.config import PREDICTION_TYPES, PRESETS
        from scratch_sd.schedulers import SCHEDULERS
        from scratch_sd.pipeline import PIPELINE_SCHEDULERS

        if preset not in PRESETS:
            raise SettingsError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        if model is not None and not Path(model).exists():
            raise SettingsError(f"--model path does not exist: {model}")
        comps = DEFAULT_COMPONENTS if components == "all" else names_list(components, GATE_COMPONENTS, "components")
        dts = tuple(sorted(names_list(dtypes, tuple(DTYPES), "dtypes"), key=list(DTYPES).index))
        if device not in ("cpu", "cuda"):
            raise SettingsError(f"unknown device {device!r}; known: cpu, cuda")
        if device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("--device cuda: no CUDA device is available to this torch build")
        if scheduler == "all":
            scheds = tuple(PIPELINE_SCHEDULERS)
        elif scheduler not in SCHEDULERS:
            raise SettingsError(f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}, all")
        elif scheduler not in PIPELINE_SCHEDULERS:
            raise SettingsError(f"scheduler {scheduler!r} does not drive StableDiffusionPipeline; "
                                f"use one of {', '.join(PIPELINE_SCHEDULERS)}")
        else:
            scheds = (scheduler,)
        big = preset not in TINY_PRESETS or model is not None
        steps = steps if steps is not None else (2 if big else 4)
        size = size if size is not None else (256 if big else 64)
        for name, v, lo in (("steps", steps, 1), ("num-seeds", num_seeds, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise SettingsError(f"--{name} must be >= {lo} (an integer; got {v!r})")
        if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
            raise SettingsError(f"--size must be a positive multiple of 8 (got {size!r})")
        md = names_list(modes, MODES, "modes")
        if "img2img" in md and int(steps * STRENGTH) < 1:
            raise SettingsError(f"--steps {steps} leaves img2img (strength {STRENGTH}) no denoising step; "
                                "use --steps >= 2 or --modes txt2img")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise SettingsError(f"unknown prediction type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")
        check_prediction_type(preset, model, prediction_type, SettingsError)
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1):
            raise SettingsError(f"--clip-skip must be an integer >= 1 (got {clip_skip!r})")
        cand = tuple(dict.fromkeys(c.strip() for c in (candidates.split(",") if isinstance(candidates, str)
                                                       else candidates) if c.strip()))
        if not cand:
            raise SettingsError("--candidates is empty")
        info = tuple(informational.split(",") if isinstance(informational, str) else informational)
        unknown = [c for c in info if c and c not in cand]
        if unknown:
            raise SettingsError(f"--informational {unknown[0]!r} is not one of --candidates ({', '.join(cand)})")
        return cls(preset, Path(model) if model is not None else None, comps, dts, device, scheds, steps, size,
                   seed, num_seeds, md, cand, tuple(c for c in info if c), Path(tolerances) if tolerances else None,
                   clip_skip, prediction_type)

    @property
    def needs_networks(self) -> bool:
        return bool(set(self.components) - {"train", "tokenizer"})


# --------------------------------------------------------------------------- rows
@dataclass
class Gated:
    """One candidate as the gate runs it."""

    name: str
    candidate: object
    gating: bool = True
    profile_override: str = ""  # a golden record's cross-device/version profile (check --against --profile)

    @property
    def profile(self) -> str:
        return self.profile_override or getattr(self.candidate, "profile", "exact")

    @property
    def net_mode(self) -> str:
        return getattr(self.candidate, "net_mode", "")

    @property
    def scratch_family(self) -> bool:
        return self.name in SCRATCH_FAMILY

    def provides(self, component: str) -> bool:
        return component in self.candidate.components


@dataclass
class Recorder:
    run_id: str
    preset: str
    device: str
    table: Table
    reference: str = "live"
    rows: list[Row] = field(default_factory=list)
    images: dict = field(default_factory=dict)  # (candidate, dtype, mode, scheduler) -> {label: image}
    # bf16/fp16 squared errors of the direct network checks for the pooled statistic (parity.lowp; the
    # kind its bars were calibrated on, docs/lowp.md). None: not pooled. run_gate pools.
    lowp: Pool | None = None

    def _identity(self, cand: Gated, component: str, dtype: str, **kw) -> dict:
        return dict(run_id=self.run_id, preset=self.preset, component=component, dtype=dtype, device=self.device,
                    net_mode=cand.net_mode, candidate=cand.name, profile=cand.profile, reference=self.reference,
                    gating=cand.gating, **kw)

    def compare(self, cand: Gated, component: str, dtype: str, tensor: str, ref, out, truth=None, *,
                mode="direct", case="", step=None, scheduler="") -> Row:
        if cand.profile == "exact":
            tol = self.table.lookup(component, tensor, dtype)
            values = judge(ref, out, tol, dtype, truth).fields(dtype)
            if self.lowp is not None and mode == "direct":
                self.lowp.add(cand, component, dtype, tensor, ref, out, truth)
        else:
            values = self.table.judge_profile(cand.profile, component, tensor, ref, out)
        row = Row(**self._identity(cand, component, dtype, scheduler=scheduler, step="" if step is None else step,
                                   tensor=tensor, shape="x".join(map(str, out.shape)), mode=mode, case=case,
                                   status="compared"), **values)
        self.rows.append(row)
        return row

    def skip(self, cand: Gated, component: str, dtype: str, reason: str, mode="", scheduler="") -> None:
        self.rows.append(Row(**self._identity(cand, component, dtype, scheduler=scheduler, mode=mode, passed=True,
                                              status="skipped", reason=reason)))

    def add(self, cand: Gated, d: dict, **overrides) -> Row:
        """A row another check made as a plain dict (scheduler, training), with this run's identity."""
        row = Row.from_dict({**d, **overrides})
        row.run_id, row.candidate, row.profile, row.reference, row.gating = (  # these checks compare live
            self.run_id, cand.name, cand.profile, "live", cand.gating)
        row.net_mode = row.net_mode or cand.net_mode
        row.preset = row.preset or self.preset
        self.rows.append(row)
        return row


@dataclass
class GateResult:
    settings: GateSettings
    rows: list[Row]
    images: dict
    run_id: str
    preset_label: str
    source: str
    elapsed_s: float
    notes: list[str] = field(default_factory=list)  # the references' and the candidates' notes

    @property
    def compared(self) -> list[Row]:
        return [r for r in self.rows if r.compared]

    @property
    def failed(self) -> list[Row]:
        """Failing rows of gating candidates: what makes the run fail."""
        return [r for r in self.rows if r.failed and r.gating]


# --------------------------------------------------------------------------- the run
def cpu_cannot(dtype: str, device: str, preset_name: str) -> str | None:
    if device == "cpu" and dtype == "fp16" and preset_name not in TINY_PRESETS:
        return ("fp16 at full size is a GPU case: this CPU runs fp16 matmuls at ~1-2 GFLOP/s "
                "(a UNet step ~55x slower than fp32); run it with --device cuda")
    return None


def load_candidates(settings: GateSettings) -> list[Gated]:
    """Every candidate loaded before any work (a bad one: CandidateError naming it)."""
    out = []
    for name in settings.candidates:
        c = cands.load(name)
        out.append(Gated(name, c, gating=name not in settings.informational))
    return out


def run_gate(settings: GateSettings, progress: Callable[[str], None] | None = None,
             references=None, record=None) -> GateResult:
    """Run the gate; `references` (parity.references.References) replaces building them; `record`
    (parity.record.Record) replaces diffusers' outputs with a golden record's."""
    from parity import network_check, swap_check, tokenizer_check
    from parity.references import quiet_libraries, references_for
    from parity.run_context import GateRun

    say = progress or (lambda _m: None)
    t0 = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S")
    table = Table.load(settings.tolerances)
    gated = load_candidates(settings)
    for g in gated:
        g.profile_override = record.profile if record is not None else ""
    for g in gated:  # a lossy candidate names a profile the table must have
        if g.profile != "exact" and g.profile not in table.profiles:
            raise cands.CandidateError(f"candidate {g.name!r}: its profile {g.profile!r} is not in {table.source} "
                                       f"(profiles: exact{''.join(', ' + p for p in table.profiles)})")
    quiet_libraries()
    refs = references
    if refs is None and settings.needs_networks:  # the swap matrix needs all three networks
        say(f"building {settings.model or settings.preset} references ({', '.join(NETWORKS)})")
        refs = references_for(settings)
    if refs and settings.clip_skip is not None and settings.clip_skip > refs.cfg.text.layers:
        # diffusers indexes hidden_states[-(n + 1)]: n == layers is the embeddings themselves
        raise SettingsError(f"--clip-skip {settings.clip_skip} is beyond the {refs.cfg.text.layers}-layer text "
                            f"encoder (at most {refs.cfg.text.layers})")
    preset_name = refs.cfg.name if refs else settings.preset
    label = preset_name if settings.model is None else f"model:{Path(settings.model).name}"
    rec = Recorder(run_id, label, settings.device, table, reference=record.reference if record else "live",
                   lowp=Pool())
    notes = list(refs.notes) if refs else []
    if record is not None and refs is not None:
        record.verify(refs)
        notes.insert(0, record.provenance())
    for g in gated:
        reason = g.candidate.unavailable()
        if reason:
            notes.append(f"{g.name}: unavailable: {reason}")
    run = GateRun(settings, refs, rec, say)
    run.record = record
    if refs and any(d != "fp32" for d in settings.dtypes) and "fp32" not in settings.dtypes:
        network_check.reference_truths(run)  # low precision is judged against the fp32 reference
    for g in gated:  # integer ids: once per run, whatever the dtypes
        tokenizer_check.check_tokenizer(run, g)
    for dtype in settings.dtypes:  # DTYPES order: fp32 first
        for g in gated:
            reason = cpu_cannot(dtype, settings.device, preset_name) or g.candidate.unavailable()
            if reason:
                for c in settings.components:
                    if g.provides(c) or c in ("pipeline", "train"):
                        rec.skip(g, c, dtype, reason)
                continue
            if refs is not None:
                with run.candidate_at(g, dtype) as built:
                    notes += [f"{g.name} {n}: {b.notes}" for n, b in built.items() if b.notes and dtype == "fp32"]
                    network_check.check_networks(run, g, built, dtype)
                    if "scheduler" in settings.components and g.scratch_family:
                        network_check.check_schedulers(run, g, dtype)
                    swap_check.check_swaps(run, g, built, dtype)
                    swap_check.check_scratch_pipeline(run, g, built, dtype)
            network_check.check_training(run, g, dtype)
        rec.rows += rec.lowp.rows(rec, dtype)  # the pooled low-precision rows of this dtype (none at fp32)
        run.drop(dtype)
    return GateResult(settings, rec.rows, rec.images, run_id, label, refs.source if refs else f"preset:{preset_name}",
                      time.time() - t0, list(dict.fromkeys(notes)))
