import numpy as np
import pytest
import torch

from core.losses import LOSSES
from projects.robust_losses.common import (
    ASYM_FLIPS,
    NUM_CLASSES,
    asymmetric_noise,
    load_params,
    symmetric_noise,
)
from projects.robust_losses.report import aggregate, table
from projects.robust_losses.train import run_one


def test_params_name_registered_losses_and_known_noises():
    p = load_params()
    assert set(p["losses"]) <= set(LOSSES.names())
    assert set(p["noise"]) == {"symmetric", "asymmetric"} and len(p["seeds"]) >= 3


def test_symmetric_noise_rate_and_always_another_class():
    y = np.random.default_rng(0).integers(0, NUM_CLASSES, 20000)
    noisy = symmetric_noise(y, 0.4, np.random.default_rng(1))
    flipped = noisy != y
    assert flipped.mean() == pytest.approx(0.4, abs=0.015)
    # flipped labels are spread uniformly over the 9 other classes
    diffs = (noisy[flipped] - y[flipped]) % NUM_CLASSES
    assert np.bincount(diffs, minlength=NUM_CLASSES)[0] == 0
    assert np.bincount(diffs)[1:].min() > 0.8 * flipped.sum() / 9


def test_asymmetric_noise_follows_the_flip_map():
    y = np.repeat(np.arange(NUM_CLASSES), 2000)
    noisy = asymmetric_noise(y, 0.4, np.random.default_rng(2))
    for c in range(NUM_CLASSES):
        rows = noisy[y == c]
        if c in ASYM_FLIPS:
            assert set(np.unique(rows)) == {c, ASYM_FLIPS[c]}
            assert (rows != c).mean() == pytest.approx(0.4, abs=0.04)
        else:
            assert (rows == c).all()


def test_run_one_and_report_on_synthetic_data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, NUM_CLASSES, (256,), generator=g)
    x = torch.randn(256, 784, generator=g) + 2 * torch.nn.functional.one_hot(y, 784).float()
    data = {
        "x_train": x,
        "x_test": x[:64],
        "y_test": y[:64],
        "x_probe": x[:40],
        "y_probe": y[:40].numpy(),
    }
    p = load_params()
    p["trainer"]["max_epochs"] = 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the train stage does: a tiny MLP is fastest on one thread
    try:
        hist = run_one(p, data, "gce", y.numpy(), seed=0)
    finally:
        torch.set_num_threads(threads)
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(0 <= h["test_acc"] <= 1 and np.isfinite(h["dse"]) for h in hist)
    runs = [
        {
            "noise": "symmetric",
            "rate": 0.4,
            "actual_noise": 0.4,
            "loss": "gce",
            "seed": s,
            "best_test_acc": h["test_acc"],
            **{k: h[k] for k in ("test_acc", "fit_noisy_train_acc", "dse", "dsmi_y")},
        }
        for s, h in enumerate(hist)
    ]
    agg = aggregate(runs)
    accs = [h["test_acc"] for h in hist]
    assert agg["symmetric"]["gce"]["test_acc"] == pytest.approx([np.mean(accs), np.std(accs), 2])
    assert "| gce |" in table(agg, runs)
