"""Ranks, world size and the one rule between process pools and distributed training.

A stage may train under a distributed strategy (``trainer.strategy: ddp`` with ``devices`` /
``num_nodes`` > 1, launched by Lightning, torchrun or SLURM's srun). Then every rank runs the
whole entry point: only global rank 0 writes results, plots and run records
(:func:`is_global_zero`), and ``machine.workers`` process pools never nest inside the ranks
(:func:`check_pool`): each rank would otherwise spawn its own pool and relaunch the strategy.

Rank detection follows Lightning's launchers: ``torch.distributed`` once initialised, else the
environment (``RANK`` from torchrun, ``SLURM_PROCID`` under srun, ``NODE_RANK`` /
``LOCAL_RANK`` / ``WORLD_SIZE`` from Lightning's own subprocess launcher).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "check_pool",
    "global_rank",
    "is_distributed",
    "is_global_zero",
    "launched_world_size",
    "pool_size",
    "processes",
    "rank_loader",
    "world_size",
]

_log = logging.getLogger(__name__)
_DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "deepspeed", "model_parallel")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def _group() -> Any:
    """``torch.distributed`` when a process group is initialised, else None (torch is not
    imported here: report and data stages that use the cache stay light)."""
    torch = sys.modules.get("torch")
    td = getattr(torch, "distributed", None)
    return td if td is not None and td.is_available() and td.is_initialized() else None


def launched_world_size() -> int:
    """Processes this one belongs to: the initialised process group's size, else WORLD_SIZE /
    SLURM_NTASKS from a launcher, else 1."""
    if (td := _group()) is not None:
        return td.get_world_size()
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = _env_int(name)
        if value:
            return value
    return 1


def global_rank() -> int:
    """This process's global rank (0 outside any distributed launch)."""
    if (td := _group()) is not None:
        return td.get_rank()
    rank = _env_int("RANK")
    if rank is None and launched_world_size() > 1:
        rank = _env_int("SLURM_PROCID")
    if rank is None:
        local, node = _env_int("LOCAL_RANK"), _env_int("NODE_RANK") or 0
        if local is not None or node:  # Lightning's launcher: NODE_RANK x local size + local
            # exact with LOCAL_WORLD_SIZE; without it, at least not 0 on every node but the first
            # (also the launching process of node > 0 before its first fit sets LOCAL_RANK)
            per_node = _env_int("LOCAL_WORLD_SIZE") or max(launched_world_size(), 1)
            rank = node * per_node + (local or 0)
    return rank or 0


def is_global_zero() -> bool:
    """True on the one process that writes results, plots and run records."""
    return global_rank() == 0


def processes(trainer_cfg: Mapping[str, Any] | None) -> int | None:
    """Processes a ``trainer:`` block launches: devices x num_nodes when ``devices`` is a
    count or a list; None when Lightning decides ("auto", "-1")."""
    cfg = dict(trainer_cfg or {})
    devices, nodes = cfg.get("devices", "auto"), cfg.get("num_nodes", 1)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 0:
        count = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        count = int(devices)
    else:
        return None
    return count * (nodes if isinstance(nodes, int) and nodes > 0 else 1)


def is_distributed(trainer_cfg: Mapping[str, Any] | None) -> bool:
    """True when a ``trainer:`` block asks for more than one process (devices x num_nodes > 1,
    or a distributed strategy by name), or this process was launched as one rank of several."""
    cfg = dict(trainer_cfg or {})
    strategy = cfg.get("strategy", "auto")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__.lower()
    n = processes(cfg)
    return (
        (n is not None and n > 1)
        or any(name.startswith(s) for s in _DISTRIBUTED_STRATEGIES)
        or launched_world_size() > 1
    )


def check_pool(workers: int, trainer_cfg: Mapping[str, Any] | None, what: str = "trainer") -> int:
    """The worker count a multi-run stage may use under ``trainer_cfg``.

    ``machine.workers`` > 1 with a distributed ``trainer:`` block set in params is refused
    (ValueError naming both settings): each pool worker would launch the strategy again.
    Launched from outside as one of several ranks (torchrun, srun) with params that ask for no
    strategy, the runs go in this process, one at a time (logged): returns :func:`pool_size`.
    """
    if workers <= 1:
        return workers
    cfg = dict(trainer_cfg or {})
    asked = cfg.get("strategy", "auto") != "auto" or (processes(cfg) or 1) > 1
    if asked and is_distributed(cfg):
        raise ValueError(
            f"machine.workers={workers} and a distributed {what} (strategy="
            f"{cfg.get('strategy', 'auto')!r}, devices={cfg.get('devices', 'auto')!r}, "
            f"num_nodes={cfg.get('num_nodes', 1)!r}) do not nest: set machine.workers=1 "
            f"(--workers 1) to train each run on all ranks, or {what}.devices=1 to run "
            "independent runs side by side"
        )
    size = pool_size(workers)
    if size < workers:
        _log.info(
            "launched as rank %d of %d: runs go one at a time", global_rank(), launched_world_size()
        )
    return size


def pool_size(workers: int) -> int:
    """Processes a pool of ``workers`` may spawn here: 1 (the runs go in this process, one at a
    time) inside one rank of several launched from outside (torchrun, srun), where a pool per
    rank would multiply the processes; else ``workers``. The one home of that rule
    (``core.utils.parallel``'s pools and :func:`check_pool` ask it)."""
    return 1 if launched_world_size() > 1 else workers


def world_size(trainer_cfg: Mapping[str, Any] | None) -> int:
    """Training processes of a ``trainer:`` block: devices x num_nodes, or the launcher's count
    (torchrun, srun) when ``devices`` is left to Lightning ("auto")."""
    n = processes(trainer_cfg)
    return n if n is not None else launched_world_size()


def rank_loader(
    make_dataset: Callable[[list], Any],
    batches: Sequence[Any],
    world: int,
    *,
    rows: Callable[[Any], int] = len,
    shard: Callable[[Any, int, int], Any] = lambda b, rank, world: b[rank::world],
    even: bool = False,
) -> Any:
    """A DataLoader over precomputed batches, in order, no collation: ``make_dataset(items)``
    is a Dataset whose item i is batch i.

    Over ``world`` > 1 training processes every batch is the global one and this rank
    (:func:`global_rank`) loads ``shard(batch, rank, world)`` (default its rows r, r + world,
    ...), so across the ranks step k sees the 1-process step-k batch. Each batch needs at
    least one row per process and, with ``even`` (training batches, whose gradient mean DDP
    averages over the ranks), a multiple of ``world`` rows: else ValueError naming the sizes.
    The sampler is a one-replica DistributedSampler in order, so Lightning injects none of
    its own (it would deal whole batches to the ranks, shuffled for training).
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if world == 1:
        return DataLoader(make_dataset(list(batches)), batch_size=None, shuffle=False)
    bad = sorted({rows(b) for b in batches if rows(b) < world or (even and rows(b) % world)})
    if world < 1 or bad:
        raise ValueError(
            f"batches of {bad} rows do not split over {world} training processes (trainer."
            "devices x num_nodes; training batches: a multiple of them, others: at least one "
            "row each): change the batch size or the number of processes"
        )
    rank = global_rank()
    data = make_dataset([shard(b, rank, world) for b in batches])
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=False)
    return DataLoader(data, batch_size=None, sampler=sampler)
