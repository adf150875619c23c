"""Vocabulary-parallel fused KD on 2 and 3 gloo processes against the single-process float64
result, for every fused divergence (closed forms, autograd over the definitions, AKL's merged
head search, DKD's target column on one rank, the exact path for masked classes): the loss and
the full gradient of the student's hidden states on every rank, the student head's gradient
shard by shard. Registry-driven: a new divergence is tested here without editing this file."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import kernels.chunking as chunking
from core.losses import linear_kd_loss
from core.losses.linear_kd import fused_divergence_names
from tests.kernels.dist_helpers import run_ranks, shard_bounds

N, V, D, DT = 42, 103, 11, 7
NAMES = fused_divergence_names()
CASES = [dict(divergence=n, temperature=1.0) for n in NAMES] + [
    dict(divergence=n, temperature=2.5, hard_weight=0.3, reduction="none") for n in NAMES
]
CASES += [
    dict(divergence="akl", mu=0.99, flat=True),  # the head search grows k to the whole vocabulary
    dict(divergence="akl", mu=0.2, reduction="sum", hard_weight=0.5),
    dict(divergence="forward_kl", masked=True),  # -inf teacher classes: the exact per-row path
    dict(divergence="js", masked=True, reduction="none"),
]


def run_case(case: dict, rows: slice, group=None):
    """(loss, dE_s, dW_s[rows]) in float64 of ``case`` with the heads' vocabulary ``rows``."""
    opts = dict(case)
    flat, masked = opts.pop("flat", False), opts.pop("masked", False)
    g = torch.Generator().manual_seed(5)
    e_s = torch.randn(N, D, generator=g, dtype=torch.float64)
    w_s = 0.5 * torch.randn(V, D, generator=g, dtype=torch.float64)
    e_t = torch.randn(N, DT, generator=g, dtype=torch.float64)
    w_t = (0.05 if flat else 0.9) * torch.randn(V, DT, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    if masked:  # positive teacher features and -inf weights: -inf logits on 4 classes
        e_t = e_t.abs() + 0.1
        w_t[[3, 40, 70, 101]] = 0.0
        w_t[[3, 40, 70, 101], 0] = -math.inf
    e_s.requires_grad_()
    w_s = w_s[rows].clone().requires_grad_()
    loss = linear_kd_loss(
        e_s, w_s, e_t, w_t[rows], targets=y, process_group=group,
        impl="auto" if group is not None else "reference", **opts,
    )  # fmt: skip
    weights = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)
    (loss * weights if loss.ndim else 1.7 * loss).sum().backward()
    return loss.detach(), e_s.grad, w_s.grad


def _worker(rank, world, cases):
    chunking.MIN_CHUNK_BUDGET_BYTES, chunking.SAFETY_BYTES = 1, 0  # several chunks per call
    lo, hi = shard_bounds(V, world, rank)
    return [run_case(case, slice(lo, hi), dist.group.WORLD) for case in cases]


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_vocab_parallel_kd_matches_one_process_fp64(world):
    results = run_ranks(_worker, world, CASES)
    for i, case in enumerate(CASES):
        loss, de, dw = run_case(case, slice(0, V))
        assert torch.isfinite(loss).all() and torch.isfinite(dw).all()
        for rank in range(world):
            got = results[rank][i]
            torch.testing.assert_close(got[0], loss, rtol=1e-10, atol=1e-12, msg=f"{case}")
            torch.testing.assert_close(got[1], de, rtol=1e-10, atol=1e-12, msg=f"{case}")
        shards = torch.cat([results[r][i][2] for r in range(world)])
        torch.testing.assert_close(shards, dw, rtol=1e-10, atol=1e-12, msg=f"{case}")
