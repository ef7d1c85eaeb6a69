"""Candidates by name: built-ins, installed plug-ins (entry points), or `package.module:factory`.

    load("scratch")                      # a built-in (BUILTIN below)
    load("handmade-attention")           # an installed package's entry point in group sd_parity.candidates
    load("my_pkg.cands:make_unet")       # any importable factory in the current environment

A factory is a callable with no required arguments returning a Candidate (base.py), or the
Candidate itself (an object or a class with a no-argument constructor).
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass

from parity.candidates.base import (BuildRequest, Built, Candidate, CandidateBase, CandidateError,
                                    module_tap)
from scratch_sd.names import NETWORKS

ENTRY_POINT_GROUP = "sd_parity.candidates"
BUILTIN = {  # name -> "module:factory"
    "scratch": "parity.candidates.scratch:fast",
    "scratch-exact": "parity.candidates.scratch:exact",
    "diffusers": "parity.candidates.reference:candidate",
    "compiled": "parity.candidates.compiled:candidate",
    "onnxruntime": "parity.candidates.onnxrt:candidate",
    "int8": "parity.candidates.int8:candidate",
}
KNOWN_COMPONENTS = NETWORKS + ("scheduler",)


@dataclass(frozen=True)
class Listed:
    name: str
    source: str  # "built-in", "entry point (dist x.y)", or the import path
    components: tuple[str, ...]
    profile: str
    unavailable: str | None  # why it cannot run here, or None


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _import(spec: str, label: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CandidateError(f"candidate {label!r}: expected a name ({', '.join(BUILTIN)}), an installed "
                             f"entry point, or package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's input
        raise CandidateError(f"candidate {label!r}: cannot import {module_name} "
                             f"({type(exc).__name__}: {_one_line(exc)})") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise CandidateError(f"candidate {label!r}: {module_name} has no attribute {attr!r}") from None
    return obj


def _instantiate(factory, label: str) -> Candidate:
    obj = factory
    if isinstance(factory, type) or (callable(factory) and not _looks_like_candidate(factory)):
        try:
            obj = factory()
        except Exception as exc:  # noqa: BLE001 - a factory that raises is bad input
            raise CandidateError(f"candidate {label!r}: its factory raised {type(exc).__name__}: "
                                 f"{_one_line(exc)}") from None
    return validate(obj, label)


def _looks_like_candidate(obj) -> bool:
    return all(hasattr(obj, a) for a in ("name", "components", "build"))


def validate(obj, label: str) -> Candidate:
    """The protocol's required parts, checked up front with the problem named."""
    if not _looks_like_candidate(obj):
        missing = [a for a in ("name", "components", "build") if not hasattr(obj, a)]
        raise CandidateError(f"candidate {label!r}: {type(obj).__name__} is not a candidate (lacks "
                             f"{', '.join(missing)})")
    comps = tuple(obj.components)
    bad = [c for c in comps if c not in KNOWN_COMPONENTS]
    if not comps or bad:
        raise CandidateError(f"candidate {label!r}: components must be a non-empty subset of "
                             f"{', '.join(KNOWN_COMPONENTS)}, got {comps!r}")
    if "scheduler" in comps and not callable(getattr(obj, "scheduler", None)):
        raise CandidateError(f"candidate {label!r}: provides a scheduler but has no scheduler(name, config)")
    for attr, default in (("profile", "exact"), ("unavailable", None), ("supports", None)):
        if not hasattr(obj, attr):
            setattr(obj, attr, default if attr == "profile" else getattr(CandidateBase, attr).__get__(obj))
    return obj


def load(spec: str) -> Candidate:
    """A candidate by built-in name, entry-point name, or `package.module:factory`."""
    if spec in BUILTIN:
        return _instantiate(_import(BUILTIN[spec], spec), spec)
    eps = _entry_points()
    if spec in eps:
        try:
            factory = eps[spec].load()
        except Exception as exc:  # noqa: BLE001
            raise CandidateError(f"candidate {spec!r}: its entry point {eps[spec].value} does not load "
                                 f"({type(exc).__name__}: {_one_line(exc)})") from None
        return _instantiate(factory, spec)
    if ":" not in spec:
        known = sorted(set(BUILTIN) | set(eps))
        raise CandidateError(f"unknown candidate {spec!r}; known: {', '.join(known)} (or package.module:factory)")
    return _instantiate(_import(spec, spec), spec)


def listing() -> list[Listed]:
    """Every built-in and installed candidate, with why one cannot run here."""
    out = []
    eps = _entry_points()
    for name in list(BUILTIN) + sorted(set(eps) - set(BUILTIN)):
        source = "built-in" if name in BUILTIN else f"entry point {eps[name].value}" + (
            f" ({eps[name].dist.name} {eps[name].dist.version})" if getattr(eps[name], "dist", None) else "")
        try:
            cand = load(name)
        except CandidateError as exc:
            out.append(Listed(name, source, (), "", str(exc)))
            continue
        out.append(Listed(cand.name, source, tuple(cand.components), cand.profile, cand.unavailable()))
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())


__all__ = ["BuildRequest", "Built", "Candidate", "CandidateBase", "CandidateError", "module_tap", "load",
           "listing", "validate", "BUILTIN", "ENTRY_POINT_GROUP", "Listed"]
