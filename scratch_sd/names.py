"""The names every layer shares, defined once: precisions and the three networks."""
from __future__ import annotations

import torch

# Precision names as the CLI, the CSVs and the tolerance table spell them. The gate runs them in
# this order (fp32 first: it is the truth the others are judged against).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The three networks of a Stable Diffusion model, in the order the harness builds them.
NETWORKS = ("text_encoder", "vae", "unet")


def dtype_of(name: str) -> torch.dtype:
    """torch dtype of a precision name (ValueError naming the known ones)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"no precision name for {dtype}")
