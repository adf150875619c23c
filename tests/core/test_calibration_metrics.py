"""Calibration metrics against torchmetrics 1.9.0, netcal 1.4.0 and float64 closed forms."""

import numpy as np
import pytest
import torch
from netcal.metrics import ECE as NetcalECE
from netcal.metrics import MCE as NetcalMCE
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)
from torchmetrics.functional.classification.calibration_error import _ce_compute

from core.calibration import metrics as M
from core.calibration import torchmetrics_metrics as TM


def _data(n=600, c=7, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(n, c, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    # make the classifier better than chance so bins hold a mix of hits and misses
    keep = torch.rand(n, generator=g) < 0.5
    labels = torch.where(keep, logits.argmax(1), labels)
    return logits.softmax(1), labels


def _edge_cases():
    """(probs, labels) sets with confidences exactly 0-ish / 1.0, empty bins and one sample."""
    one_hot = torch.eye(4, dtype=torch.float64)[[0, 1, 2, 3, 0, 1]]  # confidence exactly 1.0
    labels = torch.tensor([0, 1, 3, 3, 2, 1])
    mixed = torch.cat([one_hot, _data(40, 4, seed=3)[0]])
    mixed_labels = torch.cat([labels, _data(40, 4, seed=3)[1]])
    uniform = torch.full((5, 4), 0.25, dtype=torch.float64)  # every sample in one bin
    return [
        (one_hot, labels),
        (mixed, mixed_labels),
        (uniform, torch.tensor([0, 1, 2, 3, 0])),
        (_data(1, 5, seed=1)[0], torch.tensor([2])),  # one sample
        (torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), torch.tensor([0])),
    ]


CASES = [_data(), _data(97, 3, seed=2, scale=0.5), *_edge_cases()]


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_ece_equals_torchmetrics(case, n_bins, norm):
    probs, labels = CASES[case]
    ours = M.expected_calibration_error(probs, labels, n_bins=n_bins, norm=norm)
    ref = multiclass_calibration_error(probs, labels, probs.shape[1], n_bins=n_bins, norm=norm)
    assert float(ours) == pytest.approx(float(ref), abs=1e-6)


def _netcal_ece(probs, labels, n_bins, equal_intervals=True):
    return NetcalECE(bins=n_bins, equal_intervals=equal_intervals).measure(
        probs.numpy(), labels.numpy()
    )


@pytest.mark.parametrize("n_bins", [5, 15])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_equals_netcal_without_confidence_one(n_bins, seed):
    probs, labels = _data(500, 6, seed=seed)
    assert probs.max() < 1
    ours = M.expected_calibration_error(probs, labels, n_bins=n_bins)
    assert float(ours) == pytest.approx(_netcal_ece(probs, labels, n_bins), abs=1e-6)


def test_mce_equals_netcal_without_confidence_one():
    probs, labels = _data(400, 6, seed=8)
    ours = M.maximum_calibration_error(probs, labels, n_bins=10)
    ref = NetcalMCE(bins=10).measure(probs.numpy(), labels.numpy())
    assert float(ours) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("norm", ["l1", "l2", "max"])
def test_metric_class_equals_torchmetrics_class_across_batches(norm):
    probs, labels = CASES[2]
    ours, ref = (
        TM.ExpectedCalibrationError(n_bins=15, norm=norm),
        MulticlassCalibrationError(probs.shape[1], n_bins=15, norm=norm),
    )
    for p, y in zip(probs.split(7), labels.split(7)):
        ours.update(p, y)
        ref.update(p, y)
    assert float(ours.compute()) == pytest.approx(float(ref.compute()), abs=1e-6)


def test_confidence_one_gets_its_own_bin_like_torchmetrics_not_netcal():
    """Documented difference: torchmetrics (and we) bin conf == 1.0 apart; netcal clips it into
    the last bin. Two samples: conf 1.0 correct, conf 0.94 wrong (both in the last 15-bin)."""
    probs = torch.tensor(
        [[1.0, 0.0, 0.0], [0.94, 0.03, 0.03], [0.5, 0.3, 0.2]], dtype=torch.float64
    )
    labels = torch.tensor([0, 1, 2])
    ours = float(M.expected_calibration_error(probs, labels))
    # own bins: |1-1| + |0-0.94| + |0-0.5|, each weight 1/3
    assert ours == pytest.approx((0.94 + 0.5) / 3, abs=1e-12)
    # netcal merges the first two: |0.5 - 0.97| * 2/3 + 0.5/3
    assert _netcal_ece(probs, labels, 15) == pytest.approx((0.47 * 2 + 0.5) / 3, abs=1e-6)


def test_confidence_exactly_zero_and_bin_edges():
    """Binary-style confidences on exact edges: 0 -> bin 0, k/B -> bin k (left-closed bins)."""
    conf = torch.tensor([0.0, 0.2, 0.4, 0.4, 1.0], dtype=torch.float32)
    hits = torch.tensor([0, 1, 1, 0, 1])
    acc, mean_conf, count = M.bin_statistics(conf, hits, n_bins=5)
    assert count.tolist() == [1, 1, 2, 0, 0, 1]
    assert acc.tolist() == [0, 1, 0.5, 0, 0, 1]
    ours = M.classwise_calibration_error(torch.stack([1 - conf, conf], 1), hits, n_bins=5)
    ref = torch.stack(
        [
            binary_calibration_error(p, (hits == c).long(), n_bins=5)
            for c, p in enumerate([1 - conf, conf])
        ]
    ).mean()
    assert float(ours) == pytest.approx(float(ref), abs=1e-6)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_classwise_equals_mean_of_torchmetrics_binary(case):
    probs, labels = CASES[case]
    ref = torch.stack(
        [
            binary_calibration_error(probs[:, c].contiguous(), (labels == c).long(), n_bins=15)
            for c in range(probs.shape[1])
        ]
    ).mean()
    assert float(M.classwise_calibration_error(probs, labels)) == pytest.approx(
        float(ref), abs=1e-6
    )


@pytest.mark.parametrize("n_bins", [4, 15])
def test_adaptive_equals_netcal_equal_mass_bins(n_bins):
    probs, labels = _data(n_bins * 40, 5, seed=4)  # N divisible by B, distinct confidences
    ours = M.adaptive_calibration_error(probs, labels, n_bins=n_bins)
    ref = _netcal_ece(probs, labels, n_bins, equal_intervals=False)
    assert float(ours) == pytest.approx(ref, abs=1e-6)
    _, _, count = M.bin_statistics(probs.max(1).values, labels, n_bins, "equal_mass")
    assert count.tolist() == [40] * n_bins


def _kumar_debiased_l2(conf, hits, idx):
    """Float64 loop over bins as in Kumar et al.'s uncertainty-calibration (unbiased_square_ce):
    weight n_b / N, bins with fewer than 2 samples contribute 0; sqrt(max(., 0))."""
    total = 0.0
    for b in np.unique(idx):
        m = idx == b
        a, c, n = hits[m].mean(), conf[m].mean(), m.sum()
        if n >= 2:
            total += n / len(conf) * ((a - c) ** 2 - a * (1 - a) / (n - 1))
    return max(total, 0) ** 0.5


@pytest.mark.parametrize("binning", ["equal_width", "equal_mass"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_debiased_l2_equals_kumar_float64_loop_and_torchmetrics(case, binning):
    probs, labels = CASES[case]
    conf, pred = probs.max(1)
    hits = pred.eq(labels).double()
    ours = float(M.debiased_l2_calibration_error(probs, labels, binning=binning))
    if binning == "equal_width":
        idx = np.minimum((conf.numpy() * 15).astype(int), 15)
        idx[conf.numpy() == 1.0] = 15
        if np.bincount(idx)[np.bincount(idx) > 0].min() >= 2:  # torchmetrics keeps 1-sample bins
            ref_tm = float(_ce_compute(conf, hits, 15, norm="l2", debias=True))
            assert ours == pytest.approx(ref_tm, abs=1e-6)
    else:
        idx = np.empty(len(conf), int)
        for b, chunk in enumerate(np.array_split(np.argsort(conf.numpy(), kind="stable"), 15)):
            idx[chunk] = b
    assert ours == pytest.approx(_kumar_debiased_l2(conf.numpy(), hits.numpy(), idx), abs=1e-9)


def test_debiased_l2_drops_bins_with_one_sample():
    # issue 15 item 17: four hits at 0.95 and one miss alone in its bin at 0.55
    probs = torch.tensor([[0.95, 0.05]] * 4 + [[0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 0, 1])
    ours = float(M.debiased_l2_calibration_error(probs, labels))
    assert ours == pytest.approx((0.8 * 0.05**2) ** 0.5, abs=1e-12)  # the lone bin adds nothing
    alone = float(M.debiased_l2_calibration_error(probs[4:], labels[4:]))
    assert alone == 0.0  # (the old rule: the lone sample's squared gap, 0.55)


def test_debiased_is_below_plugin_l2_and_near_zero_for_calibrated_data():
    g = torch.Generator().manual_seed(5)
    conf = 0.5 + 0.5 * torch.rand(20000, generator=g, dtype=torch.float64)
    hits = (torch.rand(20000, generator=g, dtype=torch.float64) < conf).long()
    probs = torch.stack([conf, 1 - conf], 1)
    labels = 1 - hits  # label 0 (the argmax) exactly when hit
    plug_in = M.rms_calibration_error(probs, labels)
    debiased = M.debiased_l2_calibration_error(probs, labels)
    assert debiased < plug_in
    assert debiased < 0.01


def test_brier_and_nll_closed_forms():
    probs, labels = _data(50, 4, seed=6)
    onehot = np.eye(4)[labels.numpy()]
    brier = ((probs.numpy() - onehot) ** 2).sum(1).mean()
    nll = -np.log(probs.numpy()[np.arange(50), labels.numpy()]).mean()
    assert float(M.brier_score(probs, labels)) == pytest.approx(brier, abs=1e-12)
    assert float(M.negative_log_likelihood(probs, labels)) == pytest.approx(nll, abs=1e-12)
    assert float(M.brier_score(torch.eye(3), torch.tensor([0, 1, 2]))) == 0
    assert float(M.brier_score(torch.eye(3), torch.tensor([1, 2, 0]))) == 2


@pytest.mark.parametrize(
    ("cls", "fn", "kwargs"),
    [
        (TM.ExpectedCalibrationError, M.expected_calibration_error, {"n_bins": 10}),
        (TM.MaximumCalibrationError, M.maximum_calibration_error, {}),
        (TM.RMSCalibrationError, M.rms_calibration_error, {}),
        (TM.AdaptiveCalibrationError, M.adaptive_calibration_error, {}),
        (TM.ClasswiseCalibrationError, M.classwise_calibration_error, {}),
        (TM.DebiasedL2CalibrationError, M.debiased_l2_calibration_error, {}),
        (TM.BrierScore, M.brier_score, {}),
        (TM.NegativeLogLikelihood, M.negative_log_likelihood, {}),
    ],
)
def test_metric_classes_accumulate_batches(cls, fn, kwargs):
    probs, labels = _data(301, 5, seed=7, dtype=torch.float32)
    metric = cls(**kwargs)
    for p, y in zip(probs.split(64), labels.split(64)):
        metric.update(p, y)
    assert float(metric.compute()) == pytest.approx(float(fn(probs, labels, **kwargs)), abs=1e-6)
    metric.reset()
    metric.update(probs[:10], labels[:10])
    assert float(metric.compute()) == pytest.approx(
        float(fn(probs[:10], labels[:10], **kwargs)), abs=1e-6
    )


@pytest.mark.parametrize(
    ("probs", "labels", "match"),
    [
        (torch.rand(4), torch.zeros(4, dtype=torch.long), "shape"),
        (torch.rand(4, 3).softmax(1), torch.zeros(5, dtype=torch.long), "labels must be"),
        (torch.randn(4, 3) * 5, torch.zeros(4, dtype=torch.long), "logits"),
        (torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long), "finite"),
        (torch.rand(2, 3).softmax(1), torch.tensor([0, 3]), "class indices"),
        (torch.rand(0, 3), torch.zeros(0, dtype=torch.long), "at least one"),
    ],
)
def test_bad_input_raises(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        M.expected_calibration_error(probs, labels)


def test_bad_options_raise():
    probs, labels = _data(10, 3)
    with pytest.raises(ValueError, match="norm"):
        M.expected_calibration_error(probs, labels, norm="l3")
    with pytest.raises(ValueError, match="n_bins"):
        M.expected_calibration_error(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="binning"):
        M.debiased_l2_calibration_error(probs, labels, binning="quantile")


def test_reliability_diagram_draws_bins_and_histogram(tmp_path):
    from core.calibration.plots import reliability_diagram

    probs, labels = CASES[2]  # includes confidences exactly 1.0
    fig = reliability_diagram(probs, labels, n_bins=10)
    top, bottom = fig.axes
    ece = float(M.expected_calibration_error(probs, labels, 10))
    assert f"{100 * ece:.2f}%" in top.get_title()
    heights = np.array([patch.get_height() for patch in bottom.patches])
    assert len(heights) == 10 and heights.sum() == pytest.approx(1.0)
    # the conf == 1.0 samples are drawn in the last bin
    n_one = int((probs.max(1).values == 1).sum())
    assert heights[-1] * len(labels) >= n_one > 0
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0


# ---- issue 15: half precision, empty metrics, label dtypes (each failed before the fix) ----

ALL_FNS = [
    M.expected_calibration_error,
    M.maximum_calibration_error,
    M.rms_calibration_error,
    M.adaptive_calibration_error,
    M.classwise_calibration_error,
    M.debiased_l2_calibration_error,
    M.brier_score,
    M.negative_log_likelihood,
]


def test_bf16_counts_beyond_256_are_exact():
    # bf16 holds integers exactly only to 256: the bin counts must not be accumulated in it
    p = torch.tensor([[0.7, 0.3]]).repeat(1000, 1)
    labels = torch.arange(1000) % 2
    ece = M.expected_calibration_error(p.bfloat16(), labels)
    assert ece.dtype == torch.float32
    conf = float(torch.tensor(0.7).bfloat16())  # the confidence bf16 can hold: 0.69921875
    assert float(ece) == pytest.approx(conf - 0.5, abs=1e-7)  # was 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
def test_half_inputs_give_the_float64_answer_on_the_same_values(fn, dtype):
    probs, labels = _data(4096, 10, seed=11, scale=2.0)
    half = probs.to(dtype)
    ours = fn(half, labels)
    assert ours.dtype == torch.float32
    ref = fn(half.double(), labels)  # float64 maths on exactly the values the half tensor holds
    assert float(ours) == pytest.approx(float(ref), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.int8])
def test_any_integer_label_dtype_gives_the_int64_answer(fn, dtype):
    probs, labels = _data(300, 5, seed=12)
    assert float(fn(probs, labels.to(dtype))) == float(fn(probs, labels))


@pytest.mark.parametrize(
    ("probs", "labels", "error", "match"),
    [
        (np.ones((2, 2)) / 2, torch.tensor([0, 1]), TypeError, "probs must be a floating"),
        (torch.ones(2, 2, dtype=torch.long), torch.tensor([0, 1]), TypeError, "probs"),
        (torch.ones(2, 2) / 2, torch.tensor([True, False]), TypeError, "labels must be an integer"),
        (torch.ones(2, 2) / 2, torch.tensor([0.0, 1.0]), TypeError, "labels must be integer"),
        (torch.ones(2, 0), torch.tensor([0, 1]), ValueError, "probs: need at least one"),
    ],
)
def test_wrong_types_name_the_argument(probs, labels, error, match):
    for fn in ALL_FNS:
        with pytest.raises(error, match=match):
            fn(probs, labels)


def test_nll_eps_is_validated():
    probs, labels = _data(10, 3)
    for eps in (0.0, 1.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="eps must be in"):
            M.negative_log_likelihood(probs, labels, eps=eps)
    with pytest.raises(ValueError, match="eps must be in"):
        TM.NegativeLogLikelihood(eps=0.0)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
@pytest.mark.parametrize(
    "cls",
    [
        TM.ExpectedCalibrationError,
        TM.ClasswiseCalibrationError,
        TM.DebiasedL2CalibrationError,
        TM.BrierScore,
        TM.NegativeLogLikelihood,
    ],
)
def test_metric_classes_refuse_compute_before_update_and_validate_update(cls):
    metric = cls()
    with pytest.raises(ValueError, match=r"no samples seen; call update"):
        metric.compute()  # Brier / NLL returned NaN, ECE a torchmetrics-internal message
    with pytest.raises(ValueError, match="labels must be"):
        metric.update(torch.ones(3, 2) / 2, torch.tensor([0, 2, 1]))
    probs, labels = _data(50, 4, seed=13, dtype=torch.float32)
    metric.update(probs.bfloat16(), labels.int())  # half probs and int32 labels accumulate
    metric.update(probs, labels)
    assert metric.compute().dtype == torch.float32
    both = torch.cat([probs.bfloat16().double(), probs.double()])
    ref = {
        TM.ExpectedCalibrationError: M.expected_calibration_error,
        TM.ClasswiseCalibrationError: M.classwise_calibration_error,
        TM.DebiasedL2CalibrationError: M.debiased_l2_calibration_error,
        TM.BrierScore: M.brier_score,
        TM.NegativeLogLikelihood: M.negative_log_likelihood,
    }[cls](both, torch.cat([labels, labels]))
    assert float(metric.compute()) == pytest.approx(float(ref), rel=1e-6, abs=1e-7)
