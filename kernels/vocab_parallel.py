"""Vocabulary parallelism for the fused linear losses: the head is split by vocabulary rows.

Each rank of a process group holds a contiguous shard c_r (V_r, D) of the head (and of its
bias), shards may differ in size; hidden states e are replicated and targets are global ids.
Per-row statistics over V (max, sum of exponentials, target logit, sums of per-class terms)
are computed on each shard and combined by a collective; the gradient of c_r stays local.
``VocabShard`` is this rank's place in the split; the row reductions below (``row_sum``,
``log_softmax``, ...) are the plain torch ones without an active shard and combine over the
group inside ``using(shard)``, so per-row maths written with them (the KD divergences) runs
unchanged on a shard. Differentiable combinations are all-reduce sums whose backward is an
all-reduce sum (the adjoint of the global computation: a replicated objective differentiated on
every rank is counted W times, see ``VocabShard.sum``).

Shoeybi et al. 2019, "Megatron-LM", arXiv:1909.08053 (vocabulary-parallel cross-entropy);
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv:2411.09009.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.distributed as dist

_ACTIVE: contextvars.ContextVar[VocabShard | None] = contextvars.ContextVar(
    "vocab_shard", default=None
)


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce sum: forward and backward both sum over the group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g, None


@dataclass(frozen=True)
class VocabShard:
    """This rank's contiguous slice [offset, offset + size) of a vocabulary of ``total`` ids,
    split over ``group`` in rank order with shard sizes ``sizes``."""

    group: object  # torch.distributed.ProcessGroup
    sizes: tuple[int, ...]
    rank: int

    @classmethod
    def gather(cls, group, size: int, device: torch.device) -> VocabShard:
        """The split from every rank's local vocabulary size (one all-gather of W integers)."""
        world = dist.get_world_size(group)
        mine = torch.tensor([size], dtype=torch.int64, device=device)
        every = torch.empty(world, dtype=torch.int64, device=device)
        _all_gather(every, mine, group)
        return cls(group, tuple(int(x) for x in every.tolist()), dist.get_rank(group))

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def local_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Global ids (N,) -> ids into this shard, -1 where the id lies on another rank."""
        loc = targets - self.offset
        return torch.where((loc >= 0) & (loc < self.size), loc, -1)

    def all_reduce_(self, x: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place, non-differentiable all-reduce ("sum" or "max") of ``x``; returns it."""
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM,
                        group=self.group)  # fmt: skip
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """(W, *x.shape): every rank's ``x`` (same shape on every rank), in rank order."""
        out = x.new_empty((self.world * x.shape[0], *x.shape[1:]))  # gloo: concatenated
        _all_gather(out, x.contiguous(), self.group)
        return out.view(self.world, *x.shape)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable sum of every rank's ``x``. Its backward sums the incoming gradients
        over the group, so gradients are those of the sum over ranks of each rank's objective:
        seed a replicated objective with 1 / world."""
        return _AllReduceSum.apply(x, self.group)

    def logsumexp(self, lse: torch.Tensor) -> torch.Tensor:
        """Global log-sum-exp (k,) from every rank's local one (k,), differentiable."""
        m = self.all_reduce_(lse.detach().clone(), "max")
        m = torch.where(torch.isfinite(m), m, 0.0)
        return m + self.sum((lse - m).exp()).log()


def _all_gather(out: torch.Tensor, x: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def active() -> VocabShard | None:
    """The shard that the row reductions combine over, None outside ``using``."""
    return _ACTIVE.get()


@contextlib.contextmanager
def using(shard: VocabShard | None):
    """Make the row reductions combine over ``shard``'s group (None: plain torch)."""
    token = _ACTIVE.set(shard)
    try:
        yield shard
    finally:
        _ACTIVE.reset(token)


def row_sum(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Sum over the last (vocabulary) dim, over every shard; differentiable."""
    s = x.sum(-1, keepdim=keepdim)
    shard = active()
    return s if shard is None else shard.sum(s)


def row_max(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Max over the last dim and every shard, without gradient (for shifts only)."""
    m = x.amax(-1, keepdim=keepdim)
    shard = active()
    return m if shard is None else shard.all_reduce_(m.detach().contiguous(), "max")


def row_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(x_j) over the last dim and every shard, (..., V) -> (...); differentiable."""
    lse = torch.logsumexp(x, -1)
    shard = active()
    return lse if shard is None else shard.logsumexp(lse)


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary (every shard), differentiable."""
    if active() is None:
        return torch.log_softmax(x, -1)
    return x - row_logsumexp(x).unsqueeze(-1)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the vocabulary (every shard), differentiable."""
    return torch.softmax(x, -1) if active() is None else log_softmax(x).exp()


def log_softmax_(x: torch.Tensor) -> torch.Tensor:
    """Log-softmax in place. Single process: torch's fused kernel, which writes a row only after
    reading it (8 x faster than x - logsumexp(x) on a (40, 65536) chunk, and exact near the row
    maximum, where x - logsumexp(x) loses ulp(max |x|)); on a shard x - the global LSE."""
    if active() is None:
        return torch.log_softmax(x, -1, out=x)
    return x.sub_(row_logsumexp(x).unsqueeze(-1))
