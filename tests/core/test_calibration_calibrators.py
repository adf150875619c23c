"""Post-hoc calibrators: optimum vs scipy / sklearn, accuracy kept where guaranteed, bad input,
checkpoint round-trip, registry."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression

from core.calibration import (
    CALIBRATORS,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
    expected_calibration_error,
)

C = 5


def _overconfident(n, seed, scale=2.5):
    """Labels drawn from softmax(z); the 'model' reports scale * z (overconfident by T = scale)."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, C, generator=g)
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return scale * z, labels


FIT = _overconfident(3000, 0)
TEST = _overconfident(3000, 1)


def test_temperature_matches_scipy_optimum_and_recovers_true_scale():
    logits, labels = FIT
    ts = TemperatureScaling().fit(logits, labels)
    z, y = logits.double().numpy(), labels.numpy()

    def nll(t):
        s = z / t
        return float(
            np.mean(
                np.log(np.exp(s - s.max(1, keepdims=True)).sum(1))
                + s.max(1)
                - s[np.arange(len(y)), y]
            )
        )

    ref = minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-8}).x
    assert float(ts.temperature) == pytest.approx(ref, rel=1e-3)
    assert float(ts.temperature) == pytest.approx(2.5, rel=0.1)
    # fitted on logits: the call divides logits, keeps argmax, lowers held-out NLL and ECE
    test_logits, test_labels = TEST
    out = ts(test_logits)
    torch.testing.assert_close(out, test_logits / ts.temperature)
    assert torch.equal(out.argmax(1), test_logits.argmax(1))
    assert F.cross_entropy(out, test_labels) < F.cross_entropy(test_logits, test_labels)
    before = expected_calibration_error(test_logits.softmax(1), test_labels)
    after = expected_calibration_error(out.softmax(1), test_labels)
    assert after < 0.5 * before


def test_vector_and_matrix_scaling_nest_temperature_scaling():
    """Larger families reach a fitting NLL at least as low as the smaller ones they contain."""
    logits, labels = FIT
    nll = {
        name: F.cross_entropy(cal.fit(logits, labels)(logits), labels).item()
        for name, cal in [
            ("temperature", TemperatureScaling()),
            ("vector", VectorScaling()),
            ("matrix", MatrixScaling(off_diagonal=0.0, bias=0.0)),
        ]
    }
    assert nll["vector"] <= nll["temperature"] + 1e-5
    assert nll["matrix"] <= nll["vector"] + 1e-5
    # all three undo the known over-confidence: vector weights near 1 / 2.5
    vs = VectorScaling().fit(logits, labels)
    torch.testing.assert_close(vs.weight, torch.full((C,), 0.4), atol=0.06, rtol=0)


def test_matrix_off_diagonal_regularisation_shrinks_off_diagonal():
    logits, labels = FIT
    free = MatrixScaling(off_diagonal=0.0, bias=0.0).fit(logits, labels)
    tied = MatrixScaling(off_diagonal=1e4, bias=0.0).fit(logits, labels)
    off = ~torch.eye(C, dtype=torch.bool)
    assert tied.weight.detach()[off].abs().max() < 1e-3 < free.weight.detach()[off].abs().max()


def _sklearn_isotonic(fit_logits, fit_labels, test_logits):
    p_fit, p_test = fit_logits.double().softmax(1).numpy(), test_logits.double().softmax(1).numpy()
    scores = np.stack(
        [
            IsotonicRegression(out_of_bounds="clip")
            .fit(p_fit[:, c], fit_labels.numpy() == c)
            .predict(p_test[:, c])
            for c in range(p_fit.shape[1])
        ],
        1,
    )
    return scores / scores.sum(1, keepdims=True)


def test_isotonic_matches_sklearn_one_vs_rest():
    logits, labels = FIT[0][:800], FIT[1][:800]
    iso = IsotonicCalibration().fit(logits, labels)
    ours = iso(TEST[0]).softmax(1).double().numpy()
    np.testing.assert_allclose(ours, _sklearn_isotonic(logits, labels, TEST[0]), atol=1e-6)


def test_isotonic_handles_tied_scores():
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0, 1, 0, 0, 1])
    ours = IsotonicCalibration().fit(logits, labels)(logits).softmax(1).double().numpy()
    np.testing.assert_allclose(ours, _sklearn_isotonic(logits, labels, logits), atol=1e-6)


def test_histogram_binning_matches_float64_loop():
    logits, labels = FIT[0][:500], FIT[1][:500]
    hb = HistogramBinning(n_bins=10).fit(logits, labels)
    p_fit = logits.double().softmax(1).numpy()
    p_test = TEST[0][:50].double().softmax(1).numpy()
    scores = np.zeros_like(p_test)
    for c in range(C):
        fit_bin = np.minimum((p_fit[:, c] * 10).astype(int), 9)
        test_bin = np.minimum((p_test[:, c] * 10).astype(int), 9)
        for i, b in enumerate(test_bin):
            members = fit_bin == b
            scores[i, c] = (
                (labels.numpy()[members] == c).mean() if members.any() else (b + 0.5) / 10
            )
    expected = scores / scores.sum(1, keepdims=True)
    np.testing.assert_allclose(hb(TEST[0][:50]).softmax(1).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    "name", ["temperature", "vector", "matrix", "histogram_binning", "isotonic"]
)
def test_checkpoint_round_trip_into_fresh_module(name):
    logits, labels = FIT[0][:400], FIT[1][:400]
    fitted = CALIBRATORS.build(name).fit(logits, labels)
    buffer = io.BytesIO()
    torch.save(fitted.state_dict(), buffer)
    buffer.seek(0)
    fresh = CALIBRATORS.build(name)
    fresh.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(fresh(TEST[0]), fitted(TEST[0]))
    # every calibrator lowers the held-out ECE of these over-confident logits (binning methods
    # may assign probability ~0 to a true class, so NLL is no fair check for them)
    before = expected_calibration_error(TEST[0].softmax(1), TEST[1])
    assert expected_calibration_error(fitted.predict_proba(TEST[0]).detach(), TEST[1]) < before


@pytest.mark.parametrize(
    "name", ["temperature", "vector", "matrix", "histogram_binning", "isotonic"]
)
@pytest.mark.parametrize(
    ("logits", "labels", "match"),
    [
        (torch.randn(10, C), torch.zeros(10, dtype=torch.long), "at least 2 classes"),
        (torch.full((10, C), float("nan")), torch.arange(10) % C, "NaN"),
        (torch.randn(10, C), torch.arange(9) % C, r"labels must be \(N,\)"),
        (torch.randn(10), torch.arange(10) % C, r"\(N, C\)"),
        (torch.randn(10, C), torch.arange(10) % C + 1, "class indices"),
    ],
)
def test_bad_fit_input_raises(name, logits, labels, match):
    with pytest.raises(ValueError, match=match):
        CALIBRATORS.build(name).fit(logits, labels)


@pytest.mark.parametrize("name", ["vector", "matrix", "histogram_binning", "isotonic"])
def test_unfitted_or_wrong_width_raises(name):
    with pytest.raises(ValueError, match="not fitted"):
        CALIBRATORS.build(name)(TEST[0])
    fitted = CALIBRATORS.build(name).fit(FIT[0][:200], FIT[1][:200])
    with pytest.raises(ValueError, match="logits must be"):
        fitted(torch.randn(3, C + 1))


def test_registry_names():
    assert CALIBRATORS.names() == [
        "ca", "histogram_binning", "isotonic", "matrix", "temperature", "vector",
    ]  # fmt: skip


# ---- issue 15: extreme logits, half precision, label dtypes, hyperparameters ----

FITTERS = ["temperature", "vector", "matrix", "histogram_binning", "isotonic"]


@pytest.mark.parametrize("name", ["vector", "matrix"])
@pytest.mark.parametrize("scale", [1e20, 1e30, 1e36])
def test_scaling_fits_are_finite_and_scale_equivariant_at_huge_logits(name, scale):
    logits, labels = FIT[0][:600], FIT[1][:600]
    kwargs = {"off_diagonal": 0.0, "bias": 0.0} if name == "matrix" else {}
    small = CALIBRATORS.build(name, **kwargs).fit(logits, labels)
    huge = CALIBRATORS.build(name, **kwargs).fit(logits * scale, labels)  # NaN parameters before
    assert all(torch.isfinite(p).all() for p in huge.parameters())
    p_small = small.predict_proba(TEST[0]).detach()
    p_huge = huge.predict_proba(TEST[0].double() * scale).detach()
    torch.testing.assert_close(p_huge.float(), p_small, atol=1e-2, rtol=0)  # L-BFGS tolerance


def test_matrix_scaling_with_default_penalty_is_finite_at_huge_logits():
    logits, labels = FIT[0][:600], FIT[1][:600]
    ms = MatrixScaling().fit(logits * 1e30, labels)
    assert torch.isfinite(ms.weight).all() and torch.isfinite(ms.bias).all()
    nll = F.cross_entropy(ms(logits.double() * 1e30), labels)
    assert nll < F.cross_entropy(logits / 2.5, labels) + 0.05  # near the true-temperature NLL


def test_logits_beyond_float32_range_are_refused_by_name():
    logits = FIT[0][:100].double() * 1e300
    for name in ("temperature", "vector", "matrix"):
        with pytest.raises(ValueError, match=r"logits: \|z\| must be"):
            CALIBRATORS.build(name).fit(logits, FIT[1][:100])


def test_histogram_binning_on_fp16_logits_is_finite_and_matches_float32():
    hb = HistogramBinning().fit(FIT[0], FIT[1])
    half = TEST[0].half()
    out = hb(half)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()  # was -inf (1e-12 floor)
    torch.testing.assert_close(out.float(), hb(half.float()), atol=2e-2, rtol=1e-3)
    iso = IsotonicCalibration().fit(FIT[0], FIT[1])
    assert torch.isfinite(iso(half)).all()


@pytest.mark.parametrize("name", FITTERS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_any_integer_label_dtype_fits_like_int64(name, dtype):
    logits, labels = FIT[0][:300], FIT[1][:300]
    ref = CALIBRATORS.build(name).fit(logits, labels)(TEST[0][:50])
    out = CALIBRATORS.build(name).fit(logits, labels.to(dtype))(TEST[0][:50])
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", FITTERS)
@pytest.mark.parametrize(
    ("logits", "labels", "error", "match"),
    [
        (torch.zeros(0, C), torch.zeros(0, dtype=torch.long), ValueError, "at least 2 samples"),
        (torch.zeros(1, C), torch.zeros(1, dtype=torch.long), ValueError, "at least 2 samples"),
        (np.zeros((4, C)), torch.arange(4) % C, TypeError, "logits must be a floating"),
        (torch.zeros(4, C, dtype=torch.long), torch.arange(4), TypeError, "logits"),
        (torch.randn(4, C), torch.arange(4.0), TypeError, "labels must be an integer"),
        (torch.randn(4, C), torch.arange(4) % 2 == 0, TypeError, "labels must be an integer"),
    ],
)
def test_degenerate_fit_input_is_refused_by_name(name, logits, labels, error, match):
    with pytest.raises(error, match=match):
        CALIBRATORS.build(name).fit(logits, labels)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: HistogramBinning(n_bins=0), "n_bins must be an integer >= 1"),
        (lambda: HistogramBinning(n_bins=-3), "n_bins must be an integer >= 1"),
        (lambda: HistogramBinning(n_bins=2.5), "n_bins must be an integer >= 1"),
        (lambda: MatrixScaling(off_diagonal=-1e-2), "off_diagonal must be a finite number >= 0"),
        (lambda: MatrixScaling(off_diagonal=float("nan")), "off_diagonal"),
        (lambda: MatrixScaling(bias=float("inf")), "bias must be a finite number >= 0"),
        (lambda: MatrixScaling(max_iter=0), "max_iter must be an integer >= 1"),
        (lambda: VectorScaling(max_iter=0), "max_iter"),
        (lambda: TemperatureScaling(max_iter=True), "max_iter"),
    ],
)
def test_hyperparameters_are_validated_at_construction(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_matrix_penalty_follows_the_rescaled_fit_exactly():
    # fit(c z, lam) and fit(z, lam / c^2) are one problem (V = c W): the rescaled fit must keep
    # penalising W itself, not the weights on z / 2^k
    logits, labels = FIT[0][:600], FIT[1][:600]
    c = 2.0**20  # above the 2^16 rescale threshold
    big = MatrixScaling(off_diagonal=1.0 * c**2, bias=0.0).fit(logits * c, labels)
    small = MatrixScaling(off_diagonal=1.0, bias=0.0).fit(logits, labels)
    off = ~torch.eye(C, dtype=torch.bool)
    assert small.weight.detach()[off].abs().max() > 1e-3  # the penalty leaves room to move
    torch.testing.assert_close(big.weight.detach() * c, small.weight.detach(), atol=2e-3, rtol=0)
