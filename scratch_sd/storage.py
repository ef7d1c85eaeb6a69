"""Strict checkpoint I/O: safetensors first; pickles only through torch.load(weights_only=True).

Every failure is a `CheckpointError` with a one-line reason naming the file. Saving
writes to a temporary file in the same folder and renames it at the end, so a
failure never leaves a half-written file behind; temporaries are named
`.<name>.sdparity-tmp-<pid>...` so that a later writer can remove those of a killed one
(parity.outputs.remove_stale).

Reading refuses what would poison a run later: tensors holding NaN or inf (named, with
their counts), and files we wrote whose tensors no longer hash to the `sd_parity_sha256`
our writer put in the metadata (a bit flip; files without it still load).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
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


TMP_TAG = ".sdparity-tmp-"  # temporaries: `.<final name>.sdparity-tmp-<writer pid>...`
HASH_METADATA = "sd_parity_sha256"  # safetensors metadata: sha256 of the tensors (tensors_hash)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not hold what was expected."""


def temp_pid(name: str) -> int | None:
    """The writer's process id in a temporary's file name (None: not one of our temporaries)."""
    m = re.match(r"\..*?" + re.escape(TMP_TAG) + r"(\d+)", name)
    return int(m.group(1)) if m else None


def tensors_hash(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name) and the other
    metadata entries: what a file's header and data say, independent of their layout."""
    h = hashlib.sha256()
    for key in sorted(metadata or {}):
        if key != HASH_METADATA:
            h.update(json.dumps([key, metadata[key]]).encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def check_finite(state: Mapping[str, torch.Tensor], source: str) -> None:
    """A CheckpointError naming the tensors that hold NaN or inf, with the counts."""
    bad = []
    for name, t in state.items():
        if t.is_floating_point() or t.is_complex():
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                nan = int(torch.isnan(t).sum())
                bad.append((name, nan, int((~finite).sum()) - nan, t.numel()))
    if bad:
        name, nan, inf, n = bad[0]
        more = f"; {len(bad) - 1} more tensors hold non-finite values" if len(bad) > 1 else ""
        raise CheckpointError(f"{source}: tensor {name!r} holds non-finite values ({nan} NaN, {inf} inf of "
                              f"{n}){more}")


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


def load_state_dict(path: str | os.PathLike, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Load a flat name -> tensor mapping from .safetensors, or a pickle with weights_only=True.
    Refused: NaN/inf tensors (unless `allow_nonfinite`), and a safetensors file whose tensors do not
    match the sd_parity_sha256 in its metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such checkpoint file", str(path))
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS:
        meta = _safetensors_header(path).get("__metadata__") or {}
        from safetensors.torch import load_file

        try:
            state = dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors ({_short(exc)})") from None
        if HASH_METADATA in meta and tensors_hash(state, meta) != meta[HASH_METADATA]:
            raise CheckpointError(f"{path}: its tensors do not match the {HASH_METADATA} our writer recorded "
                                  "(the file was changed or damaged after it was written)")
    elif suffix in PICKLES:
        state = _load_pickle(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint format {suffix!r} (expected .safetensors, .ckpt, .bin, "
                              ".pt)")
    if not allow_nonfinite:
        check_finite(state, str(path))
    return state


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    import warnings

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says enough
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        raise CheckpointError(f"{path}: {_pickle_refusal(exc)}") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise CheckpointError(f"{path}: does not hold a flat mapping of names to tensors")
    return dict(obj)


def _pickle_refusal(exc: BaseException) -> str:
    """torch.load(weights_only=True)'s failure in one line: the refused global when it names one."""
    text = str(exc)
    m = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if m:
        return (f"refused or unreadable pickle: refused the global {m.group(1)}, which torch.load(weights_only=True) "
                "does not rebuild (only tensors and plain containers load)")
    m = re.search(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked", text)
    if m:
        return (f"refused or unreadable pickle: refused the global {m.group(1)} (module {m.group(2)} is blocked by "
                "torch.load(weights_only=True))")
    if "Weights only load failed" in text:  # keep torch's reason, drop its boilerplate paragraphs
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        reason = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation"))]
        return (f"refused or unreadable pickle: refused by torch.load(weights_only=True) "
                f"({_short(Exception(' '.join(reason).replace('WeightsUnpickler error:', '')))})")
    return f"refused or unreadable pickle ({_short(exc)})"


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
    """Yield a temporary path beside `final` (named with our pid, see TMP_TAG); rename it onto
    `final` only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}{TMP_TAG}{os.getpid()}-", suffix=suffix or ".tmp",
                               dir=final.parent)
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
    """Write safetensors atomically (contiguous, non-shared copies), with the tensors' sha256 in
    the metadata (`sd_parity_sha256`, checked by load_state_dict)."""
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
    metadata = {k: v for k, v in (metadata or {}).items() if k != HASH_METADATA}
    metadata[HASH_METADATA] = tensors_hash(tensors, metadata)
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path
