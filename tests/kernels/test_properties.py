"""Property tests of the fused losses (hypothesis): ``linear_cross_entropy`` (chunked) and
``linear_kd_loss`` under random shapes (empty ones included), dtypes, strides, ignore masks,
target dtypes, shifts, options and extreme magnitudes. Every call either raises ValueError /
TypeError whose message names the argument, or matches a float64 materialised reference on the
very values the inputs hold: loss and gradients, by the tolerance rule
|impl - ref64| <= |torch_same_dtype - ref64| + tol. For KD, the fused loss refuses exactly the
hyperparameters its unfused definition refuses. Sized for well under 60 s on 2 cores.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from core.losses import get_divergence, linear_cross_entropy, linear_kd_loss
from core.losses.linear_kd import fused_divergence_names
from kernels.cce.reference import reference_linear_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOL = {torch.float16: 5e-3, torch.bfloat16: 5e-3, torch.float32: 2e-5, torch.float64: 1e-10}


def _named(err: Exception, *names: str) -> bool:
    return re.search(r"\b(" + "|".join(map(re.escape, names)) + r")\b", str(err)) is not None


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values contiguous, column-major (2-D) or every other element."""
    if kind == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if kind == "strided" and t.dim() >= 1:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _rule(got, same, ref, dtype, mag: float = 1.0) -> None:
    """The CCE authors' tolerance rule on the max over each tensor; tol scales with the tensor's
    magnitude and ``mag``, the logits' (rounding in a log-sum-exp grows with them)."""
    for x, y, r in zip(got, same, ref, strict=True):
        x, y = x.double(), y.double()
        scale = max(1.0, mag, r.abs().max().item() if r.numel() else 0.0)
        err = (x - r).abs().max().item() if r.numel() else 0.0
        base = (y - r).abs().max().item() if r.numel() else 0.0
        assert err <= base + TOL[dtype] * scale, (err, base, dtype)


def _grads(loss, leaves):
    obj = loss.double().sum() if loss.dim() else loss.double()
    if not obj.requires_grad:
        return [torch.zeros_like(x) for x in leaves]
    return torch.autograd.grad(obj, leaves, allow_unused=True, materialize_grads=True)


@st.composite
def cce_cases(draw):
    b, t, v, d = (draw(st.integers(lo, hi)) for lo, hi in ((1, 3), (0, 9), (1, 40), (0, 9)))
    dtype = draw(st.sampled_from(FLOATS))
    scale = 10.0 ** draw(st.integers(-2, 1 if dtype in (torch.float16, torch.bfloat16) else 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    e = (torch.randn(b, t, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    c = (torch.randn(v, d, generator=g, dtype=torch.float64) / max(d, 1) ** 0.5).to(dtype)
    c = _layout(c, draw(st.sampled_from(["contiguous", "transposed", "strided"])))
    e = _layout(e, draw(st.sampled_from(["contiguous", "strided"])))
    tg = torch.randint(0, v, (b, t), generator=g)
    if draw(st.booleans()) and tg.numel():
        tg[torch.rand(b, t, generator=g) < 0.3] = -100
    tdtype = draw(st.sampled_from([torch.int64, torch.int32] + ([torch.uint8] if v <= 200 else [])))
    if tdtype == torch.uint8:
        tg[tg == -100] = 0  # uint8 cannot hold -100: every id counts
    tg = _layout(tg.to(tdtype), draw(st.sampled_from(["contiguous", "strided"])))
    bias = (
        (torch.randn(v, generator=g, dtype=torch.float64)).to(dtype)
        if draw(st.booleans())
        else None
    )
    opts = {
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "softcap": draw(st.sampled_from([None, None, 2.5, 30.0])),
        "shift": draw(st.sampled_from([False, True, 2])),
        "return_lse": draw(st.booleans()),
        "impl": "chunked",
    }
    refusals = ["ignore_index", "softcap", "reduction", "memory_target", "filter_eps", "shift"]
    bad = draw(st.sampled_from(refusals)) if draw(st.integers(0, 3)) == 0 else None
    if bad is not None:
        opts[bad] = {"ignore_index": None, "softcap": float("inf"), "reduction": "avg",
                     "memory_target": 0.5, "filter_eps": float("nan"), "shift": -1}[bad]  # fmt: skip
    else:
        opts["memory_target"] = draw(st.sampled_from([None, 1.1, 3.0]))
    return e, c, tg, bias, opts, bad


@settings(max_examples=400)
@given(cce_cases())
def test_linear_cross_entropy_matches_float64_or_refuses_by_name(case):
    e, c, t, bias, opts, bad = case
    k = int(opts["shift"]) if bad != "shift" else 0
    expected = {bad} - {None} | ({"shift"} if k and k >= t.shape[-1] else set())
    leaves = [x.detach().clone().requires_grad_() for x in (e, c)]
    try:
        out = linear_cross_entropy(leaves[0], leaves[1], t, bias=bias, **opts)
    except (ValueError, TypeError) as err:
        assert expected and _named(err, *expected), err
        event("refused")
        return
    assert not expected, f"{expected} accepted"
    loss, lse = out if opts["return_lse"] else (out, None)
    assert loss.dtype == (torch.float64 if e.dtype == torch.float64 else torch.float32)
    got = [loss.detach(), *_grads(loss, leaves)]
    d, tt = c.shape[1], t.long()
    tk = tt[:, k:] if k else tt

    def ref(dtype):
        xs = [x.detach().clone().to(dtype).requires_grad_() for x in (e, c)]
        ekk = xs[0][:, :-k] if k else xs[0]
        r, _ = reference_linear_cross_entropy(
            ekk.reshape(tk.numel(), d), xs[1], tk.reshape(-1), bias, softcap=opts["softcap"],
            reduction=opts["reduction"], compute_dtype=dtype,
        )  # fmt: skip
        r = r.view(tk.shape) if opts["reduction"] == "none" else r
        return [r.detach(), *_grads(r, xs)]

    assert got[0].shape == (tk.shape if opts["reduction"] == "none" else ())
    same = ref(torch.float32 if e.dtype == torch.float16 else e.dtype)  # CPU fp16 GEMMs: fp32
    z = e.double().flatten(0, -2) @ c.double().T  # (N, V) logits
    _rule(got, same, ref(torch.float64), e.dtype, mag=z.abs().max().item() if z.numel() else 0.0)
    event(f"compared {e.dtype}")
    if lse is not None:
        assert lse.shape == tk.shape and (lse[tk == -100] == 0).all()


@st.composite
def kd_cases(draw):
    n, v = draw(st.integers(0, 12)), draw(st.integers(2, 30))
    ds, dt = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from((torch.bfloat16, torch.float32, torch.float64)))
    scale = 10.0 ** draw(st.integers(-1, 1 if dtype == torch.bfloat16 else 2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    e_s = (torch.randn(n, ds, generator=g, dtype=torch.float64) * scale).to(dtype)
    w_s = torch.randn(v, ds, generator=g, dtype=torch.float64).to(dtype)
    e_t = torch.randn(n, dt, generator=g, dtype=torch.float64) * scale
    w_t = torch.randn(v, dt, generator=g, dtype=torch.float64)
    e_s = _layout(e_s, draw(st.sampled_from(["contiguous", "transposed", "strided"])))
    y = torch.randint(0, v, (n,), generator=g)
    if n and draw(st.booleans()):
        y[torch.rand(n, generator=g) < 0.3] = -100
    name = draw(st.sampled_from(fused_divergence_names()))
    hp = {}
    for key in {"js": ["beta"], "skew_kl": ["lam"], "skew_reverse_kl": ["lam"], "akl": ["mu"],
                "bdkd": ["lam"], "dkd": ["alpha", "beta", "warmup"]}.get(name, []):  # fmt: skip
        if draw(st.booleans()):
            hp[key] = draw(st.sampled_from([0.1, 0.3, 0.5, 0.9, -0.5, 0.0, 1.0, 2.0, float("nan")]))
    opts = {
        "divergence": name,
        "temperature": draw(st.sampled_from([0.5, 1.0, 2.0, 4.0, 1.0, 2.0, 0.0, -1.0])),
        "hard_weight": draw(st.sampled_from([0.0, 0.0, 0.3, 1.0, 0.0, 0.3, 1.5])),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "targets": None if draw(st.integers(0, 3)) == 0 and name != "dkd" else y,
    }
    return e_s, w_s, e_t.to(dtype), w_t.to(dtype), opts, hp


@settings(max_examples=400)
@given(kd_cases())
def test_linear_kd_loss_matches_float64_or_refuses_as_the_definition(case):
    e_s, w_s, e_t, w_t, opts, hp = case
    # the unfused definition is the oracle for the hyperparameters
    probe, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    try:
        get_divergence(opts["divergence"])(probe, probe.flip(0), targets=y, **hp)
        hp_error = None
    except (ValueError, TypeError) as err:
        hp_error = err
    bad = []
    if hp_error is not None:
        bad += list(hp)
    if not opts["temperature"] > 0:
        bad.append("temperature")
    if not 0 <= opts["hard_weight"] <= 1:
        bad.append("hard_weight")
    if opts["hard_weight"] > 0 and opts["targets"] is None:
        bad.append("targets")
    leaves = [x.detach().clone().requires_grad_() for x in (e_s, w_s)]
    try:
        loss = linear_kd_loss(leaves[0], leaves[1], e_t, w_t, **opts, **hp)
    except (ValueError, TypeError) as err:
        assert bad and _named(err, *bad), err
        event("refused")
        return
    assert not bad, f"{bad} accepted"
    assert loss.dtype == (torch.float64 if e_s.dtype == torch.float64 else torch.float32)
    got = [loss.detach(), *_grads(loss, leaves)]

    def ref(dtype):
        xs = [x.detach().clone().to(dtype).requires_grad_() for x in (e_s, w_s)]
        r = linear_kd_loss(
            xs[0], xs[1], e_t.to(dtype), w_t.to(dtype), impl="reference", **opts, **hp
        )
        return [r.detach(), *_grads(r, xs)]

    # bf16's own materialised loss still runs the divergence in fp32 (the reference's rule)
    same = ref(torch.float32 if e_s.dtype == torch.bfloat16 else e_s.dtype)
    ref64 = ref(torch.float64)
    if opts["divergence"] == "akl" and hp.get("mu") == 1.0:
        return  # mu = 1: which classes pass cumsum <= 1 turns on the cumsum's last bit
    z = torch.cat([e_s.double() @ w_s.double().T, e_t.double() @ w_t.double().T])  # logits
    mag = (z.abs().max().item() if z.numel() else 0.0) * max(1.0, opts["temperature"])
    _rule(got, same, ref64, e_s.dtype, mag)
    event(f"compared {e_s.dtype}")
    if opts["reduction"] == "none":
        assert loss.shape == (e_s.shape[0],)


def test_property_generators_cover_invalid_and_empty_inputs():
    """The strategies reach the refusals and the empty shapes (so the properties test them)."""
    seen = {"bad": set(), "empty": False}

    @settings(max_examples=150)
    @given(cce_cases())
    def collect(case):
        e, _, t, _, _, bad = case
        seen["bad"].add(bad)
        seen["empty"] |= t.numel() == 0 or e.shape[-1] == 0

    collect()
    assert seen["empty"] and len(seen["bad"] - {None}) >= 4  # each one: test_cce.py's list
