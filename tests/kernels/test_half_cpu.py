"""fp16/bf16 on CPU: the chunking core's native half path (GEMMs in the input dtype, fp32
softmax and dC accumulation) and its dispatch against the upcast path (issue #18).

Accuracy by the CCE authors' rule: |ours - ref_fp64| <= |torch_same_dtype - ref_fp64| + tol on
the max over each tensor, torch_same_dtype = logits in the input dtype, the loss maths in fp32
(autograd). tol: for the fp32 loss and LSE the repository's half-precision tolerance
(cce_helpers.TOL, 2e-3 x max(1, |ref|)): a scalar's error is one draw of the logits' random
rounding, either side may draw the larger; for the gradients, returned in the input dtype, one
unit of that dtype's rounding at the largest reference entry (the rounding of the output alone,
which both sides pay, reaches half of it). Wijmans et al. 2024, arXiv 2411.09009.
"""

from __future__ import annotations

import logging

import pytest
import torch

from core.losses.linear_kd import fused_divergence, fused_divergence_names
from kernels import chunking
from kernels.cce.api import linear_cross_entropy_impl
from kernels.cce.chunked import CrossEntropyChunk
from kernels.cce.reference import reference_linear_cross_entropy
from kernels.kd import linear_kd_impl, reference_linear_kd
from tests.kernels.cce_helpers import TOL

N, V, D = 75, 1031, 37  # odd: chunks of 24 rows = sub-blocks of 16 + 8, a short last chunk
CHUNK = 24
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setenv(chunking.HALF_PATH_ENV, "native")


def _tol(name: str, ref: torch.Tensor, dtype: torch.dtype) -> float:
    scale = ref.abs().max().item()
    if name in ("loss", "lse"):
        return TOL[dtype] * max(1.0, scale)
    return torch.finfo(dtype).eps * scale


def _assert_rule(names, got, same, ref, dtype):
    for name, x, y, r in zip(names, got, same, ref, strict=True):
        err, base = (x - r).abs().max().item(), (y - r).abs().max().item()
        assert err <= base + _tol(name, r, dtype), f"{name}: {err:.3g} > {base:.3g} + tol"


def _inputs(dtype, *, bias, ignore, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, D, generator=g, dtype=torch.float64) / D**0.25
    c = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.25
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    if ignore:
        t[torch.rand(n, generator=g) < 0.3] = -100
    return [x if x is None else x.to(dtype) for x in (e, c, b)], t


def _ce_objective(fn, xs, t, dtype, reduction, return_lse):
    """[loss, lse?, dE, dC, dbias?] (float64) of a fixed objective of fn(e, c, b)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in xs if x is not None]
    e, c = leaves[:2]
    b = leaves[2] if len(leaves) == 3 else None
    loss, lse = fn(e, c, b)
    if reduction == "none":
        obj = (loss.double() * torch.linspace(-1.0, 2.0, loss.numel(), dtype=torch.float64)).sum()
    else:
        obj = 1.7 * loss.double()
    if return_lse:
        obj = obj + 1e-2 * (lse.double() ** 2).sum()
    grads = torch.autograd.grad(obj, leaves)
    return [x.detach().double() for x in ((loss, lse) if return_lse else (loss,)) + grads]


def _torch_same(t, **kw):
    """Logits in the input dtype, then the reference's loss maths in fp32 (an identity head)."""

    def fn(e, c, b):
        z = e @ c.T if b is None else e @ c.T + b  # (N, V) in the input dtype
        eye = torch.eye(z.shape[1], dtype=torch.float32)
        return reference_linear_cross_entropy(z.float(), eye, t, None, **kw)

    return fn


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    ("reduction", "return_lse", "softcap", "bias", "ignore", "extra"),
    [
        ("mean", False, None, False, False, {}),
        ("mean", False, None, True, True, {}),
        ("sum", False, 5.0, True, True, {}),
        ("none", True, None, True, True, {}),
        ("none", False, 3.0, False, True, {}),
        ("mean", True, None, True, False, {"label_smoothing": 0.1, "z_loss": 1e-3}),
    ],
)
def test_ce_native_tolerance_rule(native, dtype, reduction, return_lse, softcap, bias, ignore,
                                  extra):  # fmt: skip
    xs, t = _inputs(dtype, bias=bias, ignore=ignore)
    kw = dict(reduction=reduction, return_lse=return_lse, softcap=softcap, **extra)

    def ours(e, c, b):
        out = linear_cross_entropy_impl(e, c, t, b, impl="chunked", chunk_size=CHUNK, **kw)
        return out if return_lse else (out, None)

    def ref(e, c, b):
        return reference_linear_cross_entropy(e, c, t, b, compute_dtype=torch.float64, **kw)

    got = _ce_objective(ours, xs, t, dtype, reduction, return_lse)
    same = _ce_objective(_torch_same(t, **kw), xs, t, dtype, reduction, return_lse)
    want = _ce_objective(ref, xs, t, torch.float64, reduction, return_lse)
    names = ["loss"] + ["lse"] * return_lse + ["dE", "dC"] + ["dbias"] * bias
    assert got[0].dtype == torch.float64 and len(got) == len(names)
    _assert_rule(names, got, same, want, dtype)


def _kd_rule(name, dtype, reduction):
    g = torch.Generator().manual_seed(3)
    n, dt = 53, 11
    e_s, w_s = torch.randn(n, D, generator=g), 0.5 * torch.randn(V, D, generator=g)
    e_t, w_t = torch.randn(n, dt, generator=g), 0.7 * torch.randn(V, dt, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    y[::7] = -100
    fused = fused_divergence(name)
    kw = dict(temperature=2.0, hard_weight=0.2, reduction=reduction)
    row_w = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)  # arbitrary grad_outputs

    def run(dtype, fn):
        es, ws = (x.to(dtype).requires_grad_() for x in (e_s, w_s))
        loss = fn(es, ws, e_t.to(dtype), w_t.to(dtype))
        obj = (loss.double() * row_w).sum() if reduction == "none" else loss
        es_grad, ws_grad = torch.autograd.grad(obj, (es, ws))
        return [loss.double(), es_grad.double(), ws_grad.double()]

    ref = run(torch.float64, lambda *x: reference_linear_kd(*x, y, fused, **kw))
    same = run(dtype, lambda *x: reference_linear_kd(*x, y, fused, compute_dtype=dtype, **kw))
    got = run(dtype, lambda *x: linear_kd_impl(*x, y, fused, chunk_size=CHUNK, **kw))
    assert torch.isfinite(got[0]).all()
    _assert_rule(["loss", "dE", "dC"], got, same, ref, dtype)


@pytest.mark.parametrize("name", fused_divergence_names())
def test_kd_native_tolerance_rule(native, name):
    """Every fused divergence, bf16, T=2 with a hard-label term, ignored rows, several chunks."""
    _kd_rule(name, torch.bfloat16, "mean")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("name", ["forward_kl", "js", "akl"])
def test_kd_native_reductions(native, name, reduction, dtype):
    """Per-row losses (the backward recomputes the chunks, teacher included) and sums, fp16 too."""
    _kd_rule(name, dtype, reduction)


@pytest.mark.parametrize("dtype", HALF)
def test_ce_native_many_chunks_keeps_dc_in_fp32(native, dtype):
    """200 chunks of 2 rows: dC sums 200 rounded GEMM outputs, in fp32 (a running sum in the
    input dtype would round 200 times at the sum's scale and break the rule)."""
    xs, t = _inputs(dtype, bias=True, ignore=False, n=400)
    kw = dict(reduction="sum", return_lse=False, softcap=None)

    def ours(e, c, b):
        return linear_cross_entropy_impl(e, c, t, b, impl="chunked", chunk_size=2, **kw), None

    def ref(e, c, b):
        return reference_linear_cross_entropy(e, c, t, b, compute_dtype=torch.float64, **kw)

    got = _ce_objective(ours, xs, t, dtype, "sum", False)
    same = _ce_objective(_torch_same(t, **kw), xs, t, dtype, "sum", False)
    want = _ce_objective(ref, xs, t, torch.float64, "sum", False)
    _assert_rule(["loss", "dE", "dC", "dbias"], got, same, want, dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("want", ["both", "dE", "dC"])
def test_ce_native_vocab_blocks_sum_in_fp32(native, monkeypatch, dtype, want):
    """dE and dC come from 8-row vocabulary blocks (129 of them, the last of 7 rows): dE sums
    129 rounded GEMM outputs, in fp32 (a running sum in the input dtype would break the rule),
    also when only one of the two gradients is wanted."""
    monkeypatch.setattr(chunking.ChunkLoss, "v_block", 8)
    xs, t = _inputs(dtype, bias=False, ignore=True)
    kw = dict(reduction="sum", return_lse=False, softcap=None)
    grad_e, grad_c = want in ("both", "dE"), want in ("both", "dC")

    def objective(fn, dt):
        e, c = (x.detach().to(dt).requires_grad_(g) for x, g in zip(xs[:2], (grad_e, grad_c)))
        loss = fn(e, c)
        loss = loss[0] if isinstance(loss, tuple) else loss
        leaves = [x for x in (e, c) if x.requires_grad]
        return [loss.double(), *(g.double() for g in torch.autograd.grad(loss, leaves))]

    got = objective(
        lambda e, c: linear_cross_entropy_impl(e, c, t, impl="chunked", chunk_size=CHUNK, **kw),
        dtype,
    )
    same = objective(lambda e, c: _torch_same(t, **kw)(e, c, None), dtype)
    want_ = objective(
        lambda e, c: reference_linear_cross_entropy(e, c, t, compute_dtype=torch.float64, **kw),
        torch.float64,
    )
    names = ["loss"] + ["dE"] * grad_e + ["dC"] * grad_c
    _assert_rule(names, got, same, want_, dtype)


def test_native_makes_no_fp32_copies_and_matches_upcast(monkeypatch):
    """The native path hands the half inputs to the sweep as they are; the upcast path fp32
    copies; both agree to bf16 rounding."""
    xs, t = _inputs(torch.bfloat16, bias=True, ignore=True)
    seen = []
    sweep = chunking._sweep

    def spy(e, c, bias, *args, **kw):
        seen.append((e.dtype, c.dtype, kw.get("native", False) or (len(args) > 6 and args[6])))
        return sweep(e, c, bias, *args, **kw)

    monkeypatch.setattr(chunking, "_sweep", spy)
    out = {}
    for path in chunking.HALF_PATHS:
        monkeypatch.setenv(chunking.HALF_PATH_ENV, path)
        leaves = [x.clone().requires_grad_() for x in xs]
        loss = linear_cross_entropy_impl(
            *leaves[:2], t, leaves[2], impl="chunked", chunk_size=CHUNK
        )
        loss.backward()
        out[path] = [loss.detach()] + [x.grad.float() for x in leaves]
        assert all(x.grad.dtype == torch.bfloat16 for x in leaves) and loss.dtype == torch.float32
    assert seen == [(torch.float32, torch.float32, False), (torch.bfloat16, torch.bfloat16, True)]
    for a, b in zip(out["upcast"], out["native"], strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def _choice(e, c=None, bias=None, vocab=None):
    loss = CrossEntropyChunk(torch.zeros(1, dtype=torch.int64), None, False)
    loss.vocab = vocab
    return chunking.half_path(e, e if c is None else c, bias, loss)


def test_dispatch_on_capability_and_override(monkeypatch, caplog):
    bf16 = torch.zeros(2, 3, dtype=torch.bfloat16)
    monkeypatch.delenv(chunking.HALF_PATH_ENV, raising=False)
    monkeypatch.setattr(chunking, "cpu_flags", lambda: frozenset({"avx512f", "avx2"}))
    path, why = chunking.cpu_half_path(torch.bfloat16)
    assert path == "upcast" and "avx512_bf16" in why
    monkeypatch.setattr(chunking, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert chunking.cpu_half_path(torch.bfloat16)[0] == "native"
    assert chunking.cpu_half_path(torch.float16)[0] == "upcast"  # no avx512_fp16 / amx_fp16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert chunking.cpu_half_path(torch.bfloat16) == ("upcast", "ATen CPU capability AVX2 "
                                                      "(needs AVX512 kernels)")  # fmt: skip
    assert chunking.cpu_half_path(torch.float32)[0] == "upcast"
    monkeypatch.setenv(chunking.HALF_PATH_ENV, "native")
    assert chunking.cpu_half_path(torch.bfloat16) == ("native", "KERNELS_CPU_HALF_PATH=native")
    # what half_path adds: fp32 / mixed dtypes / vocabulary shards never go native
    assert _choice(torch.zeros(2, 3))[0] == "upcast"
    assert _choice(bf16, bf16.float())[1] == "mixed input dtypes"
    assert "vocabulary-parallel" in _choice(bf16, vocab=object())[1]
    monkeypatch.setattr(chunking, "_logged", set())
    with caplog.at_level(logging.INFO, logger="kernels.chunking"):
        for _ in range(3):
            assert _choice(bf16) == ("native", "KERNELS_CPU_HALF_PATH=native")
    assert len([r for r in caplog.records if "native path" in r.getMessage()]) == 1  # once
    monkeypatch.setenv(chunking.HALF_PATH_ENV, "fast")
    with pytest.raises(ValueError, match="KERNELS_CPU_HALF_PATH must be one of"):
        chunking.cpu_half_path(torch.bfloat16)


@pytest.mark.parametrize("memory_target", [1.25, 2.0])
def test_native_chunk_size_counts_half_buffers(memory_target):
    """CE at the main shape: the half (chunk, V) buffer is 2 bytes an element, so after the fp32
    sub-block and dC staging buffers (16 MiB) it and the dE buffers hold nearly the fp32 path's
    chunk rows (120 and 904 rows against its 128 and 536 at the two targets)."""
    n, v, d = 4096, 65536, 512
    rows32 = chunking.pick_chunk_size(n, v, d, torch.bfloat16, 1, memory_target)
    rows, sub, v_block = chunking.native_plan(n, v, d, 1, 1, memory_target)
    assert (sub, v_block) == (chunking.SUB_ROWS, chunking.V_BLOCK)
    work = sub * v * 4 + v_block * d * 6
    assert rows == (rows32 * v * 4 - work) // (v * 2 + chunking.DE_ROW_BYTES * d) // 8 * 8
    assert rows >= 0.9 * rows32


@pytest.mark.parametrize("memory_target", [1.25, 2.0])
@pytest.mark.parametrize("n_buffers", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("v", [1031, 32768, 65536])
def test_native_work_buffers_stay_inside_the_fp32_buffers(n_buffers, v, memory_target):
    """The fp32 sub-block and dC staging buffers plus the chunk's half and dE buffers never take
    more than the fp32 path's own (chunk, V) buffers at the same memory_target (whose rows are
    rounded down, so a plan sized by the budget alone overshot them: KD's AKL peaked 1 MB above
    its fp32 run), for divergences with many (s, V) buffers too (KD's JS and AKL): the sub-blocks
    and dC blocks shrink instead of the budget growing."""
    n, d = 4096, 512
    rows32 = chunking.pick_chunk_size(n, v, d, torch.bfloat16, n_buffers, memory_target)
    fp32_bytes = rows32 * v * 4 * n_buffers
    assert fp32_bytes <= chunking.chunk_budget(n, v, d, torch.bfloat16, memory_target)
    rows, sub, v_block = chunking.native_plan(n, v, d, n_buffers, 2, memory_target)
    work = sub * v * 4 * n_buffers + min(v_block, v) * d * 6
    assert 1 <= sub <= chunking.SUB_ROWS and 1024 <= v_block <= chunking.V_BLOCK
    half_bytes = rows * (v * 2 * 2 + chunking.DE_ROW_BYTES * d)
    assert work + half_bytes <= fp32_bytes or rows == 1 or rows32 == n
    if n_buffers == 1 and v == 65536:  # CE at the main shape keeps the full blocks
        assert (sub, v_block) == (chunking.SUB_ROWS, chunking.V_BLOCK)


def test_native_kd_sweep_uses_the_planned_sub_blocks(monkeypatch):
    """A many-buffer divergence on the native path runs with the sub-block rows native_plan chose
    (not the SUB_ROWS default): the plan is applied, not just computed."""
    monkeypatch.setenv(chunking.HALF_PATH_ENV, "native")
    seen = []

    class Spy(chunking._HalfGrads):
        def __init__(self, c, v_block=chunking.V_BLOCK, *args, **kw):
            seen.append(v_block)
            super().__init__(c, v_block, *args, **kw)

    monkeypatch.setattr(chunking, "_HalfGrads", Spy)
    n, v, d = 64, 65536, 16
    g = torch.Generator().manual_seed(0)
    e = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    c = (torch.randn(v, d, generator=g) * 0.1).bfloat16().requires_grad_()
    loss = chunking.ChunkLoss()
    loss.n_buffers = 8
    rows, sub, v_block = chunking.native_plan(n, v, d, 8, 1, chunking.MEMORY_TARGET)
    assert sub < chunking.SUB_ROWS  # the shape is chosen so that the plan shrinks
    subs = []

    def chunk(z, rows, w):
        subs.append(z.shape[0])
        return (z.logsumexp(1),), (None if w is None else torch.softmax(z, 1))

    loss.chunk = chunk
    out = chunking.fused_linear_loss(e, c, None, None, loss)[0]
    out.backward()
    assert max(subs) == sub and seen == [v_block]


@pytest.mark.parametrize("shape", [(16, 65536), (8, 1031), (3, 7), (1, 1)])
def test_softmax_in_place_is_exact(shape):
    """The native CE sub-block relies on ATen's row-wise softmax being exact in place
    (``out=`` its input): guards that assumption against a change in torch."""
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 7
    ref = torch.softmax(z, 1)
    torch.softmax(z, 1, out=z)
    assert torch.equal(z, ref)


@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_ce_native_underflowed_target_probability(native, softcap, reduction):
    """Rows whose target probability underflows fp32 (target logit ~150 below the others):
    the native path's LSE from log p_target would be inf; those rows take the exact LSE, and
    loss and gradients keep the CCE authors' rule against fp64."""
    n, v, d = 40, 1031, 8
    g = torch.Generator().manual_seed(3)
    e = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.randn(v, d, generator=g, dtype=torch.float64)
    t = torch.randint(0, v, (n,), generator=g)
    e[:, 0], c[:, 0] = 4.0, 10.0  # every logit near +40 ...
    c[t[::3], 0] = -30.0  # ... but a third of the rows' targets near -120: p_t ~ e^-160
    xs = [e.bfloat16(), c.bfloat16()]
    kw = dict(softcap=softcap, reduction=reduction, return_lse=True)

    def ours(e_, c_, b_):
        return linear_cross_entropy_impl(e_, c_, t, impl="chunked", chunk_size=CHUNK, **kw)

    def exact(e_, c_, b_):
        return reference_linear_cross_entropy(e_, c_, t, compute_dtype=torch.float64, **kw)

    got = _ce_objective(ours, xs, t, torch.bfloat16, reduction, True)
    assert all(torch.isfinite(x).all() for x in got)
    z = xs[0].double() @ xs[1].double().T
    p_t = torch.softmax(z if softcap is None else softcap * torch.tanh(z / softcap), 1)[
        torch.arange(n), t
    ]
    assert (p_t < 1e-30).sum() >= 5  # rows that take the exact LSE are there
    same = _ce_objective(_torch_same(t, **kw), xs, t, torch.bfloat16, reduction, True)
    ref = _ce_objective(exact, xs, t, torch.float64, reduction, True)
    _assert_rule(["loss", "lse", "dE", "dC"], got, same, ref, torch.bfloat16)
