"""kernels.vocab_parallel without processes: a shard's place in the split, and the row
reductions, which must be the plain torch ops (bit for bit) when no shard is active."""

from __future__ import annotations

import torch

from kernels.vocab_parallel import (
    VocabShard,
    active,
    log_softmax,
    log_softmax_,
    row_logsumexp,
    row_max,
    row_sum,
    softmax,
    using,
)


def test_shard_place_and_local_targets():
    shard = VocabShard(group=None, sizes=(3, 5, 2), rank=1)
    assert (shard.world, shard.size, shard.offset, shard.total) == (3, 5, 3, 10)
    t = torch.tensor([0, 2, 3, 7, 8, 9, -100])
    assert shard.local_targets(t).tolist() == [-1, -1, 0, 4, -1, -1, -1]


def test_row_reductions_are_torch_without_a_shard():
    g = torch.Generator().manual_seed(0)
    x = 30 * torch.randn(7, 129, generator=g)
    assert active() is None
    assert torch.equal(row_sum(x), x.sum(-1)) and torch.equal(row_sum(x, True), x.sum(-1, True))
    assert torch.equal(row_max(x), x.amax(-1)) and torch.equal(row_logsumexp(x), x.logsumexp(-1))
    assert torch.equal(log_softmax(x), torch.log_softmax(x, -1))
    assert torch.equal(softmax(x), torch.softmax(x, -1))
    assert torch.equal(log_softmax_(x.clone()), torch.log_softmax(x, -1))
    with using(None):
        assert active() is None
    shard = VocabShard(group=None, sizes=(1,), rank=0)
    with using(shard):
        assert active() is shard
    assert active() is None
