"""Cut Cross-Entropy Triton kernels under the interpreter, against a float64 reference.

Run in their own process: TRITON_INTERPRET=1 .venv/bin/python -m pytest -m interpret
tests/kernels/test_cce_triton.py (triton.jit reads the variable at import).
Wijmans et al. 2024, arXiv 2411.09009.
"""

from __future__ import annotations

import os

import pytest
import torch

from core.losses import linear_cross_entropy
from kernels.cce.reference import reference_linear_cross_entropy
from tests.kernels.cce_helpers import (
    TOL,
    assert_tolerance_rule,
    impl_fn,
    loss_and_grads,
    make_inputs,
    ref_fn,
)

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 at start-up"
    ),
]

N, V, D = 67, 301, 40  # odd: partial row, vocabulary and D blocks


def _run(dtype, *, reduction="mean", return_lse=False, softcap=None, bias=False, ignore="some",
         **triton_kw):  # fmt: skip
    e, c, t, b = make_inputs(N, V, D, dtype, bias=bias, ignore=ignore)
    kw = dict(reduction=reduction, return_lse=return_lse)
    got = loss_and_grads(impl_fn("triton", softcap=softcap, **kw, **triton_kw), e, c, t, b, **kw)
    same = loss_and_grads(ref_fn(softcap=softcap, **kw), e, c, t, b, **kw)
    ref64 = loss_and_grads(
        ref_fn(softcap=softcap, compute_dtype=torch.float64, **kw), e, c, t, b,
        dtype=torch.float64, **kw,
    )  # fmt: skip
    names = ["loss"] + (["lse"] if return_lse else []) + ["dE", "dC"] + (["dbias"] if bias else [])
    return got, same, ref64, names


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    ("softcap", "bias", "return_lse"), [(None, False, False), (3.0, True, True)]
)
def test_triton_unfiltered_fp32_parity(reduction, softcap, bias, return_lse):
    got, same, ref64, names = _run(
        torch.float32, reduction=reduction, softcap=softcap, bias=bias, return_lse=return_lse,
        filter_eps=None,
    )  # fmt: skip
    assert_tolerance_rule(got, same, ref64, torch.float32, names)
    for x, r in zip(got, ref64, strict=True):  # exact within fp32 tolerance, not just the rule
        torch.testing.assert_close(x, r, rtol=1e-4, atol=TOL[torch.float32])


@pytest.mark.parametrize("sort_vocab", [False, True])
def test_triton_filtered_and_sorted_parity(sort_vocab):
    got, same, ref64, names = _run(
        torch.float32, bias=True, return_lse=True, filter_eps="auto", sort_vocab=sort_vocab
    )
    assert_tolerance_rule(got, same, ref64, torch.float32, names)


def test_triton_bf16_parity_and_all_ignored():
    got, same, ref64, names = _run(torch.bfloat16, reduction="none", filter_eps="auto")
    assert_tolerance_rule(got, same, ref64, torch.bfloat16, names)
    got, *_ = _run(torch.float32, ignore="all")
    assert all(torch.isfinite(x).all() and (x == 0).all() for x in got)


def test_filtering_skips_tiles():
    """A huge threshold skips every tile (zero gradients); sorting must not change the loss."""
    plain, *_ = _run(torch.float32, filter_eps=None)
    skipped, *_ = _run(torch.float32, filter_eps=2.0, sort_vocab=True)
    torch.testing.assert_close(skipped[0], plain[0])
    assert (skipped[1] == 0).all() and (skipped[2] == 0).all()


def test_triton_reads_strided_targets_and_bias():
    """A (N,) slice of a (N, 3) token array and a strided bias: the kernels must honour strides."""
    e, c, _, _ = make_inputs(N, V, D, torch.float32, ignore="none")
    g = torch.Generator().manual_seed(3)
    t3 = torch.randint(0, V, (N, 3), generator=g)
    b2 = torch.randn(V, 2, generator=g)
    t, b = t3[:, 0], b2[:, 1]  # strides 3 and 2
    assert not t.is_contiguous() and not b.is_contiguous()
    got = linear_cross_entropy(e, c, t, bias=b, impl="triton")
    want, _ = reference_linear_cross_entropy(
        e, c, t.contiguous(), b.contiguous(), compute_dtype=torch.float64
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_triton_loss_is_fp32_and_float64_is_refused():
    e, c, t, _ = make_inputs(N, V, D, torch.bfloat16)
    loss, lse = linear_cross_entropy(e, c, t, impl="triton", reduction="none", return_lse=True)
    assert loss.dtype == lse.dtype == torch.float32
    e64, c64, t64, _ = make_inputs(N, V, D, torch.float64)
    with pytest.raises(ValueError, match="float64"):
        linear_cross_entropy(e64, c64, t64, impl="triton")


def test_triton_double_backward_is_refused():
    e, c, t, _ = make_inputs(N, V, D, torch.float32)
    e.requires_grad_()
    loss = linear_cross_entropy(e, c, t, impl="triton")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, e, create_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("filter_eps", [None, "auto"])
def test_triton_label_smoothing_and_z_loss_parity(reduction, filter_eps):
    e, c, t, b = make_inputs(N, V, D, torch.float32, bias=True)
    kw = dict(reduction=reduction, return_lse=True)
    opts = dict(softcap=3.0, label_smoothing=0.2, z_loss=1e-2, **kw)
    got = loss_and_grads(impl_fn("triton", filter_eps=filter_eps, **opts), e, c, t, b, **kw)
    same = loss_and_grads(impl_fn("reference", **opts), e, c, t, b, **kw)
    ref64 = loss_and_grads(impl_fn("reference", **opts), e, c, t, b, dtype=torch.float64, **kw)
    names = ["loss", "lse", "dE", "dC", "dbias"]
    assert_tolerance_rule(got, same, ref64, torch.float32, names)
