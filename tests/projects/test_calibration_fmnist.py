"""projects/calibration Fashion-MNIST pipeline: noise, losses, and train -> calibrate on fake data."""

import json

import numpy as np
import pytest
import torch
import yaml

from core.models.cnn import SmallCNN
from projects.calibration import fmnist_calibrate, fmnist_train, report, train


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """Fake Fashion-MNIST (300 train / 60 test images) and Fashion-MNIST-C (19 x 5 x 60)."""
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    fm, fmc = root / "fm", root / "fmc"
    fm.mkdir()
    fmc.mkdir()
    for split, n in (("train", 300), ("test", 60)):
        labels = torch.arange(n) % 10
        # class-dependent brightness so a few SGD steps learn something
        images = (torch.rand(n, 28, 28, generator=g) * 100 + labels[:, None, None] * 15).byte()
        torch.save({"images": images, "labels": labels}, fm / f"{split}.pt")
    test = torch.load(fm / "test.pt")
    for name in fmnist_train.CORRUPTIONS:
        np.save(fmc / f"{name}.npy", np.stack([test["images"].numpy()] * 5))
    np.save(fmc / "labels.npy", test["labels"].numpy())
    return fm, fmc


def _tiny_params(tmp_path):
    params = fmnist_train.load_params()
    cfg = params["fmnist"]
    cfg.update(seeds=[1], cal_size=100, train_size=200, test_size=40, workers=1, ca_epochs=20)
    cfg["model"].update(channels=[2, 4], hidden=8)
    cfg["optim"].update(epochs=1, batch_size=50)
    cfg["ood"]["per_corruption"] = 4
    cfg["label_noise"]["rates"] = [0.0, 0.4]
    cfg["paths"] = {"runs": str(tmp_path / "runs"), "results": str(tmp_path / "results/fmnist")}
    # the synthetic study, tiny, for the report
    params.update(runs=2, seed=3)
    params["data"].update(dim=5, n=200, means=[1.0])
    params["model"]["hidden"] = [16]
    params["optim"].update(epochs=3, batch_size=50)
    params["paths"]["results"] = str(tmp_path / "results")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path, params


def test_symmetric_noise_flips_to_other_classes_at_the_rate():
    labels = torch.arange(20_000) % 10
    noisy = fmnist_train.symmetric_noise(labels, 0.3, torch.Generator().manual_seed(0))
    flipped = noisy.ne(labels)
    assert abs(flipped.double().mean().item() - 0.3) < 0.01
    # flipped labels are uniform over the 9 other classes
    shift = (noisy[flipped] - labels[flipped]) % 10
    counts = torch.bincount(shift, minlength=10).double()
    assert counts[0] == 0 and (counts[1:] / counts[1:].sum() - 1 / 9).abs().max() < 0.01
    with pytest.raises(ValueError, match="noise rate"):
        fmnist_train.symmetric_noise(labels, 1.0, torch.Generator())


@pytest.mark.parametrize("loss", ["erm", "label_smoothing", "focal", "mixup", "mrl", "mndcg"])
def test_every_loss_gives_a_finite_scalar_with_gradients(loss):
    params = fmnist_train.load_params()["fmnist"]
    model = SmallCNN((2, 4), 8)
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6) % 10
    value = fmnist_train.loss_fn(model, x, y, loss, params["losses"][loss], torch.Generator())
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert all(p.grad is not None for p in model.parameters())
    if loss == "erm":
        torch.testing.assert_close(value, torch.nn.functional.cross_entropy(model(x), y))


def test_train_then_calibrate_end_to_end(tmp_path, fake_data):
    fm, fmc = fake_data
    path, params = _tiny_params(tmp_path)
    args = ["--params", str(path), "--fmnist-root", str(fm), "--fmnist-c-root", str(fmc)]
    fmnist_train.main(args)
    runs = tmp_path / "runs"
    saved = torch.load(runs / "mrl_noise0_seed1" / "logits.pt", weights_only=True)
    assert set(saved["sets"]) == {"cal", "test", "c3", "c5"}
    assert saved["sets"]["c5"]["views"].shape == (6, 19 * 4, 10)
    noisy = torch.load(runs / "erm_noise0.4_seed1" / "logits.pt", weights_only=True)
    assert set(noisy["sets"]) == {"cal", "test"} and noisy["views"] == ("identity",)
    # the identity view is the model's own logits
    model = SmallCNN((2, 4), 8)
    model.load_state_dict(torch.load(runs / "mrl_noise0_seed1" / "model.pt", weights_only=True))
    test = torch.load(fm / "test.pt")
    x = test["images"][:40].float().div(255).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(saved["sets"]["test"]["views"][0], model.eval()(x))

    fmnist_calibrate.main(["--params", str(path)])
    results = tmp_path / "results" / "fmnist"
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics) == set(params["fmnist"]["losses"])
    calibrators = {"none", *params["fmnist"]["calibrators"]}
    assert set(metrics["focal"]) == calibrators
    assert (
        set(metrics["focal"]["ca"]) == set(metrics["focal"]["ca_balanced"]) == {"test", "c3", "c5"}
    )
    per_run = json.loads((results / "runs.json").read_text())
    for name, run in per_run.items():
        # temperature scaling and CA (a per-sample temperature) keep the argmax, hence accuracy
        keep = ["temperature"] + (["ca", "ca_balanced"] if "noise0_" in name else [])
        for c in keep:
            assert run[c]["test"]["accuracy"] == run["none"]["test"]["accuracy"]
    noise = json.loads((results / "noise.json").read_text())
    assert set(noise) == {"0", "0.4"} and set(noise["0.4"]) == {
        "erm",
        "erm+ts",
        "mixup",
        "mixup+ts",
    }
    assert (results / "reliability" / "erm_temperature_c5.png").stat().st_size > 1000
    assert len((results / "metrics.csv").read_text().splitlines()) == 1 + 6 * len(calibrators) * 3

    train.main(["--params", str(path)])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    report.main(["--params", str(path), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert text.count("| 1.0 |") == 4  # synthetic: 4 variants at mean 1.0
    assert text.count("| mndcg |") == 1 + 3 * 4  # accuracy + 3 sets x 4 metrics
    assert text.count("| 0.4 |") == 4 and "Check (means over seeds)" in text
    assert "reliability/erm_temperature_c5.png" in text
