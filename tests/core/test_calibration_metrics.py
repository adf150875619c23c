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


@pytest.mark.parametrize("binning", ["equal_width", "equal_mass"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_debiased_l2_equals_torchmetrics_debias_and_float64_loop(case, binning):
    probs, labels = CASES[case]
    conf, pred = probs.max(1)
    hits = pred.eq(labels).double()
    ours = float(M.debiased_l2_calibration_error(probs, labels, binning=binning))
    # independent float64 loop over bins (Kumar et al. 2019, eq. for the debiased estimator)
    if binning == "equal_width":
        idx = np.minimum((conf.numpy() * 15).astype(int), 15)
        idx[conf.numpy() == 1.0] = 15
        ref_tm = float(_ce_compute(conf, hits, 15, norm="l2", debias=True))
        assert ours == pytest.approx(ref_tm, abs=1e-6)
    else:
        idx = np.empty(len(conf), int)
        for b, chunk in enumerate(np.array_split(np.argsort(conf.numpy(), kind="stable"), 15)):
            idx[chunk] = b
    total = 0.0
    for b in np.unique(idx):
        m = idx == b
        a, c, n = hits.numpy()[m].mean(), conf.numpy()[m].mean(), m.sum()
        total += n / len(conf) * ((a - c) ** 2 - (a * (1 - a) / (n - 1) if n > 1 else 0))
    assert ours == pytest.approx(max(total, 0) ** 0.5, abs=1e-9)


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
