"""Where a command writes: one rule for every output, checked before any work, written whole.

- `check_target(path, kind)`: before work. The right kind (a folder or a file), not there already
  unless `force` (an empty folder counts as not there), and its parent creatable and writable (a
  probe file is created and removed in the nearest existing folder). Errors name the option as the
  user typed it.
- `writing_dir(path)` / `writing_file(path)`: the output is written into a temporary sibling named
  `.<name>.sdparity-tmp-<pid>` and moved into place at the end, so an interrupted run (SIGINT, or
  SIGKILL) leaves nothing at `path`. If the target appeared meanwhile (a concurrent writer won),
  the move refuses: exactly one writer wins, the other gets an OutputError. `force` replaces an
  existing target.
- Stale temporaries (their writer's process is gone) beside the target are removed by the next
  writer, which says so in one line on stderr.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from scratch_sd.storage import TMP_TAG, temp_pid


class OutputError(ValueError):
    """An output location that cannot be written as asked (the CLI: exit 2)."""


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_target(path: str | os.PathLike, kind: str, force: bool = False, option: str = "--out") -> Path:
    """Validate an output location before any work; returns it as a Path."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    p = Path(path)
    shown = f"{option} {str(path)!r}"
    if p.exists() or p.is_symlink():
        if kind == "dir" and not p.is_dir():
            raise OutputError(f"{shown} is a file; this command writes a folder there")
        if kind == "file" and p.is_dir():
            raise OutputError(f"{shown} is a folder; this command writes a file there")
        empty_dir = kind == "dir" and p.is_dir() and not p.is_symlink() and not any(p.iterdir())
        if not force and not empty_dir:
            raise OutputError(f"{shown} exists; pass --force to replace it")
    base = _first_existing(p.parent if str(p.parent) else Path("."))
    if not base.is_dir():
        raise OutputError(f"{shown}: {base} is a file, so the folder for it cannot be made")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: {base} is not writable")
    try:  # os.access is not the whole truth (root, read-only mounts, /proc): try it
        fd, probe = tempfile.mkstemp(prefix=f".sdparity-probe-{os.getpid()}-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{shown}: cannot create files in {base} ({exc.strerror or type(exc).__name__})") from None
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path, say=None) -> list[Path]:
    """Remove temporaries of `target` whose writer process is gone; returns what was removed."""
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        return []
    removed = []
    prefix = f"{target.name}{TMP_TAG}"  # ours, and the temporaries of writers nested in ours (more dots)
    for p in parent.iterdir():
        pid = temp_pid(p.name)
        if not p.name.lstrip(".").startswith(prefix) or pid is None or pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
        (say or _note)(f"removed {p}, a stale temporary of an interrupted writer (process {pid} is gone)")
    return removed


def _note(text: str) -> None:
    print(f"sdparity: note: {text}", file=sys.stderr)


def temp_sibling(target: Path, suffix: str = "") -> Path:
    return target.parent / f".{target.name}{TMP_TAG}{os.getpid()}{suffix}"


def _appeared(target: Path, option: str) -> OutputError:
    return OutputError(f"{option} {str(target)!r} appeared meanwhile (another writer finished first); "
                       "nothing was replaced")


def _move_dir(tmp: Path, target: Path, force: bool, option: str) -> None:
    if force and target.exists():
        old = temp_sibling(target, ".old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old) if old.is_dir() else old.unlink()
        return
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise _appeared(target, option)
    try:
        os.rename(tmp, target)  # fails on a non-empty folder: the other writer won
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise _appeared(target, option) from None
        raise


@contextlib.contextmanager
def writing_dir(path: str | os.PathLike, force: bool = False, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `path` (see the module docstring)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = temp_sibling(target)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _move_dir(tmp, target, force, option)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def writing_file(path: str | os.PathLike, force: bool = False, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary file path; on success it becomes `path`: created exclusively (a hard link,
    which fails if the target appeared meanwhile), or replaced with `force`."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = temp_sibling(target, target.suffix)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {target}")
        os.chmod(tmp, 0o666 & ~_umask())
        if force:
            os.replace(tmp, target)
        else:
            _create_exclusive(tmp, target, option)
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusive(tmp: Path, target: Path, option: str) -> None:
    """`tmp` becomes `target` only if nothing is there: a hard link (atomic, fails on an existing
    name); where the file system has no hard links, an O_EXCL placeholder claims the name first."""
    try:
        os.link(tmp, target)
        return
    except FileExistsError:
        raise _appeared(target, option) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
    try:
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        raise _appeared(target, option) from None
    os.replace(tmp, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
