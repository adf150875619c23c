"""projects/kd image part: params, losses per method, online detaching, metrics, run cache, and
the teacher -> offline -> online -> report pipeline on fake data."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from core.losses import DIVERGENCES
from core.models.cnn import SmallCNN
from projects.kd import common, image_offline, image_online, image_teacher, report

PARAMS = common.load_params()
IMAGE = PARAMS["image"]
OFFLINE = IMAGE["offline"]
ONLINE = IMAGE["online"]["methods"]


def _terms():
    for method in OFFLINE.values():
        yield from method.get("terms", [])
    for method in ONLINE.values():
        yield from method["student"] + method["teacher"]


def test_params_name_registered_divergences_and_cover_every_one():
    used = {t["divergence"] for t in _terms()}
    assert used <= set(DIVERGENCES), used - set(DIVERGENCES)
    covered = {t["divergence"] for m in OFFLINE.values() for t in m.get("terms", [])}
    missing = set(DIVERGENCES) - covered
    assert not missing, f"add an image.offline method for the divergences {sorted(missing)}"
    assert "ce" in OFFLINE and not OFFLINE["ce"]["terms"]
    assert "bdkd" in ONLINE and "dml" in ONLINE
    assert len(IMAGE["seeds"]) >= 3 and IMAGE["n_bins"] == 15


def _tiny_student():
    return SmallCNN((2, 4), 8)


@pytest.mark.parametrize("name", list(OFFLINE))
def test_one_offline_step_per_method_gives_finite_loss_and_gradients(name):
    torch.manual_seed(0)
    method = image_offline.resolve_method(OFFLINE[name], IMAGE["temperature"])
    model = common.DualHead(_tiny_student()) if method["aux_head"] else _tiny_student()
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    teacher = torch.randn(16, 10) * 3
    logits, aux = model.both(x) if method["aux_head"] else (model(x), None)
    loss = common.offline_loss(method, logits, aux, teacher, y, progress=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if method["aux_head"]:
        assert model.aux.weight.grad.abs().sum() > 0
    # KD terms change the loss relative to CE alone (the teacher is used)
    if method["terms"]:
        ce_only = method["ce_weight"] * F.cross_entropy(logits, y)
        assert not torch.allclose(loss, ce_only)


def test_offline_loss_is_hinton_mix_for_forward_kl():
    """0.1 CE + 0.9 T^2 KL(p_t || p_s), against a float64 closed form."""
    method = image_offline.resolve_method(OFFLINE["forward_kl"], IMAGE["temperature"])
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(7, 10, generator=g), torch.randn(7, 10, generator=g), torch.arange(7)
    got = common.offline_loss(method, s, None, t, y, progress=1.0)
    T = IMAGE["temperature"]
    ps, pt = (s.double() / T).softmax(-1), (t.double() / T).softmax(-1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    want = 0.1 * F.cross_entropy(s.double(), y) + 0.9 * T**2 * kl
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_warmup_ramps_the_term_linearly():
    term = {"divergence": "forward_kl", "weight": 2.0, "temperature": 1.0, "warmup": 0.5}
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.arange(5)
    full = common.divergence_term(term, s, t, y, progress=1.0)
    assert common.divergence_term(term, s, t, y, progress=0.25).item() == pytest.approx(
        0.5 * full.item(), rel=1e-6
    )
    assert common.divergence_term(term, s, t, y, progress=0.6).item() == pytest.approx(full.item())


@pytest.mark.parametrize("name", list(ONLINE))
def test_online_losses_train_each_network_only_through_its_own_loss(name):
    torch.manual_seed(0)
    method = image_online.resolve_method(ONLINE[name], IMAGE["online"]["temperature"])
    student, teacher = _tiny_student(), SmallCNN((3, 5), 8)
    x, y = torch.rand(12, 1, 28, 28), torch.arange(12) % 10
    loss_s, loss_t = common.online_losses(method, student(x), teacher(x), y, progress=1.0)
    assert torch.isfinite(loss_s) and torch.isfinite(loss_t)
    loss_t.backward(retain_graph=True)
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for p in teacher.parameters())
    teacher.zero_grad(set_to_none=True)
    loss_s.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_dml_teacher_term_is_kl_from_student_to_teacher():
    """The teacher's reverse_kl(s.detach(), t) is KL(p_s || p_t): DML's peer loss for the teacher."""
    method = image_online.resolve_method(ONLINE["dml"], 1.0)
    g = torch.Generator().manual_seed(2)
    s, t, y = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), torch.arange(6)
    _, loss_t = common.online_losses(method, s, t, y, progress=1.0)
    ps, pt = s.double().softmax(-1), t.double().softmax(-1)
    want = F.cross_entropy(t.double(), y) + (ps * (ps.log() - pt.log())).sum(-1).mean()
    assert loss_t.item() == pytest.approx(want.item(), rel=1e-5)


def test_dual_head_aux_reads_the_input_of_the_last_linear():
    torch.manual_seed(0)
    model = common.DualHead(_tiny_student())
    x = torch.rand(4, 1, 28, 28)
    main, aux = model.both(x)
    assert torch.equal(main, model(x)) and aux.shape == (4, 10)
    net = model.net
    h = net.head[:-1](net.features((x - 0.2860) / 0.3530))  # SmallCNN's documented pipeline
    torch.testing.assert_close(aux, model.aux(h))
    assert not net.head[-1]._forward_hooks  # the hook is removed


def test_classification_metrics_against_numpy():
    g = torch.Generator().manual_seed(3)
    logits, labels = (
        torch.randn(500, 10, generator=g) * 2,
        torch.randint(0, 10, (500,), generator=g),
    )
    got = common.classification_metrics(logits, labels, n_bins=15)
    p = torch.softmax(logits.double(), -1).numpy()
    y = labels.numpy()
    conf, pred = p.max(1), p.argmax(1)
    ece = 0.0
    edges = np.linspace(0, 1, 16)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    assert got["accuracy"] == pytest.approx((pred == y).mean())
    assert got["ece"] == pytest.approx(ece, abs=1e-9)
    assert got["nll"] == pytest.approx(-np.log(p[np.arange(500), y]).mean(), rel=1e-9)


def test_summarise_mean_and_sample_std():
    runs = [{"method": "a", "metrics": {"accuracy": v}} for v in (0.8, 0.82, 0.87)]
    row = common.summarise(runs)["a"]
    assert row["n"] == 3
    assert row["accuracy_mean"] == pytest.approx(np.mean([0.8, 0.82, 0.87]))
    assert row["accuracy_std"] == pytest.approx(np.std([0.8, 0.82, 0.87], ddof=1))


# --- pipeline on fake data -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 240), ("test", 60)):
        labels = torch.arange(n) % 10
        # class-dependent brightness so a few steps learn something
        images = (torch.rand(n, 28, 28, generator=g) * 100 + labels[:, None, None] * 15).byte()
        torch.save({"images": images, "labels": labels}, root / f"{split}.pt")
    return root


def test_pipeline_on_fake_data_writes_results_and_resumes(fake_fmnist, tmp_path):
    params = common.load_params()
    cfg = params["image"]
    cfg["data"].update(train_size=200, test_size=60)
    cfg["teacher"].update(channels=[4, 8], hidden=16)
    cfg["student"].update(channels=[2, 4], hidden=8)
    cfg["optim"].update(epochs=1, batch_size=100)
    cfg.update(seeds=[0, 1], workers=1)
    cfg["paths"] = {"outputs": str(tmp_path / "out"), "results": str(tmp_path / "res/image")}
    params["report"] = {"readme": str(tmp_path / "README.md"), "results": str(tmp_path / "res")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    argv = ["--params", str(path), "--fmnist-root", str(fake_fmnist)]

    teacher = image_teacher.main(argv)
    assert (tmp_path / "out/teacher.pt").exists() and 0 <= teacher["metrics"]["ece"] <= 1
    offline = image_offline.main(argv)
    assert len(offline["runs"]) == 2 * len(cfg["offline"])
    assert set(offline["summary"]) == set(cfg["offline"])
    online = image_online.main(argv)
    assert set(online["summary"]) == set(cfg["online"]["methods"])
    for run in offline["runs"] + online["runs"]:
        assert all(math.isfinite(v) for v in run["metrics"].values())
    # a rerun reuses every stored run (same numbers)
    again = image_offline.main(argv)
    assert again["runs"] == offline["runs"]

    (tmp_path / "README.md").write_text(
        "# kd\n\nprose\n\n<!-- results:start -->\nSTALE\n<!-- results:end -->\n"
    )
    body = report.main(["--params", str(path)])
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# kd\n\nprose\n") and "STALE" not in text and body in text
    assert (tmp_path / "res" / report.PLOT).stat().st_size > 1000
    assert "LM part not run." in body
