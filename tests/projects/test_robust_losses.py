"""robust_losses units: params, label noise, the authors' logit maps, the module, the report rules."""

import math

import numpy as np
import pytest
import torch

from core.engine.config import load_params
from core.engine.variants import exp_command
from core.losses import LOSSES, get_loss
from core.report.claims import mde
from projects.robust_losses import DEFAULT_PARAMS, report, train
from projects.robust_losses.label_noise import (
    ASYM_FLIPS,
    CLEAN,
    NUM_CLASSES,
    asymmetric_noise,
    condition_key,
    condition_name,
    conditions,
    noisy_labels,
    symmetric_noise,
)
from projects.robust_losses.model import LOGIT_MAPS, NoisyLabelMLP, l1_mean, softplus_mean


@pytest.mark.parametrize("entry", [train, report])
def test_entry_points_help(entry, capsys):
    with pytest.raises(SystemExit) as e:
        entry.main(["--help"])
    assert e.value.code == 0 and "--params" in capsys.readouterr().out


@pytest.mark.parametrize("variant", [None, "full"])
def test_params_and_variant_name_only_registered_losses_and_known_conditions(variant):
    p = load_params(DEFAULT_PARAMS, variant=variant)
    for name, hp in p["losses"].items():
        assert name in LOSSES.names()
        logits, y = torch.randn(5, NUM_CLASSES), torch.arange(5)
        assert torch.isfinite(get_loss(name)(logits, y, **(hp or {})))  # hp names accepted
    assert set(p["logit_maps"]) <= set(p["losses"]) and set(p["logit_maps"].values()) <= set(
        LOGIT_MAPS
    )
    assert set(p["probe"]["losses"]) <= set(p["losses"]) and "ce" in p["probe"]["losses"]
    keys = [condition_key(n, r) for n, r in conditions(p["noise"])]
    assert keys[0] == CLEAN and p["report"]["fit_condition"] in keys
    for c in p["report"]["claims"]:
        assert {c["a"], c["b"]} <= set(p["losses"]) and c["min_effect"] > 0
    assert len(p["seeds"]) >= 5 and "threads" in p["machine"]
    if variant:  # its own outputs, a valid `make exp` command line
        assert "full" in p["paths"]["results"] and "full" in p["paths"]["runs"]
        assert exp_command("robust_losses", variant)[:3] == ["dvc", "exp", "run"]


def test_conditions_reject_unknown_noise_and_bad_rates():
    with pytest.raises(ValueError, match="unknown noise"):
        conditions({"pairflip": [0.2]})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        conditions({"symmetric": [1.2]})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        symmetric_noise(np.arange(10), -0.1, np.random.default_rng(0))
    assert conditions({"symmetric": [0.0, 0.4], "asymmetric": [0.4]}) == [
        (CLEAN, 0.0),
        ("symmetric", 0.4),
        ("asymmetric", 0.4),
    ]
    assert condition_name("symmetric", 0.4) == "symmetric 40%"
    assert condition_key("asymmetric", 0.2) == "asym20" and condition_key(CLEAN, 0) == CLEAN
    assert report.label("sym40") == "symmetric 40%" and report.label(CLEAN) == CLEAN
    y = np.arange(100) % NUM_CLASSES
    assert (noisy_labels(y, CLEAN, 0.0, seed=0) == y).all()


def test_symmetric_noise_rate_and_always_another_class():
    y = np.random.default_rng(0).integers(0, NUM_CLASSES, 20000)
    noisy = symmetric_noise(y, 0.4, np.random.default_rng(1))
    flipped = noisy != y
    assert flipped.mean() == pytest.approx(0.4, abs=0.015)
    diffs = (noisy[flipped] - y[flipped]) % NUM_CLASSES  # spread over the 9 other classes
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


def test_logit_maps_by_hand():
    s = math.log(math.e - 1)  # softplus(s) = 1, softplus(0) = log 2
    out = softplus_mean(torch.tensor([[0.0, s]], dtype=torch.float64))
    m = (math.log(2) + 1) / 2
    torch.testing.assert_close(out, torch.tensor([[math.log(2) / m, 1 / m]], dtype=torch.float64))
    out = l1_mean(torch.tensor([[4.0, -2.0, 0.0, 2.0]]))  # mean |z| = 2
    torch.testing.assert_close(out, torch.tensor([[2.0, -1.0, 0.0, 1.0]]))
    z = 5 * torch.randn(64, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    for fn in LOGIT_MAPS.values():  # prediction from raw logits = from mapped logits
        assert (fn(z).argmax(1) == z.argmax(1)).all()
    assert torch.isfinite(l1_mean(torch.zeros(1, 3))).all()


def _authors_ldr(z, y, lam, margin):
    """LDRLoss_V1 of github.com/DixianZhu/LDR (loss.py) re-derived in float64: logits mapped to
    softplus(z) / mean softplus(z), then lam log mean_k exp((margin [k != y] + s_k - s_y) / lam)."""
    s = torch.nn.functional.softplus(z)
    s = s / s.mean(1, keepdim=True)
    a = (
        margin * (1 - torch.nn.functional.one_hot(y, z.shape[1]).to(z.dtype))
        + s
        - s.gather(1, y[:, None])
    )
    return (lam * torch.log(torch.exp(a / lam).mean(1))).mean()


def _authors_aldr_fixed_point(z, y, lam0, alpha, margin, visits=500):
    """ALDRLoss_V1's per-sample lam update (lam <- lam0 (1 - KL(softmax(a / lam) || 1/C) /
    (alpha log C)), one step per visit of a sample) iterated to its fixed point in float64,
    on logits mapped to z / mean |z|; returns the loss at that lam."""
    c = z.shape[1]
    zz = z / z.abs().mean(1, keepdim=True)
    a = margin * (1 - torch.nn.functional.one_hot(y, c).to(z.dtype)) + zz - zz.gather(1, y[:, None])
    lam = torch.full((len(z), 1), lam0, dtype=z.dtype)
    for _ in range(visits):
        p = torch.softmax(a / lam, 1)
        kl = (p * torch.log(c * p)).sum(1, keepdim=True)
        lam = lam0 - lam0 * kl / (alpha * math.log(c))
    penalty = alpha * math.log(c) / (2 * lam0) * (lam - lam0) ** 2
    return (lam * torch.log(torch.exp(a / lam).mean(1, keepdim=True)) - penalty).mean()


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_mapped_ldr_and_aldr_match_the_authors_losses(lam):
    """Our core losses on the project's logit maps give the authors' LDR-KL exactly, and ALDR-KL
    at the fixed point their per-sample update converges to (we maximise over lam exactly)."""
    g = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(64, NUM_CLASSES, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (64,), generator=g)
    ours = get_loss("ldr_kl")(softplus_mean(z), y, lam=lam, margin=0.1)
    torch.testing.assert_close(ours, _authors_ldr(z, y, lam, 0.1), rtol=1e-12, atol=1e-12)
    ours = get_loss("aldr_kl")(l1_mean(z), y, lam0=lam, alpha=2.0, margin=0.1, grid=4096)
    theirs = _authors_aldr_fixed_point(z, y, lam, 2.0, 0.1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def _data(n=96, m=40):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = torch.randn(n, 784, generator=g) + 3 * torch.nn.functional.one_hot(y, 784).float()
    return {
        "x_train": x,
        "y_train": y.numpy(),
        "x_test": x[:m],
        "y_test": y[:m],
        "x_probe": x[:m],
        "y_probe": y[:m],
    }


def _module(loss="aldr_kl", logit_map="l1_mean", probe=None):
    d = _data()
    eval_data = {k: d[k] for k in ("x_test", "y_test", "x_train")}
    eval_data["y_train_noisy"] = torch.from_numpy(d["y_train"])
    if probe:
        eval_data |= {"x_probe": d["x_probe"], "y_probe": d["y_probe"]}
    hp = {"lam0": 1.0, "alpha": 2.0, "margin": 0.1} if loss == "aldr_kl" else {}
    optim = {"lr": 1e-3, "weight_decay": 0.0}
    return NoisyLabelMLP(loss, hp, [16], optim, eval_data, logit_map=logit_map, probe=probe), d


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_applies_the_logit_map_and_eval_tensors_follow_the_device():
    torch.manual_seed(0)
    model, d = _module()
    x, y = d["x_train"][:8], torch.from_numpy(d["y_train"][:8])
    want = get_loss("aldr_kl")(l1_mean(model(x)), y, lam0=1.0, alpha=2.0, margin=0.1)
    torch.testing.assert_close(model.training_step((x, y), 0), want)
    assert "x_test" not in model.state_dict()  # eval data stays out of checkpoints
    model.to("meta")  # any device: the eval tensors move with the module
    assert {b.device.type for b in model.buffers()} == {"meta"}
    with pytest.raises(ValueError, match="logit_map"):
        _module(logit_map="softmax")
    with pytest.raises(ValueError, match="optim.schedule"):
        NoisyLabelMLP("ce", {}, [4], {"lr": 1, "weight_decay": 0, "schedule": "step"}, {})


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the train stage's workers do
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_train_run_history_on_the_cpu_accelerator(one_thread, schedule):
    p = load_params(DEFAULT_PARAMS, overrides={"trainer.max_epochs": 2, "model.hidden": [16]})
    p["optim"]["schedule"] = schedule
    p["probe"]["n"] = 40
    rec = train.train_run(p, _data(), ("symmetric", 0.4, 0, "ce"))
    hist = rec["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2] and 0.2 < rec["actual_noise"] < 0.6
    assert all(0 <= h["test_acc"] <= 1 and 0 <= h["fit_noisy_train_acc"] <= 1 for h in hist)
    assert all(np.isfinite(h["dse"]) for h in hist)  # ce is probed: DSE every epoch,
    assert np.isnan(hist[0]["dsmi_y"]) and np.isfinite(hist[-1]["dsmi_y"])  # DSMI at the end
    rec = train.train_run(p, _data(), ("symmetric", 0.4, 0, "gce"))
    assert "dse" not in rec["history"][-1]  # not probed
    s = train.summary(("symmetric", 0.4, 0, "gce"), rec | {"wall_s": 1.0, "cached": False})
    assert s["peak_test_acc"] == max(h["test_acc"] for h in rec["history"][1:])
    assert s["condition"] == "sym40" and s["test_acc"] == rec["history"][-1]["test_acc"]


def _runs(acc: dict[tuple[str, str], list[float]], metric="test_acc") -> list[dict]:
    return [
        {"condition": c, "loss": lo, "seed": s, metric: a}
        for (c, lo), accs in acc.items()
        for s, a in enumerate(accs)
    ]


def test_accuracy_and_drop_claims_use_the_paired_rule_with_its_mde():
    acc = {
        ("sym40", "ce"): [0.60, 0.62, 0.58, 0.61],
        ("sym40", "gce"): [0.70, 0.71, 0.69, 0.70],  # +10, +9, +11, +9 points
        ("asym40", "ce"): [0.70, 0.71, 0.69, 0.70],
        ("asym40", "gce"): [0.702, 0.713, 0.689, 0.701],  # +0.1 points: below min 1
    }
    claims = [{"a": "gce", "b": "ce", "min_effect": 1.0, "paper": "x"}]
    sym, asym = report.accuracy_claims(_runs(acc), claims, ["sym40", "asym40"])
    d = np.array([10.0, 9.0, 11.0, 9.0])
    assert sym["mean"] == pytest.approx(d.mean()) and sym["verdict"] == "holds"
    assert sym["se"] == pytest.approx(d.std(ddof=1) / 2)
    assert sym["mde"] == pytest.approx(mde(d.std(ddof=1) / 2, 4))
    assert asym["verdict"] == "does not hold" and "MDE" in asym["text"]
    peaks = _runs({("sym40", "ce"): [0.78, 0.79, 0.77, 0.80]}, "peak_test_acc")
    finals = _runs({("sym40", "ce"): [0.60, 0.62, 0.58, 0.61]})
    runs = [a | b for a, b in zip(peaks, finals, strict=True)]
    (drop,) = report.drop_claims(runs, "ce", ["sym40"], 1.0)
    assert drop["mean"] == pytest.approx(18.25) and drop["verdict"] == "holds"


def test_dse_claims_from_initialisation_and_epoch_1():
    dse = {0: [5.0, 5.1, 5.2], 1: [3.0, 3.1, 2.9], 2: [3.5, 3.6, 3.4]}  # epoch -> seeds
    curves = [
        {"condition": CLEAN, "loss": "ce", "seed": str(s), "epoch": str(e), "dse": str(v)}
        for e, vs in dse.items()
        for s, v in enumerate(vs)
    ]
    from_init, from_1 = report.dse_claims(curves, "ce", [CLEAN], 0.1)
    assert from_init["verdict"] == "does not hold" and from_init["mean"] == pytest.approx(-1.6)
    assert from_1["verdict"] == "holds" and from_1["mean"] == pytest.approx(0.5)
