"""Cut Cross-Entropy, CPU paths: chunked vs a float64 materialised reference, the front door,
validation, and a peer (cut_cross_entropy). Wijmans et al. 2024, arXiv 2411.09009."""

from __future__ import annotations

import math

import pytest
import torch

from core.losses import LOSSES, LinearCrossEntropy, linear_cross_entropy
from kernels.cce.reference import reference_linear_cross_entropy
from kernels.chunking import MEMORY_TARGET, pick_chunk_size
from tests.kernels.cce_helpers import (
    assert_tolerance_rule,
    impl_fn,
    loss_and_grads,
    make_inputs,
    ref_fn,
)

N, V, D = 257, 1031, 67


def _parity(dtype, *, reduction, return_lse, softcap=None, bias=False, ignore="some", chunk=50):
    e, c, t, b = make_inputs(N, V, D, dtype, bias=bias, ignore=ignore)
    kw = dict(reduction=reduction, return_lse=return_lse)
    got = loss_and_grads(
        impl_fn("chunked", softcap=softcap, chunk_size=chunk, **kw), e, c, t, b, **kw
    )
    same = loss_and_grads(ref_fn(softcap=softcap, **kw), e, c, t, b, **kw)
    ref64 = loss_and_grads(
        ref_fn(softcap=softcap, compute_dtype=torch.float64, **kw),
        e,
        c,
        t,
        b,
        dtype=torch.float64,
        **kw,
    )
    names = ["loss"] + (["lse"] if return_lse else []) + ["dE", "dC"] + (["dbias"] if bias else [])
    assert_tolerance_rule(got, same, ref64, dtype, names)
    return got, ref64


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("return_lse", [False, True])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_chunked_fp32_parity(reduction, return_lse, softcap):
    _parity(torch.float32, reduction=reduction, return_lse=return_lse, softcap=softcap, bias=True)


@pytest.mark.parametrize(
    ("dtype", "ignore", "reduction"),
    [
        (torch.bfloat16, "none", "mean"),
        (torch.bfloat16, "some", "none"),
        (torch.float16, "some", "sum"),
    ],
)
def test_chunked_half_parity_and_grad_dtype(dtype, ignore, reduction):
    _parity(dtype, reduction=reduction, return_lse=True, ignore=ignore, bias=True)
    e, c, t, _ = make_inputs(N, V, D, dtype)
    e.requires_grad_()
    linear_cross_entropy(e, c, t).backward()
    assert e.grad.dtype == dtype


@pytest.mark.parametrize("chunk", [7, 1000])
def test_chunked_float64_is_exact_for_any_chunk_size(chunk):
    got, ref64 = _parity(
        torch.float64, reduction="none", return_lse=True, softcap=3.0, bias=True, chunk=chunk
    )
    for x, r in zip(got, ref64, strict=True):
        torch.testing.assert_close(x, r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grads(reduction):
    e, c, t, b = make_inputs(33, 70, 16, torch.float32, bias=True, ignore="all")
    kw = dict(reduction=reduction, return_lse=False)
    loss, de, dc, db = loss_and_grads(impl_fn("chunked", **kw), e, c, t, b, **kw)
    for x in (loss, de, dc, db):
        assert torch.isfinite(x).all() and (x == 0).all()


def test_shift_matches_manual_shift_and_peer_layout():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(3, 37, 24, generator=g)
    c = torch.randn(150, 24, generator=g) / 3
    t = torch.randint(0, 150, (3, 37), generator=g)
    t[1, 4:9] = -100
    loss = linear_cross_entropy(e, c, t, shift=True, reduction="none")
    assert loss.shape == (3, 36)
    ref, _ = reference_linear_cross_entropy(
        e[:, :-1].reshape(-1, 24), c, t[:, 1:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss, ref.view(3, 36), rtol=1e-5, atol=1e-5)
    mean = linear_cross_entropy(e, c, t, shift=True)
    torch.testing.assert_close(mean, ref.sum() / (t[:, 1:] != -100).sum(), rtol=1e-5, atol=1e-6)


def test_peer_torch_compile_parity():
    peer = pytest.importorskip("cut_cross_entropy")
    g = torch.Generator().manual_seed(2)
    e0 = torch.randn(2, 41, 32, generator=g)
    c0 = torch.randn(301, 32, generator=g) / 4
    t = torch.randint(0, 301, (2, 41), generator=g)
    t[0, :6] = -100
    outs = []
    for fn in (peer.linear_cross_entropy, linear_cross_entropy):
        e, c = e0.clone().requires_grad_(), c0.clone().requires_grad_()
        extra = {"impl": "torch_compile"} if fn is peer.linear_cross_entropy else {}
        loss = fn(e, c, t, softcap=5.0, shift=True, reduction="none", **extra)
        loss.sum().backward()
        outs.append((loss.detach(), e.grad, c.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_front_door_module_and_registry_agree():
    e, c, t, b = make_inputs(40, 90, 12, torch.float32, bias=True)
    f = linear_cross_entropy(e, c, t, bias=b, softcap=2.0, reduction="sum")
    m = LinearCrossEntropy(softcap=2.0, reduction="sum")(e, c, t, b)
    r = LOSSES.get("linear_cross_entropy")(e, c, t, bias=b, softcap=2.0, reduction="sum")
    ref, _ = reference_linear_cross_entropy(e, c, t, b, softcap=2.0, reduction="sum")
    assert f.item() == m.item() == r.item()
    torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # inference path: no gradient buffers, same loss
        assert (
            linear_cross_entropy(e, c, t, bias=b, softcap=2.0, reduction="sum").item() == f.item()
        )


def test_eager_backward_hands_over_buffers_scales_and_refuses_a_second_call():
    e, c, t, _ = make_inputs(30, 50, 8, torch.float64)
    e.requires_grad_()
    loss = linear_cross_entropy(e, c, t)
    stored = loss.grad_fn.grads[0].data_ptr()  # the dE buffer computed during the forward
    (3.0 * loss).backward(retain_graph=True)
    assert e.grad.data_ptr() == stored  # no gradient-sized copy in backward
    ref_e = e.detach().clone().requires_grad_()
    (3.0 * reference_linear_cross_entropy(ref_e, c, t)[0]).backward()
    torch.testing.assert_close(e.grad, ref_e.grad)
    with pytest.raises(RuntimeError, match="backward called twice"):
        loss.backward()


def test_chunk_size_respects_memory_budget():
    n, v, d = 4096, 65536, 512
    rows = pick_chunk_size(n, v, d, torch.float32)
    grad_bytes = (n + v) * d * 4
    assert rows >= 64 and grad_bytes + rows * v * 4 <= MEMORY_TARGET * grad_bytes
    assert pick_chunk_size(n, v, d, torch.float32, n_buffers=2) <= rows // 2
    assert pick_chunk_size(5, 10, 3, torch.float32) == 5
    wide = pick_chunk_size(n, v, d, torch.float32, memory_target=1.5)
    assert wide >= 2 * rows - 16 and grad_bytes + wide * v * 4 <= 1.5 * grad_bytes
    with pytest.raises(ValueError, match="memory_target"):
        pick_chunk_size(n, v, d, torch.float32, memory_target=0.9)


def test_memory_target_changes_chunks_not_results(monkeypatch):
    """A larger memory_target means fewer, bigger chunks and the same loss and gradients."""
    import kernels.chunking as chunked

    seen = []
    sweep = chunked._sweep

    def spy(*args, **kwargs):
        seen.append(args[6])  # chunk_size
        return sweep(*args, **kwargs)

    monkeypatch.setattr(chunked, "_sweep", spy)
    e, c, t, _ = make_inputs(300, 5000, 16, torch.float64)
    # tiny shapes hit the 8 MiB floor; shrink it so the targets decide the chunk size
    monkeypatch.setattr(chunked, "MIN_CHUNK_BUDGET_BYTES", 1)
    monkeypatch.setattr(chunked, "SAFETY_BYTES", 0)
    out = {}
    for target in (1.1, 3.0):
        ee, cc = e.clone().requires_grad_(), c.clone().requires_grad_()
        loss = linear_cross_entropy(ee, cc, t, impl="chunked", memory_target=target)
        loss.backward()
        out[target] = (loss.detach(), ee.grad, cc.grad)
    assert seen[0] < seen[1] <= 300
    for a, b in zip(out[1.1], out[3.0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    ref, _ = reference_linear_cross_entropy(e, c, t)
    torch.testing.assert_close(out[3.0][0], ref, rtol=1e-12, atol=1e-14)


def test_sgd_training_step_matches_reference():
    torch.manual_seed(3)
    vocab, dim = 97, 16

    def make():
        torch.manual_seed(3)
        return torch.nn.ModuleDict(
            {"emb": torch.nn.Embedding(vocab, dim), "head": torch.nn.Linear(dim, vocab)}
        )

    tokens = torch.randint(0, vocab, (4, 23))
    models = {}
    for impl in ("chunked", "reference"):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            h = torch.tanh(model["emb"](tokens))  # (B, T, dim)
            head = model["head"]
            loss = linear_cross_entropy(
                h, head.weight, tokens, bias=head.bias, shift=True, impl=impl
            )
            loss.backward()
            opt.step()
        models[impl] = model
    for (name, p), q in zip(
        models["chunked"].named_parameters(), models["reference"].parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    e, c, t, _ = make_inputs(8, 20, 4, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        linear_cross_entropy(e, c, t, impl="triton")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"c": torch.zeros(20, 5)}, "hidden size mismatch"),
        ({"t": torch.full((8,), 20)}, r"\[0, 20\).*found 20"),
        ({"t": torch.full((8,), -3)}, "found -3"),
        ({"t": torch.zeros(8)}, "integer class ids"),
        ({"t": torch.zeros(9, dtype=torch.long)}, "leading dims"),
        ({"e": torch.zeros(8, 4, dtype=torch.long)}, "float dtype"),
        ({"c": torch.zeros(20, 4, dtype=torch.float64)}, "float dtype"),
        ({"b": torch.zeros(21)}, r"bias \(21,\)"),
        ({"c": torch.zeros(20, 4, device="meta")}, "one device"),
        ({"e": torch.zeros(8, 4).numpy()}, "e must be a torch.Tensor"),
        ({"c": torch.zeros(0, 4)}, "V >= 1"),
        ({"reduction": "avg"}, "reduction"),
        ({"impl": "cuda"}, "impl"),
        ({"ignore_index": None}, "ignore_index"),
        ({"ignore_index": -100.0}, "ignore_index"),
        ({"softcap": 0.0}, "softcap"),
        ({"softcap": float("inf")}, "softcap"),
        ({"softcap": float("nan")}, "softcap"),
        ({"softcap": "30"}, "softcap"),
        ({"filter_eps": -1}, "filter_eps"),
        ({"filter_eps": float("nan")}, "filter_eps"),
        ({"filter_eps": True}, "filter_eps"),
        ({"filter_eps": 1e9}, "filter_eps"),
        ({"filter_eps": "low"}, "filter_eps"),
        ({"shift": -1}, "shift"),
        ({"shift": 1.5}, "shift"),
        ({"return_lse": "yes"}, "return_lse"),
        ({"memory_target": 1.0}, "memory_target"),
        ({"memory_target": float("inf")}, "memory_target"),
        ({"memory_target": "1.5"}, "memory_target"),
        ({"memory_target": 1.5, "impl": "reference"}, "memory_target"),
        ({"label_smoothing": 1.5}, r"label_smoothing must be a number in \[0, 1\]"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"label_smoothing": "0.1"}, "label_smoothing"),
        ({"z_loss": -1e-4}, "z_loss must be a finite number >= 0"),
        ({"z_loss": float("inf")}, "z_loss"),
        ({"process_group": "world"}, "process_group must be a torch.distributed ProcessGroup"),
    ],
)
def test_bad_inputs_raise_a_named_error(kwargs, match):
    args = {"e": torch.zeros(8, 4), "c": torch.zeros(20, 4), "t": torch.zeros(8, dtype=torch.long)}
    args["b"] = None
    keys = ("reduction", "impl", "softcap", "memory_target", "ignore_index", "filter_eps",
            "label_smoothing", "z_loss", "process_group")  # fmt: skip
    opts = {k: kwargs.pop(k) for k in (*keys, "shift", "return_lse") if k in kwargs}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        linear_cross_entropy(args["e"], args["c"], args["t"], bias=args["b"], **opts)


def test_shift_beyond_the_time_axis_is_refused():
    e, c, t = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"shift must lie in \[0, T\) = \[0, 3\)"):
        linear_cross_entropy(e, c, t, shift=3)


@pytest.mark.parametrize("k", [2, 4])
def test_integer_shift_k_predicts_k_steps_ahead(k):
    """shift=k (the authors' bool | int): e[..., :-k, :] predicts targets[..., k:]."""
    g = torch.Generator().manual_seed(4)
    e = torch.randn(4, 16, 6, generator=g, dtype=torch.float64)
    c = torch.randn(30, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 30, (4, 16), generator=g)
    t[0, 9] = -100
    loss = linear_cross_entropy(e, c, t, shift=k, reduction="none")
    assert loss.shape == (4, 16 - k)
    ref, _ = reference_linear_cross_entropy(
        e[:, :-k].reshape(-1, 6), c, t[:, k:].reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss, ref.view(4, 16 - k), rtol=1e-12, atol=1e-12)
    mean = linear_cross_entropy(e, c, t, shift=k)
    torch.testing.assert_close(mean, ref.sum() / (t[:, k:] != -100).sum(), rtol=1e-12, atol=0)


def test_uint8_targets_keep_every_class():
    """ignore_index=-100 must not wrap to 156 in uint8: class 156 counts (byte-level LMs)."""
    e, c, _, _ = make_inputs(8, 200, 5, torch.float64, ignore="none")
    t = torch.full((8,), 156, dtype=torch.uint8)
    got = linear_cross_entropy(e, c, t)
    want, _ = reference_linear_cross_entropy(e, c, t.long())
    assert want > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_half_inputs_return_a_finite_fp32_loss(reduction):
    """fp16: per-token losses ~1e5 and their sum overflow fp16 (max 65504); the loss is fp32."""
    g = torch.Generator().manual_seed(5)
    e = torch.randn(64, 8, generator=g, dtype=torch.float64) * 100
    c = torch.randn(50, 8, generator=g, dtype=torch.float64) * 100
    t = torch.randint(0, 50, (64,), generator=g)
    got = linear_cross_entropy(e.half(), c.half(), t, reduction=reduction)
    want, _ = reference_linear_cross_entropy(
        e.half(), c.half(), t, reduction=reduction, compute_dtype=torch.float64
    )
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert want.max() > 65504  # the fp16 maximum
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def test_double_backward_is_refused():
    """The fused loss is differentiable once: a gradient penalty must fail, not drop a term."""
    e, c, t, _ = make_inputs(10, 30, 4, torch.float64)
    e.requires_grad_()
    for reduction in ("mean", "none"):
        loss = linear_cross_entropy(e, c, t, reduction=reduction, impl="chunked").sum()
        with pytest.raises(RuntimeError, match="differentiable once"):
            torch.autograd.grad(loss, e, create_graph=True)


def test_empty_rows_and_empty_hidden_size():
    """N = 0: zero loss / empty per-token loss; D = 0: every logit is 0 (+ bias), loss log V."""
    c = torch.randn(7, 3, dtype=torch.float64)
    e0 = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    t0 = torch.zeros(0, dtype=torch.long)
    assert linear_cross_entropy(e0, c, t0).item() == 0.0
    assert linear_cross_entropy(e0, c, t0, reduction="none").shape == (0,)
    e = torch.zeros(4, 0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64)
    t = torch.tensor([0, 3, 6, -100])
    loss = linear_cross_entropy(e, torch.zeros(7, 0, dtype=torch.float64), t, bias=b)
    want = (torch.logsumexp(b, 0) - b[t[:3]]).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert e.grad.shape == (4, 0)


def test_auto_never_uses_the_materialised_reference(monkeypatch):
    import kernels.cce.api as api

    def boom(*args, **kwargs):
        raise AssertionError("impl='auto' called the materialised reference")

    monkeypatch.setattr(api, "reference_linear_cross_entropy", boom)
    e, c, t, _ = make_inputs(20, 30, 6, torch.float32)
    ref, _ = reference_linear_cross_entropy(e, c, t)
    torch.testing.assert_close(linear_cross_entropy(e, c, t), ref)
    with pytest.raises(AssertionError, match="materialised"):
        linear_cross_entropy(e, c, t, impl="reference")


def _torch_ce(label_smoothing, z_loss, softcap, reduction):
    """(e, c, t, b) -> (loss, lse): torch.nn.functional.cross_entropy (label smoothing) on the
    materialised float64 logits plus z_loss * lse^2 per non-ignored token."""

    def fn(e, c, t, b):
        z = e @ c.T + b
        z = softcap * torch.tanh(z / softcap)
        keep = t != -100
        lse = torch.where(keep, z.logsumexp(-1), 0.0)
        ce = torch.nn.functional.cross_entropy(
            z, t, label_smoothing=label_smoothing, reduction="none"
        )
        rows = ce + z_loss * lse**2
        n = keep.sum().clamp_min(1)
        loss = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / n}[reduction]
        if reduction == "mean":  # torch's own mean, smoothing included, must agree
            want = torch.nn.functional.cross_entropy(z, t, label_smoothing=label_smoothing)
            torch.testing.assert_close(loss - z_loss * (lse**2).sum() / n, want)
        return loss, lse

    return fn


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("label_smoothing", "z_loss"), [(0.1, 0.0), (0.0, 1e-2), (0.3, 0.2)])
def test_label_smoothing_and_z_loss_match_torch(impl, reduction, label_smoothing, z_loss):
    e, c, t, b = make_inputs(N, V, D, torch.float64, bias=True)
    kw = dict(reduction=reduction, return_lse=True)
    opts = dict(label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=50)
    if impl == "reference":
        opts.pop("chunk_size")
    got = loss_and_grads(impl_fn(impl, softcap=3.0, **opts, **kw), e, c, t, b, **kw)
    want = loss_and_grads(_torch_ce(label_smoothing, z_loss, 3.0, reduction), e, c, t, b, **kw)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12)


def test_label_smoothing_and_z_loss_one_token_by_hand():
    """Logits (1, 0, -1), target 0, eps 0.3, z-loss 0.1: loss and d/dz by hand."""
    e = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[1.0], [0.0], [-1.0]], dtype=torch.float64)
    lse = math.log(math.e + 1 + 1 / math.e)  # 1.4076059644...
    want = 0.7 * (lse - 1.0) + 0.3 * (lse - 0.0) + 0.1 * lse**2
    p = [math.exp(z - lse) for z in (1.0, 0.0, -1.0)]
    # d/dz_j = p_j (1 + 2 * 0.1 * lse) - 0.7 [j = 0] - 0.3 / 3; d/de = sum_j d/dz_j * c_j
    dz = [pj * (1 + 0.2 * lse) - 0.1 - (0.7 if j == 0 else 0.0) for j, pj in enumerate(p)]
    loss = linear_cross_entropy(e, c, torch.tensor([0]), label_smoothing=0.3, z_loss=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(want, rel=1e-14)
    assert e.grad.item() == pytest.approx(dz[0] - dz[2], rel=1e-13)
