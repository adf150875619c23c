"""Run independent jobs (e.g. one training run per model variant) in worker processes.

On a small CPU box, k single-threaded processes beat one process with k threads for the tiny
models of the default params: the matmuls are too small to split well across threads. Inside
one rank of a distributed launch (torchrun, srun, Lightning's launcher) the jobs run in this
process, in order: a pool inside a rank would relaunch the strategy (:mod:`core.engine.dist`).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

import torch

from core.engine.dist import pool_size

__all__ = ["imap_processes", "map_processes"]

T = TypeVar("T")


def _call(fn: Callable[..., T], threads: int, item: Any, args: tuple) -> T:
    torch.set_num_threads(threads)
    return fn(item, *args)


def map_processes(
    fn: Callable[..., T],
    items: Sequence[Any],
    *args: Any,
    workers: int = 1,
    threads: int = 1,
) -> list[T]:
    """``[fn(item, *args) for item in items]``, in up to ``workers`` spawned processes.

    ``fn`` must be a module-level function (it is pickled). ``workers <= 1`` (or a single
    item, or one rank of several) runs in this process, in order. Each worker sets
    ``torch.set_num_threads(threads)``. Results come back in the order of ``items``; the first
    exception is re-raised.
    """
    if workers < 1 or threads < 1:
        raise ValueError(f"workers and threads must be >= 1, got {workers} and {threads}")
    if pool_size(workers) == 1 or len(items) <= 1:
        return [_call(fn, threads, item, args) for item in items]
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    with ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=ctx) as pool:
        futures = [pool.submit(_call, fn, threads, item, args) for item in items]
        return [f.result() for f in futures]


_STATE: dict[str, Any] = {}


def _init_worker(threads: int, init: Callable[..., dict] | None, init_args: tuple) -> None:
    torch.set_num_threads(threads)
    _STATE.clear()
    if init is not None:
        _STATE.update(init(*init_args))


def _work(job: tuple[Callable, Any]) -> Any:
    fn, item = job
    return fn(item, _STATE)


def imap_processes(
    fn: Callable[[Any, dict], Any],
    items: Sequence[Any],
    *,
    init: Callable[..., dict] | None = None,
    init_args: tuple = (),
    workers: int = 1,
    threads: int = 1,
) -> Iterable[Any]:
    """Yield ``fn(item, state)`` for each item as it finishes, in ``workers`` spawned processes.

    ``state = init(*init_args)`` is built once per process (data, teacher logits); ``fn`` and
    ``init`` must be module-level functions. ``workers <= 1`` (or one rank of several) runs
    here, in order.
    """
    if pool_size(workers) <= 1 or len(items) <= 1:
        previous = torch.get_num_threads()
        _init_worker(threads, init, init_args)
        try:
            for item in items:
                yield fn(item, _STATE)
        finally:
            _STATE.clear()
            torch.set_num_threads(previous)
        return
    ctx = mp.get_context("spawn")  # fork after torch started threads can deadlock
    n = min(workers, len(items))
    with ctx.Pool(n, _init_worker, (threads, init, init_args)) as pool:
        yield from pool.imap_unordered(_work, [(fn, item) for item in items])
