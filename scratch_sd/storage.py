"""Strict checkpoint I/O: safetensors first; pickles only through torch.load(weights_only=True).

Every failure is a `CheckpointError` with a one-line reason naming the file. Saving
writes to a temporary file in the same folder and renames it at the end, so a
failure never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch

SAFETENSORS = (".safetensors",)
PICKLES = (".ckpt", ".bin", ".pt", ".pth")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a mapping)")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a string mapping)")
            continue
        _check_entry(path, key, info, data_len)
    return header


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: Path, key: str, info, data_len: int) -> None:
    """One tensor's header entry: known dtype, non-negative int shape, [start, end] inside the data
    and exactly as long as the shape and dtype say."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r} "
                              f"(known: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {key!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {key!r} has invalid data_offsets {offsets!r}")
    start, end = offsets
    if not (0 <= start <= end <= data_len):
        raise CheckpointError(f"{path}: tensor {key!r} lies outside the file (truncated?)")
    itemsize = torch.empty((), dtype=SAFETENSORS_DTYPES[dtype]).element_size()
    if math.prod(shape) * itemsize != end - start:
        raise CheckpointError(f"{path}: tensor {key!r} of shape {shape} {dtype} does not fill its "
                              f"{end - start} bytes")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` string mapping of a .safetensors file ({} for pickles or when absent)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such checkpoint file", str(path))
    if path.suffix.lower() not in SAFETENSORS:
        return {}
    meta = _safetensors_header(path).get("__metadata__") or {}
    return dict(meta)


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
        if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in obj.items()):
            raise CheckpointError(f"{path}: does not hold a flat mapping of names to tensors")
        return dict(obj)
    raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} (expected .safetensors, .ckpt, .bin, .pt)")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:160] + "...") if len(text) > 160 else (text or type(exc).__name__)


def set_default_mode(path: str | os.PathLike) -> None:
    """chmod a file (0666) or folder (0777) minus the process umask, as open()/mkdir() would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


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
        if tmp.exists():
            set_default_mode(tmp)  # mkstemp makes the file 0600; the final file gets the usual umask mode
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
