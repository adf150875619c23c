import csv
import json

import numpy as np
import pytest
import torch
import yaml

from core.losses import LOSSES, get_loss
from projects.robust_losses import report, train
from projects.robust_losses.common import (
    ASYM_FLIPS,
    CLEAN,
    NUM_CLASSES,
    asymmetric_noise,
    condition_name,
    conditions,
    load_params,
    noisy_labels,
    symmetric_noise,
)
from projects.robust_losses.report import accuracy_claim, aggregate, dse_claim, overall, verdict


def test_params_load_every_loss_registered_and_the_noise_grid():
    p = load_params()
    for name, hp in p["losses"].items():
        assert name in LOSSES.names()
        logits, y = torch.randn(5, NUM_CLASSES), torch.arange(5)
        assert torch.isfinite(get_loss(name)(logits, y, **(hp or {})))  # hp names accepted
    assert len(p["seeds"]) >= 3 and p["workers"] >= 1
    conds = conditions(p["noise"])
    assert conds[0] == (CLEAN, 0.0) and sum(n == CLEAN for n, _ in conds) == 1
    assert {(n, r) for n, r in conds[1:]} == {
        (n, r) for n in ("symmetric", "asymmetric") for r in (0.2, 0.4, 0.6)
    }


def test_conditions_reject_unknown_noise_and_name_conditions():
    with pytest.raises(ValueError, match="unknown noise"):
        conditions({"pairflip": [0.2]})
    assert condition_name("symmetric", 0.4) == "symmetric 40%"
    assert condition_name(CLEAN, 0.0) == "clean"
    y = np.arange(100) % NUM_CLASSES
    assert (noisy_labels(y, CLEAN, 0.0, seed=0) == y).all()


def test_symmetric_noise_rate_and_always_another_class():
    y = np.random.default_rng(0).integers(0, NUM_CLASSES, 20000)
    noisy = symmetric_noise(y, 0.4, np.random.default_rng(1))
    flipped = noisy != y
    assert flipped.mean() == pytest.approx(0.4, abs=0.015)
    # flipped labels are spread uniformly over the 9 other classes
    diffs = (noisy[flipped] - y[flipped]) % NUM_CLASSES
    assert np.bincount(diffs, minlength=NUM_CLASSES)[0] == 0
    assert np.bincount(diffs)[1:].min() > 0.8 * flipped.sum() / 9


@pytest.mark.parametrize("rate", [0.4, 0.6])
def test_asymmetric_noise_follows_the_flip_map(rate):
    y = np.repeat(np.arange(NUM_CLASSES), 2000)
    noisy = asymmetric_noise(y, rate, np.random.default_rng(2))
    for c in range(NUM_CLASSES):
        rows = noisy[y == c]
        if c in ASYM_FLIPS:
            assert set(np.unique(rows)) == {c, ASYM_FLIPS[c]}
            assert (rows != c).mean() == pytest.approx(rate, abs=0.04)
        else:
            assert (rows == c).all()


def _synthetic_data(n=256):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = torch.randn(n, 784, generator=g) + 2 * torch.nn.functional.one_hot(y, 784).float()
    return {
        "x_train": x,
        "y_train": y.numpy(),
        "x_test": x[:64],
        "y_test": y[:64],
        "x_probe": x[:40],
        "y_probe": y[:40].numpy(),
    }


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the train stage does: a tiny MLP is fastest on one thread
    yield
    torch.set_num_threads(threads)


def test_run_one_history_and_report_aggregate(one_thread):
    data = _synthetic_data()
    p = load_params()
    p["trainer"]["max_epochs"] = 2
    hist = train.run_one(p, data, "gce", data["y_train"], seed=0)
    assert [h["epoch"] for h in hist] == [0, 1, 2]  # 0 = initialisation
    assert all(0 <= h["test_acc"] <= 1 and np.isfinite(h["dse"]) for h in hist)
    assert np.isnan(hist[0]["dsmi_y"]) and np.isfinite(hist[-1]["dsmi_y"])  # DSMI: last only
    runs = [
        {"condition": "symmetric 40%", "loss": "gce", "seed": s, "best_test_acc": h["test_acc"]}
        | {k: h[k] for k in ("test_acc", "fit_noisy_train_acc", "dse", "dsmi_y")}
        for s, h in enumerate(hist[1:])
    ]
    agg = aggregate(runs)
    accs = [h["test_acc"] for h in hist[1:]]
    assert agg["symmetric 40%"]["gce"]["test_acc"] == pytest.approx(
        [np.mean(accs), np.std(accs), 2]
    )


def test_per_run_results_are_skipped_and_a_killed_stage_resumes(tmp_path, monkeypatch, one_thread):
    p = load_params()
    p.update(seeds=[0], workers=1, noise={"symmetric": [0.0, 0.4]})
    p["losses"] = {"ce": {}, "mae": {}}
    p["trainer"]["max_epochs"] = 1
    p["paths"] = {"results": str(tmp_path / "results"), "outputs": str(tmp_path / "runs")}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(p))
    monkeypatch.setattr(train, "prepare_data", lambda p: _synthetic_data())
    monkeypatch.setattr(train, "_DATA", {})
    trained = []
    real_run_one = train.run_one

    def counting_run_one(p, data, loss, y, seed):
        trained.append(loss)
        return real_run_one(p, data, loss, y, seed)

    monkeypatch.setattr(train, "run_one", counting_run_one)
    assert train.main(["--params", str(params)]) == 0
    assert len(trained) == 4 and len(list((tmp_path / "runs").glob("*.json"))) == 4
    first = json.loads((tmp_path / "results" / "metrics.json").read_text())["runs"]

    # a stage killed after 3 runs: the 4th file is missing; only that run trains again
    (tmp_path / "runs" / "symmetric-40-mae-s0.json").unlink()
    trained.clear()
    assert train.main(["--params", str(params)]) == 0
    assert trained == ["mae"]
    again = json.loads((tmp_path / "results" / "metrics.json").read_text())["runs"]
    assert [r["cached"] for r in again] == [True, True, True, False]
    for a, b in zip(first, again, strict=True):  # deterministic: same numbers after resuming
        assert a["test_acc"] == pytest.approx(b["test_acc"]) and a["condition"] == b["condition"]
    with open(tmp_path / "results" / "curves.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 * 2  # epochs 0 and 1 per run

    # a changed config or code re-runs; the same one is read back
    job = ("symmetric", 0.4, 0, "ce")
    assert train.run_job(job, p, "code-a")["cached"] is False
    assert train.run_job(job, p, "code-a")["cached"] is True
    p["optim"]["lr"] = 0.002
    trained.clear()
    train.run_job(job, p, "code-a")
    assert trained == ["ce"]


def _runs(acc: dict[tuple[str, str], list[float]]) -> list[dict]:
    return [
        {"condition": c, "loss": lo, "seed": s, "test_acc": a}
        for (c, lo), accs in acc.items()
        for s, a in enumerate(accs)
    ]


def test_verdict_needs_a_gap_above_seed_spread_and_threshold():
    assert verdict(np.array([1.0, 1.2, 0.8]), 0.5) == "holds"
    assert verdict(np.array([-1.0, -1.2, -0.8]), 0.5) == "does not hold"
    assert verdict(np.array([0.3, 0.3, 0.3]), 0.5) == "not supported"  # below 0.5 points
    assert verdict(np.array([3.0, -1.0, 1.0]), 0.5) == "not supported"  # mean 1 < std 1.63
    assert overall(["holds", "holds", "not supported"]) == "holds"
    assert overall(["holds", "not supported", "not supported"]) == "not supported"
    assert overall(["holds", "holds", "does not hold"]) == "not supported"
    assert overall(["does not hold", "not supported"]) == "does not hold"
    assert overall(["not supported"] * 3) == "not supported"


def test_accuracy_and_dse_claims_on_synthetic_numbers():
    acc = {
        ("symmetric 40%", "ce"): [0.70, 0.71, 0.69],
        ("symmetric 40%", "aldr_kl"): [0.73, 0.74, 0.72],  # +3 points each seed
        ("asymmetric 40%", "ce"): [0.70, 0.71, 0.69],
        ("asymmetric 40%", "aldr_kl"): [0.702, 0.713, 0.689],  # +0.1: below 0.5 points
    }
    c = accuracy_claim(_runs(acc), "aldr_kl", "ce", ["symmetric 40%", "asymmetric 40%"], 0.5)
    assert c["conditions"]["symmetric 40%"]["gap"] == pytest.approx(3.0)
    assert c["conditions"]["symmetric 40%"]["verdict"] == "holds"
    assert c["conditions"]["asymmetric 40%"]["verdict"] == "not supported"
    assert c["overall"] == "holds"
    acc[("asymmetric 40%", "aldr_kl")] = [0.68, 0.69, 0.67]  # -2 points: reversed there
    c = accuracy_claim(_runs(acc), "aldr_kl", "ce", ["symmetric 40%", "asymmetric 40%"], 0.5)
    assert c["overall"] == "not supported"

    dse = {0: [5.0, 5.1, 5.2], 1: [3.0, 3.1, 2.9], 2: [3.5, 3.6, 3.4]}  # epoch -> seeds
    curves = [
        {"condition": CLEAN, "loss": "ce", "seed": str(s), "epoch": str(e), "dse": str(v)}
        for e, vs in dse.items()
        for s, v in enumerate(vs)
    ]
    d = dse_claim(curves, [CLEAN], "ce", 0.1)[CLEAN]
    assert d["from_init"] == "does not hold" and d["from_epoch1"] == "holds"
    assert d["dse"]["1"] == pytest.approx(3.0)


def test_report_main_writes_tables_plots_and_claims(tmp_path):
    rng = np.random.default_rng(0)
    conds = [(CLEAN, 0.0), ("symmetric", 0.4), ("asymmetric", 0.4)]
    runs, curves = [], []
    for noise, rate in conds:
        name = condition_name(noise, rate)
        for loss in ("ce", "ldr_kl", "aldr_kl"):
            for seed in range(3):
                m = {k: float(rng.uniform(0.5, 0.9)) for k in report.METRICS}
                runs.append({"condition": name, "noise": noise, "rate": rate, "loss": loss})
                runs[-1] |= {"seed": seed, "actual_noise": rate, **m}
                curves += [
                    {"condition": name, "loss": loss, "seed": seed, "epoch": e}
                    | {"dse": 3 + e * rng.uniform(), "test_acc": 0.8}
                    for e in range(3)
                ]
    res = tmp_path / "results"
    res.mkdir()
    (res / "metrics.json").write_text(json.dumps({"runs": runs}))
    with open(res / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(curves[0]))
        w.writeheader()
        w.writerows(curves)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nSTALE\n<!-- results:end -->\n")
    p = load_params()
    p["paths"]["results"] = str(res)
    p["report"]["readme"] = str(readme)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    assert report.main(["--params", str(tmp_path / "params.yaml")]) == 0
    text = readme.read_text()
    assert "STALE" not in text and "| aldr_kl |" in text and "symmetric 40%" in text
    assert "more robust to label noise than CE" in text and "DSE init" in text
    assert (res / "accuracy.png").stat().st_size > 0 and (res / "dse.png").stat().st_size > 0
    claims = json.loads((res / "report.json").read_text())["claims"]
    assert (
        claims["accuracy"]["ALDR-KL is more robust to label noise than CE (Zhu et al.)"]["overall"]
        in report.VERDICTS
    )
