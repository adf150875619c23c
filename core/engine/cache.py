"""Results and checkpoints reused only under the same run identity.

Two uses, one rule (:class:`core.engine.identity.RunIdentity`):

- per-run result files for stages that train many small runs (one per method, seed, noise
  level): ``{"identity": ..., **result}`` JSON written atomically; :func:`cached_run` returns
  the stored result while its identity holds, else runs ``fn`` and stores the new one;
- a training directory's checkpoints (:func:`claim_run_dir`): resumed only when the
  ``identity.json`` beside them holds, otherwise cleared so the run starts fresh.

A killed stage keeps its finished runs; a rerun recomputes exactly the runs whose config, input
data or imported code changed. Under a distributed strategy every rank trains and only global
rank 0 writes or deletes (:func:`core.engine.dist.is_global_zero`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from core.engine.dist import is_global_zero
from core.engine.identity import RunIdentity, code_digests
from core.utils.io import atomic_write_json

__all__ = ["IDENTITY_FILE", "cached_run", "claim_run_dir", "load_cached", "seal_run_dir"]

IDENTITY_FILE = "identity.json"


def _read_identity(path: Path) -> tuple[RunIdentity | None, dict[str, Any] | None]:
    """(identity, record) of a result/identity file; (None, None) when absent or unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return RunIdentity.from_dict(record["identity"]), record
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None, None


def load_cached(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    data: Iterable[str | os.PathLike] = (),
    requires: Iterable[str | os.PathLike] = (),
) -> dict[str, Any] | None:
    """The result stored at ``path`` when its identity still holds for ``config`` and ``data``
    (and every file in ``requires`` exists), else None. Unreadable or foreign files count as
    absent."""
    identity, record = _read_identity(Path(path))
    if identity is None or not all(Path(p).exists() for p in requires):
        return None
    return record if not identity.changes(config, data) else None


def cached_run(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    fn: Callable[[], dict[str, Any]],
    data: Iterable[str | os.PathLike] = (),
) -> dict[str, Any]:
    """The result stored at ``path`` if its identity holds; else ``fn()``, stored with the
    identity sealed after it ran (so the code it imported is recorded).

    A fresh result gets ``wall_s`` and ``cpu_s`` (this process's CPU time, steadier than wall
    time on a shared machine). The returned dict carries ``cached`` (True when reused). Every
    rank of a distributed launch runs ``fn`` (it trains collectively); only rank 0 stores it.
    """
    data = list(data)
    stored = load_cached(path, config, data)
    if stored is not None:
        return stored | {"cached": True}
    since = code_digests()
    start, cpu = time.perf_counter(), time.process_time()
    result = dict(fn())
    result["wall_s"] = round(time.perf_counter() - start, 2)
    result["cpu_s"] = round(time.process_time() - cpu, 2)
    record = {"identity": RunIdentity.seal(config, data, since).as_dict(), **result}
    if is_global_zero():
        atomic_write_json(path, record)
    return record | {"cached": False}


def claim_run_dir(
    run_dir: str | os.PathLike,
    config: Mapping[str, Any],
    data: Iterable[str | os.PathLike] = (),
    *,
    clear: Iterable[str] = ("checkpoints", "dvclive"),
) -> bool:
    """Make ``run_dir`` belong to this run; True when its checkpoints may be resumed.

    When ``run_dir/identity.json`` holds for (``config``, ``data``, the code it recorded),
    nothing changes. Otherwise the ``clear`` subdirectories (stale checkpoints, logs) are
    removed, with a line saying why, so the run starts fresh. Ranks other than 0 only read:
    rank 0 clears (every rank gets the same answer from the same files).
    """
    run_dir = Path(run_dir)
    identity, _ = _read_identity(run_dir / IDENTITY_FILE)
    reasons = ["no identity.json"] if identity is None else identity.changes(config, data)
    if not reasons:
        return True
    if not is_global_zero():
        return False
    stale = [run_dir / name for name in clear if (run_dir / name).exists()]
    if stale:
        print(f"{run_dir}: starting fresh ({'; '.join(reasons)})", flush=True)
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (run_dir / IDENTITY_FILE).unlink(missing_ok=True)
    return False


def seal_run_dir(
    run_dir: str | os.PathLike,
    config: Mapping[str, Any],
    data: Iterable[str | os.PathLike] = (),
    since: Mapping[str, str] | None = None,
) -> RunIdentity:
    """Write ``run_dir/identity.json`` for the checkpoints saved there now (code as imported;
    ``since``: the code digests when the run started, see :meth:`RunIdentity.seal`); written on
    global rank 0 only."""
    identity = RunIdentity.seal(config, data, since)
    if is_global_zero():
        atomic_write_json(Path(run_dir) / IDENTITY_FILE, {"identity": identity.as_dict()})
    return identity
