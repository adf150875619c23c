"""projects/calibration: the classifier's loss dispatch and steps, the stages on fake data, run
identity, the claim rule of the report, the DVC layout and the variants."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import DataLoader, TensorDataset

from core.calibration import (
    TemperatureScaling,
    expected_calibration_error,
    negative_log_likelihood,
)
from core.engine.config import load_params
from core.engine.deps import missing_deps
from core.engine.trainer import build_trainer, seed_everything
from core.losses import mndcg, mrl
from projects.calibration import (
    classifier,
    fmnist_calibrate,
    fmnist_data,
    fmnist_train,
    overlap,
    report,
)
from projects.calibration.classifier import LossClassifier, build_net, mlp
from projects.calibration.crosscheck import authors_temperature

PARAMS = "projects/calibration/params.yaml"
ENTRY_POINTS = (overlap, fmnist_train, fmnist_calibrate, report)


def _params():
    return load_params(PARAMS)


@pytest.mark.parametrize("module", ENTRY_POINTS, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_entry_point_has_help(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--params" in out and "--workers" in out


def test_symmetric_noise_flips_to_other_classes_at_the_rate():
    labels = torch.arange(20_000) % 10
    noisy = fmnist_data.symmetric_noise(labels, 0.3, torch.Generator().manual_seed(0))
    flipped = noisy.ne(labels)
    assert abs(flipped.double().mean().item() - 0.3) < 0.01
    shift = (noisy[flipped] - labels[flipped]) % 10  # uniform over the 9 other classes
    counts = torch.bincount(shift, minlength=10).double()
    assert counts[0] == 0 and (counts[1:] / counts[1:].sum() - 1 / 9).abs().max() < 0.01
    with pytest.raises(ValueError, match="noise rate"):
        fmnist_data.symmetric_noise(labels, 1.0, torch.Generator())


# --- the classifier: losses from the registry, fed by signature ----------------------------


def _module(loss, n_classes=10):
    return LossClassifier(
        build_net({"name": "small_cnn", "channels": [2, 4], "hidden": 8}, n_classes),
        loss,
        lr=1e-3,
        n_classes=n_classes,
    )


@pytest.mark.parametrize("name", list(_params()["fmnist"]["losses"]))
def test_every_configured_loss_gives_a_finite_scalar_with_gradients(name):
    module = _module(_params()["fmnist"]["losses"][name])
    x, y = torch.rand(6, 1, 28, 28), torch.arange(6) % 10
    value = module.batch_loss(x, y)
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value)
    assert all(p.grad is not None for p in module.parameters())


def _fixed_mixup(monkeypatch, lam=0.7):
    """mixup_batch with a fixed lam and the reversed batch as partner (a hand-checkable mix)."""

    def fake(x, y, n_classes, *, alpha, **_):
        onehot = F.one_hot(y, n_classes).float()
        return lam * x + (1 - lam) * x.flip(0), lam * onehot + (1 - lam) * onehot.flip(0), lam

    monkeypatch.setattr(classifier, "mixup_batch", fake)


def test_plain_mixup_and_ranking_losses_match_a_hand_computation(monkeypatch):
    _fixed_mixup(monkeypatch, lam=0.7)
    torch.manual_seed(0)
    x, y = torch.rand(5, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4])
    erm = _module({"fn": "ce"})
    torch.testing.assert_close(erm.batch_loss(x, y), F.cross_entropy(erm(x), y))
    smooth = _module({"fn": "label_smoothing", "smoothing": 0.2})
    logp = smooth(x).log_softmax(1)
    hand = (0.8 * -logp[range(5), y] - 0.2 * logp.mean(1)).mean()
    torch.testing.assert_close(smooth.batch_loss(x, y), hand)
    # mixup: lam CE(y) + (1 - lam) CE(partner's y) on the mixed images
    mix = _module({"fn": "mixup_cross_entropy", "mixup_alpha": 0.2})
    out = mix(0.7 * x + 0.3 * x.flip(0))
    hand = 0.7 * F.cross_entropy(out, y) + 0.3 * F.cross_entropy(out, y.flip(0))
    torch.testing.assert_close(mix.batch_loss(x, y), hand)
    # mrl: one (N, C) mixed copy; mndcg: n_mixups copies stacked (M, N, C)
    soft = 0.7 * F.one_hot(y, 10).float() + 0.3 * F.one_hot(y.flip(0), 10).float()
    r = _module({"fn": "mrl", "alpha": 0.1, "margin": 2.0, "mixup_alpha": 1.0})
    want = mrl(r(x), y, r(0.7 * x + 0.3 * x.flip(0)), soft, margin=2.0, alpha=0.1)
    torch.testing.assert_close(r.batch_loss(x, y), want)
    n = _module({"fn": "mndcg", "alpha": 0.1, "n_mixups": 2, "mixup_alpha": 1.0})
    mixed = n(0.7 * x + 0.3 * x.flip(0))
    want = mndcg(n(x), y, torch.stack([mixed, mixed]), torch.stack([soft, soft]), alpha=0.1)
    torch.testing.assert_close(n.batch_loss(x, y), want)


def _authors_mrl(inputs, targets, mixup, target_re, margin, alpha):
    """RankMixup_MRL.forward of github.com/cvlab-yonsei/RankMixup (calibrate/losses/
    rankmixup.py), re-expressed step by step for the cross-check."""
    ce = F.cross_entropy(inputs, targets)
    mask = (target_re == 1.0).sum(dim=1).reshape(1, -1).sum(dim=0) == 0.0
    diff = mixup.max(dim=1).values.unsqueeze(1) - inputs.max(dim=1).values.unsqueeze(1)
    return ce + alpha * (mask * F.relu(diff + margin)).mean()


def _authors_mndcg(inputs, targets, mixup, target_re, n_mix, alpha):
    """RankMixup_MNDCG.forward / get_indcg of the same file: mixup (M N, C) stacked by mixup."""
    c = inputs.shape[1]
    mix = F.softmax(mixup.reshape(n_mix, -1, c), dim=2)
    tre = target_re.reshape(n_mix, -1, c)
    probs = F.softmax(inputs, dim=1)
    max_values = probs.max(dim=1, keepdim=True)[0]
    max_mixup, max_lam = mix.max(dim=2)[0].t(), tre.max(dim=2)[0].t()  # (N, M)
    order = torch.argsort(max_lam, descending=True)
    discount = torch.log2(torch.arange(1, 2 + n_mix).double() + 1)
    dcg = (torch.cat((max_values, max_mixup.gather(1, order)), 1) / discount).sum(1)
    ones = torch.ones(inputs.shape[0], 1, dtype=inputs.dtype)
    idcg = (torch.cat((ones, max_lam.gather(1, order)), 1) / discount).sum(1)
    ndcg = torch.where(idcg > dcg, dcg / idcg, idcg / dcg)
    return F.cross_entropy(inputs, targets) + alpha * (1.0 - ndcg).mean()


def test_rankmixup_losses_against_the_authors_code_on_the_same_input():
    """Cross-check (issue #16 item 8) on the same logits and mixed targets: core's mndcg equals
    the authors' M-NDCG. Core's mrl equals the authors' MRL when no row mixes a class with
    itself; otherwise the authors' (N,) mask times (N, 1) hinges broadcasts to (N, N), so their
    ranking term is mean(mask) * mean(hinge) over every row, where core's is mean(mask * hinge)
    (the paper's "skip self-mixed samples")."""
    g = torch.Generator().manual_seed(0)
    n, c, m = 12, 10, 3
    y = torch.randint(0, c, (n,), generator=g)
    y[:4] = 2  # some pairs mix a class with itself: the MRL mask must drop them
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 3
    mixed = torch.randn(m, n, c, generator=g, dtype=torch.float64) * 3
    soft = []
    for lam in (0.7, 0.55, 0.9):
        perm = torch.randperm(n, generator=g)
        onehot = F.one_hot(y, c).double()
        soft.append(lam * onehot + (1 - lam) * onehot[perm])
    soft = torch.stack(soft)  # (M, N, C)
    ours = mndcg(logits, y, mixed, soft, alpha=0.1)
    theirs = _authors_mndcg(logits, y, mixed.reshape(m * n, c), soft.reshape(m * n, c), m, 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ce = F.cross_entropy(logits, y)
    hinge = F.relu(mixed[0].max(1).values - logits.max(1).values + 2.0)  # (N,)
    mask = ((soft[0] == 1.0).sum(1) == 0).double()
    assert 0 < mask.sum() < n  # self-mixed rows present
    ours = mrl(logits, y, mixed[0], soft[0], margin=2.0, alpha=0.1)
    theirs = _authors_mrl(logits, y, mixed[0], soft[0], margin=2.0, alpha=0.1)
    torch.testing.assert_close(ours, ce + 0.1 * (mask * hinge).mean())
    torch.testing.assert_close(theirs, ce + 0.1 * mask.mean() * hinge.mean())
    assert abs(float(ours - theirs)) > 1e-3
    keep = mask.bool()  # only really mixed rows: the two agree
    ours = mrl(logits[keep], y[keep], mixed[0][keep], soft[0][keep], margin=2.0, alpha=0.1)
    theirs = _authors_mrl(logits[keep], y[keep], mixed[0][keep], soft[0][keep], 2.0, 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_focal_matches_the_authors_code_up_to_its_sum_reduction():
    """Cross-check: Mukhoti et al.'s FocalLoss (github.com/torrvision/focal_calibration,
    Losses/focal_loss.py, size_average False) sums -(1 - p_y)^gamma log p_y over the batch;
    ours is its mean, the same direction for Adam."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 10, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, 10, (9,), generator=g)
    logpt = F.log_softmax(z, dim=1).gather(1, y[:, None]).view(-1)
    theirs = (-1 * (1 - logpt.exp()) ** 3.0 * logpt).sum()
    module = LossClassifier(mlp(3, [4], 10), {"fn": "focal", "gamma": 3.0}, lr=1e-3, n_classes=10)
    ours = module.loss_fn(z, y, **module.hp)
    torch.testing.assert_close(ours * 9, theirs)


def test_bad_loss_specs_are_refused_by_name():
    with pytest.raises(KeyError, match="no_such_loss"):
        _module({"fn": "no_such_loss"})
    with pytest.raises(ValueError, match="mixup_alpha"):
        _module({"fn": "mrl", "alpha": 0.1})
    with pytest.raises(ValueError, match="n_mixups"):
        _module({"fn": "ce", "n_mixups": 2})
    with pytest.raises(ValueError, match="lr"):
        LossClassifier(mlp(3, [4], 2), {"fn": "ce"}, lr=0.0, n_classes=2)
    with pytest.raises(ValueError, match="model.name"):
        build_net({"name": "vgg"}, 10)


def test_fabric_loop_takes_the_same_two_adam_steps_as_a_hand_loop():
    """Two steps of ``overlap.fit_fabric`` equal two hand-written Adam steps from the same init
    (a dropped zero_grad or a missing step would show in the second one)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)
    seed_everything(0)
    module = LossClassifier(mlp(3, [4], 2), {"fn": "ce"}, lr=0.1, n_classes=2)
    ref = mlp(3, [4], 2)
    ref.load_state_dict(module.net.state_dict())
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    overlap.fit_fabric(module, loader, 1, {"accelerator": "cpu", "devices": 1})
    opt = torch.optim.Adam(ref.parameters(), lr=0.1)
    for xb, yb in ((x[:4], y[:4]), (x[4:], y[4:])):
        opt.zero_grad()
        F.cross_entropy(ref(xb), yb).backward()
        opt.step()
    for p, q in zip(module.net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert set(module.history) == {0} and module.history[0]["train_loss"] > 0


def test_validation_metrics_accumulated_by_torchmetrics_equal_the_functions(tmp_path):
    """The per-epoch val ECE / NLL / accuracy (torchmetrics, over batches of 7) equal
    core.calibration's functions on all the validation logits at once."""
    seed_everything(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 3, generator=g), torch.randint(0, 3, (50,), generator=g)
    module = LossClassifier(mlp(3, [8], 3), {"fn": "ce"}, lr=0.05, n_classes=3, n_bins=10)
    trainer = build_trainer(
        {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        tmp_path,
        logger=False,
        checkpoint=False,
        max_epochs=2,
        num_sanity_val_steps=0,
    )
    val = DataLoader(TensorDataset(x, y), batch_size=7)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=10), val)
    with torch.no_grad():
        probs = module(x).double().softmax(1)
    last = module.history[1]
    assert last["val_ece"] == pytest.approx(float(expected_calibration_error(probs, y, 10)))
    assert last["val_nll"] == pytest.approx(float(negative_log_likelihood(probs, y)), rel=1e-6)
    assert last["val_acc"] == pytest.approx(float(probs.argmax(1).eq(y).double().mean()))
    assert set(module.history) == {0, 1} and "train_loss" in last


@pytest.mark.parametrize("scale", [0.3, 10.0], ids=["underconfident", "overconfident"])
def test_authors_temperature_fit_stops_short_of_the_nll_optimum(scale):
    """Chidambaram & Ge's fit (one L-BFGS call on T, lr 0.01, 20 iterations) moves T from 1
    towards the NLL optimum, which our TemperatureScaling reaches, and stops well short of it."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (2000,), generator=g)
    z = scale * (torch.randn(2000, 3, generator=g) + 2 * F.one_hot(y, 3))
    ours = float(TemperatureScaling().fit(z, y).temperature)
    theirs = authors_temperature(z, y)
    nll = {t: float(F.cross_entropy(z.double() / t, y)) for t in (ours, theirs, 1.0)}
    assert nll[ours] < nll[theirs] < nll[1.0]
    lo, hi = sorted((1.0, ours))
    assert lo < theirs < hi  # moved towards the optimum ...
    assert abs(theirs - 1.0) < 0.5 * abs(ours - 1.0)  # ... less than half of the way
    with pytest.raises(ValueError, match="logits"):
        authors_temperature(z[0], y)


# --- the stages on fake data -------------------------------------------------------------


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
        # class-dependent brightness so a few steps learn something
        images = (torch.rand(n, 28, 28, generator=g) * 100 + labels[:, None, None] * 15).byte()
        torch.save({"images": images, "labels": labels}, fm / f"{split}.pt")
    test = torch.load(fm / "test.pt")
    for name in fmnist_data.CORRUPTIONS:
        np.save(fmc / f"{name}.npy", np.stack([test["images"].numpy()] * 5))
    np.save(fmc / "labels.npy", test["labels"].numpy())
    return fm, fmc


TINY = {
    "fmnist.seeds": [1, 2],
    "fmnist.cal_size": 100,
    "fmnist.train_size": 200,
    "fmnist.val_size": 50,
    "fmnist.test_size": 40,
    "fmnist.ca_epochs": 20,
    "fmnist.model": {"name": "small_cnn", "channels": [2, 4], "hidden": 8},
    "fmnist.optim": {"lr": 1e-3, "batch_size": 50, "epochs": 2},
    "fmnist.ood": {"severities": [3, 5], "per_corruption": 4},
    "fmnist.label_noise": {"rates": [0.0, 0.4], "losses": ["erm", "mixup"]},
    "overlap.runs": 2,
    "overlap.data": {
        "dim": 5,
        "n": 200,
        "means": [1.0, 0.2],
        "test_fraction": 0.2,
        "ts_fraction": 0.2,
    },
    "overlap.model": {"hidden": [8]},
    "overlap.optim": {"lr": 1e-3, "batch_size": 50, "epochs": 2},
    "machine.workers": 1,
}


def _tiny(tmp_path, **extra):
    sets = {
        **TINY,
        "paths.results": str(tmp_path / "results"),
        "paths.runs": str(tmp_path / "runs"),
    }
    sets |= extra
    return [f"--set={k}={json.dumps(v)}" for k, v in sets.items()]


def _roots(fake_data):
    return ["--fmnist-root", str(fake_data[0]), "--fmnist-c-root", str(fake_data[1])]


def test_stages_end_to_end_and_run_identity(tmp_path, fake_data, capsys):
    args = _tiny(tmp_path)
    fmnist_train.main([*args, *_roots(fake_data)])
    first = capsys.readouterr().out
    assert first.count("[fmnist-train ") == 16 and "cached" not in first
    runs = tmp_path / "runs" / "fmnist"
    saved = torch.load(runs / "mrl_noise0_seed1" / "logits.pt", weights_only=True)
    assert set(saved["sets"]) == {"cal", "test", "c3", "c5"}
    assert saved["sets"]["c5"]["views"].shape == (6, 19 * 4, 10)
    noisy = torch.load(runs / "erm_noise0.4_seed1" / "logits.pt", weights_only=True)
    assert set(noisy["sets"]) == {"cal", "test"} and noisy["views"] == ("identity",)
    # the identity view is the saved model's own logits
    net = build_net(TINY["fmnist.model"], 10)
    net.load_state_dict(torch.load(runs / "mrl_noise0_seed1" / "model.pt", weights_only=True))
    x = torch.load(fake_data[0] / "test.pt")["images"][:40].float().div(255).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(saved["sets"]["test"]["views"][0], net.eval()(x))
    record = json.loads((runs / "erm_noise0_seed1" / "result.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert {"train_loss", "val_ece", "val_nll", "val_acc"} <= set(record["history"][1])

    # machine knobs change nothing; a changed param recomputes exactly the runs it decides
    fmnist_train.main([*args, "--threads", "2", "--workers", "2", *_roots(fake_data)])
    again = capsys.readouterr().out
    assert again.count("(cached") == 16
    changed = _tiny(tmp_path, **{"fmnist.losses.focal": {"fn": "focal", "gamma": 2.0}})
    fmnist_train.main([*changed, *_roots(fake_data)])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[fmnist-train ")]
    recomputed = [l for l in lines if "cached" not in l]
    assert len(lines) == 16 and len(recomputed) == 2 and all("focal" in l for l in recomputed)

    fmnist_calibrate.main(changed)
    results = tmp_path / "results"
    per_run = json.loads((results / "fmnist" / "runs.json").read_text())
    calibrators = {"none", *_params()["fmnist"]["calibrators"]}
    assert set(per_run["focal_noise0_seed2"]) == calibrators | {"fit", "T"}
    cross = {"none", "temperature", "temperature_authors", "fit", "T"}
    assert set(per_run["erm_noise0.4_seed2"]) == cross
    assert set(per_run["mixup_noise0_seed1"]) == calibrators | cross
    for name, run in per_run.items():
        # temperature scaling and CA (a per-sample temperature) keep the argmax
        for c in ["temperature"] + (["ca", "ca_balanced"] if "noise0_" in name else []):
            assert run[c]["test"]["accuracy"] == run["none"]["test"]["accuracy"]
    assert (results / "fmnist" / "reliability" / "erm_temperature_c5.png").stat().st_size > 1000
    curves = (results / "fmnist" / "curves.csv").read_text().splitlines()
    assert curves[0].startswith("epoch,erm_n0_train_loss") and len(curves) == 3

    overlap.main(changed)
    ov = json.loads((results / "overlap" / "runs.json").read_text())
    methods = {f"{m}{s}" for m in ("erm", "mixup") for s in ("", "+ts", "+ts_authors")}
    assert set(ov) == {"1", "0.2"} and set(ov["1"]) == methods
    assert all(len(v) == 2 for v in ov["1"].values())
    for raw, ts in zip(ov["0.2"]["erm"], ov["0.2"]["erm+ts"], strict=True):
        assert raw["accuracy"] == ts["accuracy"] and ts["T"] > 0

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nSTALE\n<!-- results:end -->\noutro\n")
    report.main([*changed, "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "STALE" not in text
    assert "| 0.2 | ERM + TS |" in text and "reliability/erm_temperature_c5.png" in text
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics["ece"]["mndcg"]) == calibrators
    assert set(metrics["noise_ece"]["erm+ts"]) == {"r0", "r0_4"}
    claims = json.loads((results / "claims.json").read_text())
    assert claims["noise_ts_degrades"]["n"] == 2 and "regime" in claims


# --- the report's claim rule ---------------------------------------------------------------


def _fake_results(erm_ts_by_noise, seeds=(0, 1, 2, 3)):
    """runs.json-like dicts where ERM + TS's per-seed ECE at each noise rate is given and every
    other number is a constant."""
    cfg = _params()["fmnist"]
    sets = ["test", *(f"c{s}" for s in cfg["ood"]["severities"])]
    metric = {"accuracy": 0.9, "ece": 0.05, "adaptive_ece": 0.05, "nll": 0.3, "brier": 0.1}
    fm = {}
    for rate in cfg["label_noise"]["rates"]:
        losses = cfg["losses"] if rate == 0 else cfg["label_noise"]["losses"]
        for loss in losses:
            for i, s in enumerate(seeds):
                run = {c: {k: dict(metric) for k in sets} for c in ["none", *cfg["calibrators"]]}
                if loss == "erm":
                    run["temperature"]["test"]["ece"] = erm_ts_by_noise[rate][i]
                run["fit"] = {"train_acc": 1.0, "train_nll": 0.01}
                run["T"] = {"temperature": 1.5, "temperature_authors": 1.1}
                if loss in cfg["label_noise"]["losses"]:
                    run["temperature_authors"] = {k: dict(metric) for k in sets}
                fm[f"{loss}_noise{float(rate):g}_seed{s}"] = run
    return report.Results({}, fm, cfg | {"seeds": list(seeds)})


@pytest.mark.parametrize(
    ("by_noise", "verdict"),
    [
        (
            {0.0: [0.01, 0.012, 0.011, 0.013], 0.2: [0.02] * 4, 0.4: [0.05, 0.06, 0.055, 0.058]},
            "holds",
        ),
        (
            {0.0: [0.06, 0.062, 0.061, 0.063], 0.2: [0.04] * 4, 0.4: [0.01, 0.012, 0.011, 0.015]},
            "does not hold",
        ),
    ],
    ids=["grows", "shrinks"],
)
def test_ts_degrades_with_noise_verdict_follows_the_data(by_noise, verdict):
    """Fails if the verdict on "TS degrades with overlap" is fixed instead of computed (issue
    #15: a 'grows' flag hard-coded to True passed every calibration test)."""
    res = _fake_results(by_noise)
    params = _params()
    spec = next(s for s in report.claim_specs(res, params) if s.key == "noise_ts_degrades")
    claim = report.judge(spec, params["claims"]["min_effect"])
    assert claim.verdict == verdict
    assert claim.mean == pytest.approx(np.mean(by_noise[0.4]) - np.mean(by_noise[0.0]))


def test_regime_check_needs_ece_above_the_bar():
    res = _fake_results({r: [0.05] * 4 for r in (0.0, 0.2, 0.4)})
    assert report.regime_check(res, 0.05).verdict != "holds"  # ECE exactly at the bar
    assert report.regime_check(res, 0.03).verdict == "holds"


def test_readme_section_regenerates_from_committed_results():
    """The report rebuilds the committed README section, metrics, claims and series byte for
    byte from the committed per-run results (nothing is written)."""
    params = _params()
    results = Path(params["paths"]["results"])
    if not (results / "fmnist" / "runs.json").exists():
        pytest.skip("no committed results yet (the pipeline has not been rerun)")
    committed = Path(report.README).read_text(encoding="utf-8")
    body, metrics, record, csvs = report.build(params, Path(report.README))
    section = re.search(r"<!-- results:start -->\n(.*)<!-- results:end -->", committed, re.S)
    assert section is not None and section.group(1).strip() == body.strip()
    assert json.loads((results / "metrics.json").read_text()) == metrics
    assert json.loads((results / "claims.json").read_text()) == json.loads(json.dumps(record))
    for rel, text in csvs.items():
        assert (results / rel).read_text() == text


# --- pipeline layout ----------------------------------------------------------------------


def test_dvc_stages_follow_house_rules():
    spec = yaml.safe_load(Path("projects/calibration/dvc.yaml").read_text())
    stages = spec["stages"]
    assert set(stages) == {
        "calibration-overlap",
        "calibration-fmnist-train",
        "calibration-fmnist-calibrate",
        "calibration-report",
    }
    for name, stage in stages.items():
        module = name.removeprefix("calibration-").replace("-", "_")
        assert stage["cmd"] == f"python -m projects.calibration.{module}"
        assert stage["wdir"] == "../.."
        for block in stage.get("params", []):
            keys = next(iter(block.values()))
            assert not any(k == "machine" or k.startswith("machine.") for k in keys)
    assert stages["calibration-report"]["metrics"] == [
        {"${paths.results}/metrics.json": {"cache": False}}
    ]
    assert missing_deps("projects/calibration/dvc.yaml") == {}


@pytest.mark.parametrize("variant", ["paper", "gpu"])
def test_variants_parse_for_every_stage_and_write_beside_the_defaults(variant):
    default = _params()
    for module in ENTRY_POINTS:
        parser = module.entry_parser("x", PARAMS)
        _, params, _ = module.parse_entry(parser, ["--variant", variant])
        assert params["paths"]["results"] != default["paths"]["results"]
        assert params["paths"]["runs"] != default["paths"]["runs"]
        assert set(params) == set(default)  # an overlay: every key the stages need is there
        for job in fmnist_train.jobs(params["fmnist"]):  # every loss spec builds
            spec = params["fmnist"]["losses"][job[0]]
            _module(spec)
