"""Atomic file output: write to a temporary file in the same directory, then rename.

A killed stage never leaves a half-written file behind: readers see the old file or the new
one, nothing in between (``os.replace`` is atomic on POSIX within one filesystem). A set of files
that belong together (a dataset's splits and manifest) is built in a temporary sibling directory
and swapped in as a unit (``atomic_dir``).

Conventions: an output keeps the mode of the file it replaces, else the umask default (never
mkstemp's 0600). Temporaries are named ``.NAME.PID.XXXX.tmp``; those left by a killed process
(its PID no longer runs on this host) are removed by the next write of NAME.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_dir",
    "atomic_open",
    "atomic_save_torch",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "json_text",
    "load_npy",
    "remove_stale_temps",
    "replace_marked_section",
]


def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.PID.*.tmp`` files or directories beside ``path`` whose PID is dead."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in path.parent.iterdir():
            name = entry.name
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            pid = name[len(prefix) :].split(".", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temp file beside ``path``; on clean exit fsync and rename it onto ``path``.

    ``mode`` must write ("w", "wb", "wt", "w+"...). The file gets the replaced file's mode, else
    ``0o666 & ~umask``.
    """
    if not isinstance(mode, str) or not mode.startswith("w"):
        raise ValueError(f"atomic_open: mode must be a write mode ('w', 'wb', ...), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    try:
        target_mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        target_mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, target_mode)
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory beside ``path``; on clean exit swap it in for ``path``.

    Every file written into it appears at once: the old directory is renamed aside, the new one
    renamed into place (if that fails the old one is put back), then the old one is deleted.
    On an exception the temp directory is deleted and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists() or path.is_symlink():
            old = path.parent / f"{_temp_prefix(path)}{os.urandom(4).hex()}.old.tmp"
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
        if old is not None and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old is not None:
            old.unlink()
        with contextlib.suppress(OSError):  # make the renames durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_npy(path: str | os.PathLike, *, mmap_mode: str | None = None, remedy: str = ""):
    """``np.load`` of one ``.npy`` array (no pickles). A missing file raises FileNotFoundError,
    a truncated or foreign one ValueError, both naming ``path`` and ``remedy`` (how to rebuild)."""
    import numpy as np

    path = Path(path)
    hint = f": {remedy}" if remedy else ""
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing{hint}")
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise ValueError(f"{path} is truncated or not a .npy array ({err}){hint}") from None
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} holds {type(array).__name__}, not one .npy array{hint}")
    return array


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def json_text(obj: Any) -> str:
    """JSON with sorted keys, indent 2 and a trailing newline (stable diffs for metrics files)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """``json_text(obj)`` written atomically."""
    atomic_write_text(path, json_text(obj))


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temp file and rename."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def replace_marked_section(path: str | os.PathLike, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path``.

    Report stages use this to write generated tables into a README without touching the
    hand-written prose around them. Missing markers are appended at the end.
    """
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + block + "\n"
    atomic_write_text(path, text)
