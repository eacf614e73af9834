"""Atomic output: every file and directory is written beside its target and renamed into place.

A killed run therefore leaves either nothing or the previous complete result, never a half-written file that
looks complete. ``os.replace`` is atomic on POSIX when source and target are on the same filesystem, which is
why temporary paths are created in the target's own directory. A non-empty directory cannot be replaced by a
rename, so an existing output folder is swapped with the new one in one step (Linux ``renameat2`` with
``RENAME_EXCHANGE``); only where the kernel or filesystem lacks it are there two renames, with the previous
folder parked beside the target in between.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gzip
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from avss.errors import OutputError


def _process_umask() -> int:
    """The umask, read once at import (``os.umask`` has no getter, and setting it is not thread-safe)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Temporary files and folders are created private (0600/0700); outputs get the permissions a plain
# open()/mkdir() would have given them, so results can be shared like any other file.
UMASK = _process_umask()
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"cannot serialize {type(value).__name__} to JSON")


def to_json(obj: Any) -> str:
    """Serialize to indented JSON, converting tensors, arrays, paths and dataclasses."""
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n"


def ensure_parent_writable(path: Path) -> None:
    """Raise :class:`OutputError` unless ``path`` can be written: its nearest existing ancestor must be a
    writable directory.

    Nothing is created, so a command that checks its ``--out`` first and then fails leaves no trace.
    """
    parent = Path(path).parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output directory {parent}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {existing} is not writable; choose another --out")
    _probe_writable(existing)


def _probe_writable(directory: Path) -> None:
    """Create and remove one private file in ``directory``.

    Permission bits are not enough: root passes ``os.access`` on a read-only filesystem and on special
    filesystems such as ``/proc`` or ``/sys``, where creating a file still fails.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".avss-probe.", dir=directory)
    except OSError as exc:
        raise OutputError(
            f"cannot write in {directory}: {exc.strerror or exc}; choose another --out"
        ) from exc
    os.close(fd)
    os.unlink(probe)


def make_parent(path: Path) -> None:
    """Create ``path``'s parent directories, right before the first write."""
    ensure_parent_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output directory {path.parent}: {exc.strerror or exc}") from exc


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and rename the result onto ``path``; remove the temporary file on failure."""
    path = Path(path)
    make_parent(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"failed to write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"failed to write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON; gzip-compressed (reproducibly: no timestamp) when ``path`` ends in
    ``.gz``, which is how a study keeps thousands of per-example records small enough to commit."""
    if Path(path).suffix == ".gz":
        data = gzip.compress(to_json(obj).encode("utf-8"), compresslevel=6, mtime=0)
        return atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return atomic_write_text(path, to_json(obj))


def read_json(path: str | Path) -> Any:
    """The JSON at ``path``, gunzipped first when it ends in ``.gz``."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise json.JSONDecodeError(f"not gzip-compressed JSON ({exc})", "", 0) from exc
    return json.loads(data.decode("utf-8"))


def check_output_file(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output file unless ``overwrite`` (the rule of every command's ``--out``, file or
    directory); check that it can be written. The file is then replaced atomically, so a failed run leaves
    the previous one intact."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"--out {path} is a directory; choose a file path")
    if path.exists() and not overwrite:
        raise OutputError(f"--out {path} exists; pass --overwrite or choose another path")
    ensure_parent_writable(path)
    return path


def check_output_dir(path: str | Path, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless ``overwrite``; check that it can be created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} exists and is a file; choose a directory path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"--out {path} exists and is not empty; pass --overwrite or choose another path")
    ensure_parent_writable(path)
    return path


AT_FDCWD = -100
RENAME_EXCHANGE = 2  # linux/fs.h


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(..., RENAME_EXCHANGE)``); False where the
    platform, C library or filesystem cannot, so that the caller falls back to two renames."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory and move it onto ``path`` only when the block succeeds.

    An existing ``path`` is replaced only after the new content is complete, so an interrupted run keeps the
    previous result intact.
    """
    path = check_output_dir(path, overwrite)
    make_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"failed to write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.chmod(tmp, DIR_MODE)
        if not path.exists():
            os.replace(tmp, path)
        elif exchange_paths(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # the previous content, now at the temporary path
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"failed to write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
