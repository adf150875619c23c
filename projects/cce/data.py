"""Deterministic fixed-length windows over the tokenized splits (``cce-tokenizer``'s arrays).

Both training runs (torch CE and CCE) draw the same window starts from a seeded generator,
so they see identical batches in identical order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from core.data.tokens import load_token_ids
from core.engine.dist import global_rank


class TokenWindows(Dataset):
    """``n_windows`` windows of ``block_size + 1`` tokens at seeded random starts.

    Item ``i`` is ``(x, y)``: int64 ``(block_size,)`` inputs and the next-token targets.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, n_windows: int, seed: int) -> None:
        if tokens.ndim != 1 or tokens.size < block_size + 2:
            raise ValueError(
                f"need a 1-D token array longer than block_size + 1 = {block_size + 1}, "
                f"got shape {tokens.shape}"
            )
        if n_windows < 1:
            raise ValueError(f"n_windows must be >= 1, got {n_windows}")
        self.tokens, self.block_size = tokens, block_size
        rng = np.random.default_rng(seed)
        self.starts = rng.integers(0, tokens.size - block_size - 1, size=n_windows)  # (n_windows,)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        w = torch.from_numpy(self.tokens[s : s + self.block_size + 1].astype(np.int64))
        return w[:-1], w[1:]


def make_loaders(
    data_dir: str | Path,
    block_size: int,
    train_cfg: dict,
    max_steps: int,
    seed: int,
    world: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Train loader with exactly ``max_steps`` batches (one epoch, fixed order) and a val loader.

    ``train.batch_size`` is the global batch: over ``world`` ranks each loads
    ``batch_size / world`` windows per step through a DistributedSampler without shuffling
    (rank r takes windows r, r + world, ...; Lightning would otherwise inject a shuffling one
    for training), so the union of the ranks' step-k batches is the 1-process step-k batch.
    ``val_windows`` must split evenly over the ranks, so the mean of the per-rank means that
    ``sync_dist`` logs is the mean over all windows (no padded repeats).
    """
    bs = train_cfg["batch_size"]
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if bs % world or train_cfg["val_windows"] % world:
        raise ValueError(
            f"train.batch_size ({bs}) and train.val_windows ({train_cfg['val_windows']}) must "
            f"be multiples of the {world} training processes (trainer.devices x num_nodes)"
        )
    train = TokenWindows(load_token_ids(data_dir, "train"), block_size, max_steps * bs, seed)
    val = TokenWindows(
        load_token_ids(data_dir, "val"), block_size, train_cfg["val_windows"], seed + 1
    )
    if world == 1:
        return (
            DataLoader(train, batch_size=bs, shuffle=False),
            DataLoader(val, batch_size=train_cfg["val_batch_size"], shuffle=False),
        )
    rank = global_rank()  # from the launcher's environment: loaders are built before fit
    return (
        DataLoader(
            train,
            batch_size=bs // world,
            sampler=DistributedSampler(train, num_replicas=world, rank=rank, shuffle=False),
        ),
        DataLoader(
            val,
            batch_size=train_cfg["val_batch_size"],
            sampler=DistributedSampler(val, num_replicas=world, rank=rank, shuffle=False),
        ),
    )
