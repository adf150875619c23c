"""Per-run result files: a finished run is skipped on rerun while its config is unchanged.

Projects that train many small independent runs (one per method, seed, noise level) inside one
DVC stage store each run's result as ``{"config": ..., **result}`` JSON, written atomically.
A stage that is killed keeps its finished runs; a rerun recomputes only the runs whose config
(params, and digests of the code and inputs that decide the numbers) changed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from core.utils.io import atomic_write_json

__all__ = ["cached_run", "load_cached", "store_run"]


def load_cached(
    path: str | os.PathLike, config: dict[str, Any], requires: Iterable[str | os.PathLike] = ()
) -> dict[str, Any] | None:
    """The result stored at ``path`` when its config equals ``config`` (and every file in
    ``requires`` exists), else None. An unreadable file (missing, a directory, not UTF-8, not
    JSON, not a JSON object) counts as absent: the run is simply recomputed."""
    path = Path(path)
    if not path.is_file() or not all(Path(p).exists() for p in requires):
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return stored if isinstance(stored, dict) and stored.get("config") == config else None


def store_run(path: str | os.PathLike, config: dict[str, Any], result: dict[str, Any]) -> dict:
    """Write ``{"config": config, **result}`` to ``path`` atomically; return it."""
    record = {"config": config, **result}
    atomic_write_json(path, record)
    return record


def cached_run(
    path: str | os.PathLike, config: dict[str, Any], fn: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The result stored at ``path`` if its config equals ``config``; else ``fn()``, stored.

    A fresh result gets ``wall_s`` and ``cpu_s`` (this process's CPU time, steadier than wall
    time on a shared machine). The returned dict carries ``cached`` (True when reused).
    """
    stored = load_cached(path, config)
    if stored is not None:
        return stored | {"cached": True}
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    result["wall_s"] = round(time.perf_counter() - start, 2)
    result["cpu_s"] = round(time.process_time() - cpu, 2)
    return store_run(path, config, result) | {"cached": False}
