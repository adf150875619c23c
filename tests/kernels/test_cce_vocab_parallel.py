"""Vocabulary-parallel Cut Cross-Entropy on 2 and 3 gloo processes against the single-process
float64 result: loss, LSE, the full gradient of e on every rank and each rank's shard of the
gradients of c and bias, uneven shards, every option. Wijmans et al. 2024, arXiv 2411.09009;
Megatron-LM's vocab-parallel cross-entropy (Shoeybi et al. 2019, arXiv:1909.08053)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import kernels.chunking as chunking
from core.losses import linear_cross_entropy
from tests.kernels.cce_helpers import loss_and_grads, make_inputs
from tests.kernels.dist_helpers import run_ranks, shard_bounds

N, V, D = 42, 103, 16  # V splits unevenly: 34 / 69 on 2 ranks, 17 / 34 / 52 on 3

# every option at least once; ``shape`` (B, T) gives the rows a time axis for ``shift``
CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", bias=True, softcap=3.0),
    dict(reduction="none", return_lse=True, bias=True),
    dict(reduction="mean", return_lse=True, softcap=2.5, label_smoothing=0.2, z_loss=1e-2),
    dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, shift=2, shape=(2, 21)),
    dict(reduction="sum", label_smoothing=1.0, bias=True, ignore="all"),
    dict(reduction="mean", z_loss=0.5, shift=True, shape=(3, 14), ignore="none"),
    dict(reduction="none", return_lse=True, softcap=4.0, bias=True, memory_target=1.1),
]


def run_case(case: dict, rows: slice, group=None, dtype=torch.float64, impl="auto"):
    """[loss, lse?, dE, dC[rows], dbias[rows]?] (float64) of ``case`` with the head's ``rows``."""
    opts = dict(case)
    bias, ignore, shape = (
        opts.pop("bias", False),
        opts.pop("ignore", "some"),
        opts.pop("shape", None),
    )
    e, c, t, b = make_inputs(N, V, D, torch.float64, bias=bias, ignore=ignore, seed=11)
    c, b = c[rows], None if b is None else b[rows]
    if shape is not None:
        e, t = e.reshape(*shape, D), t.reshape(shape)
    return_lse = opts.get("return_lse", False)
    opts["impl"] = impl

    def fn(e_, c_, t_, b_):
        out = linear_cross_entropy(e_, c_, t_, bias=b_, process_group=group, **opts)
        return out if return_lse else (out, None)

    e, c, b = e.to(dtype), c.to(dtype), None if b is None else b.to(dtype)
    return loss_and_grads(fn, e, c, t, b, reduction=opts["reduction"], return_lse=return_lse)


def _worker(rank, world, cases, dtype, impl):
    chunking.MIN_CHUNK_BUDGET_BYTES, chunking.SAFETY_BYTES = 1, 0  # several chunks per call
    lo, hi = shard_bounds(V, world, rank)
    return [run_case(case, slice(lo, hi), dist.group.WORLD, dtype, impl) for case in cases]


def check_against_one_process(results, cases, world, rtol, atol):
    """Every rank's loss, LSE and dE equal the single-process float64 values; the ranks' dC and
    dbias shards, in rank order, are the single-process gradients."""
    for i, case in enumerate(cases):
        want = run_case(case, slice(0, V))
        n_rows = 2 + bool(case.get("return_lse"))  # loss, lse?, dE: replicated
        for rank in range(world):
            got = results[rank][i]
            for a, b in zip(got[:n_rows], want[:n_rows], strict=True):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"{case} rank {rank}")
        for j in range(n_rows, len(want)):  # dC, dbias: the concatenated shards
            shards = torch.cat([results[r][i][j] for r in range(world)])
            torch.testing.assert_close(shards, want[j], rtol=rtol, atol=atol, msg=f"{case}")


@pytest.mark.parametrize("world", [2, 3])
def test_chunked_vocab_parallel_matches_one_process_fp64(world):
    results = run_ranks(_worker, world, CASES, torch.float64, "auto")
    check_against_one_process(results, CASES, world, rtol=1e-10, atol=1e-12)


def test_shard_bounds_are_uneven_and_cover_the_vocabulary():
    for world in (2, 3):
        bounds = [shard_bounds(V, world, r) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == V
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert len({hi - lo for lo, hi in bounds}) == world  # every shard a different size


@pytest.mark.interpret
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 at start-up"
)
def test_triton_vocab_parallel_matches_one_process_fp64():
    """The Triton kernels give each shard's statistics; the combination and the dE all-reduce
    run as on the chunked path (2 gloo processes under the interpreter, fp32 kernels)."""
    cases = [c for c in CASES if "memory_target" not in c]
    results = run_ranks(_worker, 2, cases, torch.float32, "triton")
    check_against_one_process(results, cases, 2, rtol=1e-4, atol=2e-5)


def _dtensor_worker(rank, world):
    """The head as a DTensor sharded on dim 0 (torch.chunk's uneven split): its mesh gives the
    group, its gradient comes back as a DTensor shard; the fused KD loss likewise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from core.losses import linear_kd_loss

    mesh = init_device_mesh("cpu", (world,))
    e, c, t, b = make_inputs(N, V, D, torch.float64, bias=True, seed=11)
    e.requires_grad_()
    c_dt = distribute_tensor(c, mesh, [Shard(0)]).requires_grad_()
    b_dt = distribute_tensor(b, mesh, [Shard(0)]).requires_grad_()
    loss = linear_cross_entropy(e, c_dt, t, bias=b_dt, label_smoothing=0.1, z_loss=1e-3)
    loss.backward()
    assert isinstance(c_dt.grad, DTensor) and c_dt.grad.placements == (Shard(0),)
    ce = [loss.detach(), e.grad.clone(), c_dt.grad.to_local().clone(), b_dt.grad.to_local()]
    e.grad = None
    w_t = distribute_tensor(c.flip(0) * 0.5, mesh, [Shard(0)])
    kd = linear_kd_loss(e, c_dt, e.detach() * 2, w_t, targets=t, divergence="akl")
    kd.backward()
    with pytest.raises(ValueError, match="Shard"):  # a replicated head is not a vocabulary shard
        linear_cross_entropy(e, distribute_tensor(c, mesh, [Replicate()]), t)
    for fn, args in ((linear_cross_entropy, (e, c_dt, t)), (linear_kd_loss, (e, c_dt, e, w_t))):
        with pytest.raises(ValueError, match="impl='reference' is single-process"):
            fn(*args, impl="reference")
    return ce + [kd.detach(), e.grad, c_dt.grad.to_local() - ce[2]]


def test_dtensor_head_gives_the_group_and_gets_a_sharded_gradient():
    from core.losses import linear_kd_loss

    results = run_ranks(_dtensor_worker, 2)
    e, c, t, b = make_inputs(N, V, D, torch.float64, bias=True, seed=11)
    e, c, b = (x.requires_grad_() for x in (e, c, b))
    loss = linear_cross_entropy(e, c, t, bias=b, label_smoothing=0.1, z_loss=1e-3)
    loss.backward()
    want = [loss.detach(), e.grad.clone(), c.grad.clone(), b.grad]
    e.grad = c.grad = None
    kd = linear_kd_loss(e, c, e.detach() * 2, c.detach().flip(0) * 0.5, targets=t, divergence="akl")
    kd.backward()
    want += [kd.detach(), e.grad, c.grad]
    for i, x in enumerate(want):
        if i in (2, 3, 6):  # shards of the head's gradients, rank order
            got = torch.cat([r[i] for r in results])
        else:
            got = results[0][i]
            torch.testing.assert_close(results[1][i], got, rtol=0, atol=0)
        torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-12, msg=f"output {i}")
