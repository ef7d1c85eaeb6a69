"""Strict checkpoint I/O: safetensors first; pickles only through torch.load(weights_only=True).

Every failure is a `CheckpointError` with a one-line reason naming the file. Saving
writes to a temporary file in the same folder and renames it at the end, so a
failure never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

SAFETENSORS = (".safetensors",)
PICKLES = (".ckpt", ".bin", ".pt", ".pth")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not hold what was expected."""


def _safetensors_header(path: Path) -> dict:
    """Parse and validate the header before handing the file to safetensors."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {len(head)} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a mapping)")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or "dtype" not in info or "data_offsets" not in info or "shape" not in info:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}")
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']!r}")
        start, end = info["data_offsets"]
        if not (0 <= start <= end <= data_len):
            raise CheckpointError(f"{path}: tensor {key!r} lies outside the file (truncated?)")
    return header


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat name -> tensor mapping from .safetensors, or a pickle with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such checkpoint file", str(path))
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        _safetensors_header(path)
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors ({_short(exc)})") from None
    if suffix in PICKLES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
            raise CheckpointError(f"{path}: refused or unreadable pickle ({_short(exc)})") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: does not hold a flat mapping of tensors")
        return dict(obj)
    raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} (expected .safetensors, .ckpt, .bin, .pt)")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:160] + "...") if len(text) > 160 else (text or type(exc).__name__)


@contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix or ".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write safetensors atomically (contiguous, non-shared copies)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS:
        raise CheckpointError(f"{path}: scratch checkpoints are written as .safetensors only")
    tensors, seen = {}, set()
    for k, v in state.items():  # safetensors refuses tensors that share storage: copy repeats
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        tensors[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
