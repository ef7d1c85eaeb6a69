"""Weight conversion as data: a key table plus a few named transforms.

A `KeyTable` is a list of `Entry(theirs, ours, transform)`: one or more keys of a
foreign state dict (diffusers / transformers / original LDM) and the scratch key
they become. Tables are built by small rules over block indices in each network's
converter module; this file only applies them, strictly:

- every key on the input side must be consumed (extra keys are named),
- every key on the output side must be produced (missing keys are named),
- every produced tensor must have the shape the target model expects (named).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

Tensor = torch.Tensor


class ConversionError(ValueError):
    """A state dict does not match the key table (missing, extra or mis-shaped tensors)."""


def _cat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)


def _split(t: Tensor, n: int) -> list[Tensor]:
    if t.shape[0] % n:
        raise ConversionError(f"cannot split a tensor of shape {tuple(t.shape)} into {n} equal parts")
    return [p.clone() for p in t.chunk(n, dim=0)]


def _conv1x1_to_linear(parts: list[Tensor]) -> Tensor:
    (t,) = parts
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim == 4 else t


def _linear_to_conv1x1(t: Tensor, n: int) -> list[Tensor]:
    return [t.reshape(*t.shape, 1, 1) if t.ndim == 2 else t]


def _copy(parts: list[Tensor]) -> Tensor:
    (t,) = parts
    return t


def _uncopy(t: Tensor, n: int) -> list[Tensor]:
    return [t]


def _cat_conv1x1(parts: list[Tensor]) -> Tensor:
    return torch.cat([_conv1x1_to_linear([p]) for p in parts], dim=0)


def _split_conv1x1(t: Tensor, n: int) -> list[Tensor]:
    return [_linear_to_conv1x1(p, 1)[0] for p in _split(t, n)]


# name -> (theirs -> ours, ours -> theirs)
TRANSFORMS: dict[str, tuple[Callable[[list[Tensor]], Tensor], Callable[[Tensor, int], list[Tensor]]]] = {
    "copy": (_copy, _uncopy),
    "cat": (_cat, _split),  # q/k/v (or k/v) fusion along the output dimension
    "conv1x1_to_linear": (_conv1x1_to_linear, _linear_to_conv1x1),  # LDM VAE attention convs
    "cat_conv1x1": (_cat_conv1x1, _split_conv1x1),  # LDM VAE q/k/v 1x1 convs -> one fused Linear
}
MULTI_KEY = ("cat", "cat_conv1x1")  # transforms that join several keys into one


@dataclass(frozen=True)
class Entry:
    theirs: tuple[str, ...]
    ours: str
    transform: str = "copy"

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}")
        if self.transform not in MULTI_KEY and len(self.theirs) != 1:
            raise ValueError(f"transform {self.transform!r} takes exactly one key, got {self.theirs}")


class KeyTable:
    def __init__(self, entries: Iterable[Entry], theirs_name: str = "reference", ours_name: str = "scratch"):
        self.entries = list(entries)
        self.theirs_name, self.ours_name = theirs_name, ours_name
        ours = [e.ours for e in self.entries]
        theirs = [k for e in self.entries for k in e.theirs]
        for side, keys in ((ours_name, ours), (theirs_name, theirs)):
            dup = sorted({k for k in keys if keys.count(k) > 1}) if len(set(keys)) != len(keys) else []
            if dup:
                raise ValueError(f"key table is not one-to-one: {side} keys used twice: {dup[:5]}")

    def __len__(self) -> int:
        return len(self.entries)

    def ours_keys(self) -> list[str]:
        return [e.ours for e in self.entries]

    def theirs_keys(self) -> list[str]:
        return [k for e in self.entries for k in e.theirs]

    def prefixed(self, theirs_prefix: str = "", ours_prefix: str = "") -> "KeyTable":
        return KeyTable(
            [Entry(tuple(theirs_prefix + k for k in e.theirs), ours_prefix + e.ours, e.transform) for e in self.entries],
            self.theirs_name, self.ours_name)

    def __add__(self, other: "KeyTable") -> "KeyTable":
        return KeyTable(self.entries + other.entries, self.theirs_name, self.ours_name)

    # ---- conversion
    def to_ours(self, state: Mapping[str, Tensor], expected: Mapping[str, torch.Size] | None = None) -> dict[str, Tensor]:
        """Convert their state dict to ours. `expected` (our key -> shape) adds a shape check."""
        check_keys(state, self.theirs_keys(), self.theirs_name)
        out = {e.ours: TRANSFORMS[e.transform][0]([state[k] for k in e.theirs]) for e in self.entries}
        if expected is not None:
            check_shapes(out, expected, self.ours_name)
        return out

    def to_theirs(self, state: Mapping[str, Tensor], expected: Mapping[str, torch.Size] | None = None) -> dict[str, Tensor]:
        """Convert our state dict to theirs. `expected` (their key -> shape) adds a shape check."""
        check_keys(state, self.ours_keys(), self.ours_name)
        out: dict[str, Tensor] = {}
        for e in self.entries:
            for k, t in zip(e.theirs, TRANSFORMS[e.transform][1](state[e.ours], len(e.theirs))):
                out[k] = t
        if expected is not None:
            check_shapes(out, expected, self.theirs_name)
        return out

    def module_pairs(self) -> list[tuple[str, str]]:
        """(our module, their module) for every one-to-one weight, in table order:
        the layers whose outputs can be compared directly (used by the localiser)."""
        pairs: dict[str, str] = {}
        for e in self.entries:
            if e.transform == "copy" and "." in e.ours:
                pairs.setdefault(e.ours.rsplit(".", 1)[0], e.theirs[0].rsplit(".", 1)[0])
        return list(pairs.items())


def _names(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(state: Mapping[str, Tensor], wanted: Iterable[str], side: str) -> None:
    wanted = set(wanted)
    have = set(state)
    missing, extra = wanted - have, have - wanted
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_names(missing)}")
        if extra:
            parts.append(f"{len(extra)} unexpected: {_names(extra)}")
        raise ConversionError(f"{side} state dict does not match: " + "; ".join(parts))


def check_shapes(state: Mapping[str, Tensor], expected: Mapping[str, torch.Size], side: str) -> None:
    check_keys(state, expected.keys(), side)
    bad = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
           for k in expected if tuple(state[k].shape) != tuple(expected[k])]
    if bad:
        raise ConversionError(f"{side} state dict has {len(bad)} mis-shaped tensors: {_names(bad, 4)}")


def shapes_of(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def load_strict(module: torch.nn.Module, state: Mapping[str, Tensor], side: str = "scratch") -> torch.nn.Module:
    """Shape-check against the module and load with strict=True."""
    check_shapes(state, shapes_of(module), side)
    module.load_state_dict(dict(state), strict=True)
    return module
