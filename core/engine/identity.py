"""Run identity: the resolved config, the repository code a run imported, and its input data.

A result or a checkpoint is reused only under the same identity (design.md, "The experiment
engine"). The code part is read from the import graph at run time: every module of this
repository (``core``, ``kernels``, ``projects``) in ``sys.modules`` when the identity is sealed,
with the SHA-256 of its source. A stored identity is still valid when the config is equal, the
input data hash the same, and every recorded module still hashes the same; a module the run
never imported cannot invalidate it. Machine knobs (threads, workers) are not part of a config:
callers pass the resolved params without the ``machine`` block (:func:`run_config`).

The digests are read when the identity is sealed, after the run; a run therefore passes the
digests taken when it started (``since``), and sealing refuses (:class:`CodeChangedError`) when
a module file changed on disk while the run used it: its result would otherwise be stored under
code it did not run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "CodeChangedError",
    "RunIdentity",
    "canonical",
    "code_digests",
    "data_digests",
    "file_digest",
    "imported_modules",
    "run_config",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "kernels", "projects")
MACHINE_KEYS = ("machine",)  # params blocks that never change a result (threads, workers)
_HASH_CACHE: dict[str, tuple[int, int, int, str]] = {}  # path -> (size, mtime_ns, inode, sha)


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON data (tuples -> lists, paths -> str, keys -> str), for hashing."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def run_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """The params that decide a result: everything but the machine knobs (``machine:``)."""
    return canonical({k: v for k, v in params.items() if k not in MACHINE_KEYS})


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, memoised per process on (size, mtime, inode)."""
    path = Path(path)
    st = path.stat()
    key = str(path.resolve())
    hit = _HASH_CACHE.get(key)
    if hit is not None and hit[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
        return hit[3]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    _HASH_CACHE[key] = (st.st_size, st.st_mtime_ns, st.st_ino, h.hexdigest())
    return h.hexdigest()


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def data_digests(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{path: sha256}`` of input files; a directory hashes its files' relative paths and
    digests (hidden files and ``__pycache__`` aside). A missing input is an error."""
    out: dict[str, str] = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            h = hashlib.sha256()
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not any(
                    s.startswith(".") or s == "__pycache__" for s in rel.parts
                ):
                    h.update(f"{rel.as_posix()}\0{file_digest(f)}\n".encode())
            out[_relative(p)] = h.hexdigest()
        elif p.is_file():
            out[_relative(p)] = file_digest(p)
        else:
            raise FileNotFoundError(f"run input {p} does not exist")
    return out


def imported_modules() -> list[Path]:
    """Source files of every module of this repository imported in this process, sorted."""
    files = set()
    roots = tuple(str(REPO_ROOT / pkg) + os.sep for pkg in PACKAGES)
    for module in list(sys.modules.values()):
        f = getattr(module, "__file__", None)
        if f and f.endswith(".py") and f.startswith(roots):
            files.add(Path(f))
    return sorted(files)


def code_digests(files: Iterable[str | os.PathLike] | None = None) -> dict[str, str]:
    """``{repo-relative path: sha256}`` of ``files`` (default: :func:`imported_modules`)."""
    files = imported_modules() if files is None else [REPO_ROOT / f for f in files]
    return {_relative(Path(f)): file_digest(f) for f in files}


class CodeChangedError(RuntimeError):
    """A module's source changed on disk while a run that imported it was running."""


@dataclass(frozen=True)
class RunIdentity:
    """What produced a result: ``config`` (JSON data), ``data`` and ``code`` digests.

    ``seal`` records the code imported so far; ``changes`` tells why a stored identity no
    longer holds (empty when it does).
    """

    config: dict[str, Any]
    data: dict[str, str] = field(default_factory=dict)
    code: dict[str, str] = field(default_factory=dict)

    @classmethod
    def seal(
        cls,
        config: Mapping[str, Any],
        data: Iterable[str | os.PathLike] = (),
        since: Mapping[str, str] | None = None,
    ) -> RunIdentity:
        """The identity of a run with ``config`` and input ``data``, code as imported now.

        ``since``: :func:`code_digests` taken when the run started; a module among them whose
        file no longer hashes the same raises :class:`CodeChangedError` (nothing is sealed).
        """
        code = code_digests()
        changed = sorted(f for f, digest in (since or {}).items() if code.get(f, digest) != digest)
        if changed:
            raise CodeChangedError(
                f"{', '.join(changed)} changed on disk while this run used it; its result is not "
                "stored (rerun it)"
            )
        return cls(canonical(dict(config)), data_digests(data), code)

    @property
    def key(self) -> str:
        """SHA-256 over config, data and code: one string that names the run."""
        blob = json.dumps(
            {"config": self.config, "data": self.data, "code": self.code}, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "config": self.config, "data": self.data, "code": self.code}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunIdentity:
        if not isinstance(d, Mapping) or not isinstance(d.get("config"), dict):
            raise ValueError("not a run identity (no 'config' mapping)")
        return cls(d["config"], dict(d.get("data") or {}), dict(d.get("code") or {}))

    def changes(
        self, config: Mapping[str, Any], data: Iterable[str | os.PathLike] = ()
    ) -> list[str]:
        """Why this stored identity does not describe a run of ``config`` on ``data`` with the
        code as it is now: a list of reasons, empty when it still holds."""
        reasons = []
        if self.config != canonical(dict(config)):
            reasons.append("config changed")
        try:
            now = data_digests(data)
        except FileNotFoundError as e:
            return [*reasons, str(e)]
        if now != self.data:
            changed = sorted(set(now.items()) ^ set(self.data.items()))
            reasons.append("data changed: " + ", ".join(sorted({p for p, _ in changed})))
        edited = []
        for rel, sha in self.code.items():
            path = REPO_ROOT / rel
            if not path.is_file() or file_digest(path) != sha:
                edited.append(rel)
        if edited:
            reasons.append("code changed: " + ", ".join(edited))
        return reasons
