"""Shared pieces of the Cut Cross-Entropy tests: inputs, an objective, the tolerance rule."""

from __future__ import annotations

import torch

from kernels.cce.api import linear_cross_entropy_impl
from kernels.cce.reference import reference_linear_cross_entropy

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3, torch.float64: 1e-10}


def make_inputs(n, v, d, dtype, *, bias=False, ignore="some", seed=0):
    """e (n, d), c (v, d), targets (n,), bias (v,) | None; ``ignore``: none / some / all."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.25
    c = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.25
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    if ignore == "some":
        t[torch.rand(n, generator=g) < 0.3] = -100
    elif ignore == "all":
        t[:] = -100
    return e.to(dtype), c.to(dtype), t, None if b is None else b.to(dtype)


def loss_and_grads(fn, e, c, t, b, *, reduction, return_lse, z_weight=1e-2, dtype=None):
    """Run ``fn(e, c, t, b) -> (loss, lse)`` in ``dtype`` and differentiate a fixed objective.

    The objective weights per-token losses by fixed row weights (so reduction="none" gradients
    are checked against arbitrary grad_outputs) and adds a z-loss z_weight * sum(lse^2).
    Returns [loss, lse?, dE, dC, dbias?] in float64.
    """
    dtype = dtype or e.dtype
    leaves = [
        x.detach().to(dtype).requires_grad_() for x in (e, c) + ((b,) if b is not None else ())
    ]
    bias = leaves[2] if b is not None else None
    loss, lse = fn(leaves[0], leaves[1], t, bias)
    if reduction == "none":
        w = torch.linspace(-1.0, 2.0, loss.numel(), dtype=torch.float64).view(loss.shape)
        obj = (loss.double() * w).sum()
    else:
        obj = 1.7 * loss.double()
    if return_lse:
        obj = obj + z_weight * (lse.double() ** 2).sum()
    grads = torch.autograd.grad(obj, leaves)
    outs = [loss, lse] if return_lse else [loss]
    return [x.detach().double() for x in (*outs, *grads)]


def impl_fn(impl, *, reduction, return_lse, softcap=None, chunk_size=None, **kw):
    """(e, c, t, b) -> (loss, lse) through the kernels' dispatch (lse None unless return_lse)."""

    def fn(e, c, t, b):
        out = linear_cross_entropy_impl(
            e, c, t, b, softcap=softcap, reduction=reduction, return_lse=return_lse,
            impl=impl, chunk_size=chunk_size, **kw,
        )  # fmt: skip
        return out if return_lse else (out, None)

    return fn


def ref_fn(*, reduction, return_lse, softcap=None, compute_dtype=None):
    """(e, c, t, b) -> (loss, lse) from the materialised reference."""

    def fn(e, c, t, b):
        return reference_linear_cross_entropy(
            e, c, t, b, softcap=softcap, reduction=reduction, return_lse=return_lse,
            compute_dtype=compute_dtype,
        )  # fmt: skip

    return fn


def assert_tolerance_rule(got, torch_same, ref64, dtype, names):
    """|impl - ref64| <= |torch_same_dtype - ref64| + tol, on the max over each tensor."""
    for name, x, y, r in zip(names, got, torch_same, ref64, strict=True):
        err, base = (x - r).abs().max().item(), (y - r).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        assert err <= base + TOL[dtype] * scale, (
            f"{name}: |impl-ref64|={err:.3g} > {base:.3g} + tol"
        )
