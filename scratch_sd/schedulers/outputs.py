"""What `step` returns: dataclasses that are also ordered dicts of their non-None fields, as diffusers'
`BaseOutput` (attribute, index and key access, `keys()`, `to_tuple()`), with diffusers' field names."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch


class BaseOutput(OrderedDict):
    """diffusers' BaseOutput: a dataclass that is also an ordered dict of its non-None fields, so
    `out.prev_sample`, `out[0]`, `out["prev_sample"]`, `out.keys()` and `out.to_tuple()` all work."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                self[f.name] = value

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict(self.items())[key]
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def _frozen(self, *args, **kwargs):
        raise Exception(f"You cannot use ``{type(self).__name__}`` as a mutable mapping; set the attribute instead.")

    __delitem__ = setdefault = pop = update = _frozen

    def __reduce__(self):
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self) -> tuple:
        """The non-None fields in declaration order (what `return_dict=False` returns)."""
        return tuple(self[k] for k in self.keys())


@dataclass
class SchedulerOutput(BaseOutput):
    """diffusers' SchedulerOutput (PNDM, DPM-Solver, the VE-SDE corrector): `prev_sample` only."""

    prev_sample: torch.Tensor


@dataclass
class PredX0SchedulerOutput(BaseOutput):
    """diffusers' DDPM/DDIM/Euler/Euler-ancestral/LMS outputs: x_{t-1} and the predicted x_0."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# diffusers' per-scheduler names for the same two fields
DDPMSchedulerOutput = DDIMSchedulerOutput = LMSDiscreteSchedulerOutput = PredX0SchedulerOutput
EulerDiscreteSchedulerOutput = EulerAncestralDiscreteSchedulerOutput = PredX0SchedulerOutput


@dataclass
class SdeVeOutput(BaseOutput):
    """VE-SDE predictor output: the sample with noise (`prev_sample`) and without it (`prev_sample_mean`)."""

    prev_sample: torch.Tensor
    prev_sample_mean: torch.Tensor
