"""Run a function in W gloo processes (torch.multiprocessing spawn) and collect what each rank
returns: the CPU stand-in for a vocabulary-parallel job on W devices."""

from __future__ import annotations

import datetime
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, tmp: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        out = fn(rank, world, *args)
        torch.save(out, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args) -> list:
    """``fn(rank, world, *args)`` (a module-level function) on ``world`` gloo processes, the
    default group initialised; returns each rank's return value, in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world, tmp, fn, args), nprocs=world, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def shard_bounds(v: int, world: int, rank: int) -> tuple[int, int]:
    """An uneven contiguous split of V rows: rank r gets about (r + 1) / sum(1..W) of them."""
    weights = [r + 1 for r in range(world)]
    cuts = [0] + [round(v * sum(weights[: r + 1]) / sum(weights)) for r in range(world)]
    return cuts[rank], cuts[rank + 1]
