"""projects/kd image part: params, the loss of each method, online detaching, the mdistiller
cross-check (KD, DKD), test metrics, data subsets, and the teacher -> offline -> online stages on
fake data with the run-identity rules (machine knobs recompute nothing, a changed param does)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.engine.config import load_params
from core.losses import DIVERGENCES
from core.models.cnn import SmallCNN
from projects.kd import DEFAULT_PARAMS, image_offline, image_online, image_teacher
from projects.kd.image_data import IndexBatches, batch_indices, eval_loader, load_data
from projects.kd.image_losses import (
    divergence_term,
    offline_loss,
    online_losses,
    resolve_offline,
    resolve_online,
)
from projects.kd.image_modules import DualHead, OfflineKD, build_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = load_params(DEFAULT_PARAMS)
IMAGE = PARAMS["image"]
OFFLINE = IMAGE["offline"]
ONLINE = IMAGE["online"]["methods"]
CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def _terms():
    for method in OFFLINE.values():
        yield from method.get("terms", [])
    for method in ONLINE.values():
        yield from method["student"] + method["teacher"]


def test_params_name_registered_divergences_and_the_gpu_variant_covers_every_one():
    used = {t["divergence"] for t in _terms()}
    assert used <= set(DIVERGENCES), used - set(DIVERGENCES)
    gpu = load_params(DEFAULT_PARAMS, variant="gpu")["image"]["offline"]
    covered = {t["divergence"] for m in gpu.values() for t in m.get("terms", [])}
    missing = set(DIVERGENCES) - covered
    assert not missing, f"add a gpu image.offline method for the divergences {sorted(missing)}"
    assert OFFLINE.items() <= gpu.items()  # the default methods run there unchanged
    assert "ce" in OFFLINE and not OFFLINE["ce"]["terms"]
    assert {"dml", "bdkd"} <= set(ONLINE)
    assert len(IMAGE["seeds"]) >= 5 and IMAGE["n_bins"] == 15
    assert IMAGE["data"]["train_size"] < IMAGE["data"]["teacher_size"]


def test_the_kd_recipes_are_the_papers():
    """KD: T 4, 0.1 CE + 0.9 KD (mdistiller CIFAR); DKD: CE + alpha 1, beta 8, T 4, warm-up
    20 of 240 epochs. No other recipe of forward KL (the post-hoc T 2 / T 1 rows are gone)."""
    kd = resolve_offline(OFFLINE["forward_kl"], IMAGE["temperature"])
    assert kd["ce_weight"] == 0.1 and kd["terms"][0]["weight"] == 0.9
    assert kd["terms"][0]["temperature"] == 4.0
    dkd = resolve_offline(OFFLINE["dkd"], IMAGE["temperature"])
    assert dkd["ce_weight"] == 1.0 and dkd["terms"][0]["hparams"] == {"alpha": 1.0, "beta": 8.0}
    assert dkd["terms"][0]["warmup"] == 20 / 240
    only_fkl = [
        m for m in OFFLINE.values() if [t["divergence"] for t in m["terms"]] == ["forward_kl"]
    ]
    assert len(only_fkl) == 1


def _tiny_student():
    return SmallCNN((2, 4), 8)


@pytest.mark.parametrize("name", list(OFFLINE))
def test_one_offline_step_per_method_gives_finite_loss_and_gradients(name):
    torch.manual_seed(0)
    method = resolve_offline(OFFLINE[name], IMAGE["temperature"])
    model = DualHead(_tiny_student()) if method["aux_head"] else _tiny_student()
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    teacher = torch.randn(16, 10) * 3
    logits, aux = model.both(x) if method["aux_head"] else (model(x), None)
    loss = offline_loss(method, logits, aux, teacher, y, progress=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    if method["aux_head"]:
        assert model.aux.weight.grad.abs().sum() > 0
    if method["terms"]:  # the teacher is used
        assert not torch.allclose(loss, method["ce_weight"] * F.cross_entropy(logits, y))


def test_offline_loss_is_hinton_mix_for_forward_kl():
    """0.1 CE + 0.9 T^2 KL(p_t || p_s), against a float64 closed form."""
    method = resolve_offline(OFFLINE["forward_kl"], IMAGE["temperature"])
    g = torch.Generator().manual_seed(1)
    s, t, y = torch.randn(7, 10, generator=g), torch.randn(7, 10, generator=g), torch.arange(7)
    got = offline_loss(method, s, None, t, y, progress=1.0)
    T = IMAGE["temperature"]
    ps, pt = (s.double() / T).softmax(-1), (t.double() / T).softmax(-1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    want = 0.1 * F.cross_entropy(s.double(), y) + 0.9 * T**2 * kl
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_warmup_ramps_the_term_linearly():
    term = {"divergence": "forward_kl", "weight": 2.0, "temperature": 1.0, "warmup": 0.5}
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.arange(5)
    full = divergence_term(term, s, t, y, progress=1.0)
    half = divergence_term(term, s, t, y, progress=0.25)
    assert half.item() == pytest.approx(0.5 * full.item(), rel=1e-6)
    assert divergence_term(term, s, t, y, progress=0.6).item() == pytest.approx(full.item())


@pytest.mark.parametrize("name", list(ONLINE))
def test_online_losses_train_each_network_only_through_its_own_loss(name):
    torch.manual_seed(0)
    method = resolve_online(ONLINE[name], IMAGE["online"]["temperature"])
    student, teacher = _tiny_student(), SmallCNN((3, 5), 8)
    x, y = torch.rand(12, 1, 28, 28), torch.arange(12) % 10
    loss_s, loss_t = online_losses(method, student(x), teacher(x), y, progress=1.0)
    assert torch.isfinite(loss_s) and torch.isfinite(loss_t)
    loss_t.backward(retain_graph=True)
    assert all(p.grad is None for p in student.parameters())
    assert all(p.grad is not None for p in teacher.parameters())
    teacher.zero_grad(set_to_none=True)
    loss_s.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_dml_teacher_term_is_kl_from_student_to_teacher():
    """The teacher's reverse_kl(s.detach(), t) is KL(p_s || p_t): DML's peer loss."""
    method = resolve_online(ONLINE["dml"], 1.0)
    g = torch.Generator().manual_seed(2)
    s, t, y = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), torch.arange(6)
    _, loss_t = online_losses(method, s, t, y, progress=1.0)
    ps, pt = s.double().softmax(-1), t.double().softmax(-1)
    want = F.cross_entropy(t.double(), y) + (ps * (ps.log() - pt.log())).sum(-1).mean()
    assert loss_t.item() == pytest.approx(want.item(), rel=1e-5)


def test_dual_head_aux_reads_the_input_of_the_last_linear():
    torch.manual_seed(0)
    model = DualHead(_tiny_student())
    x = torch.rand(4, 1, 28, 28)
    main, aux = model.both(x)
    assert torch.equal(main, model(x)) and aux.shape == (4, 10)
    net = model.net
    h = net.head[:-1](net.features((x - 0.2860) / 0.3530))  # SmallCNN's documented pipeline
    torch.testing.assert_close(aux, model.aux(h))
    assert not net.head[-1]._forward_hooks  # the hook is removed


# --- cross-check against the authors' code (mdistiller) ------------------------------------
# kd_loss and dkd_loss of github.com/megvii-research/mdistiller (mdistiller/distillers/KD.py and
# DKD.py, commit a08d46f), transcribed verbatim apart from `size_average=False` -> `reduction=
# "sum"` (the same sum, without the deprecation), with their distillers' forward_train losses.


def _mdistiller_kd_loss(logits_student, logits_teacher, temperature):
    log_pred_student = F.log_softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature**2
    return loss_kd


def _cat_mask(t, mask1, mask2):
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)


def _mdistiller_dkd_loss(logits_student, logits_teacher, target, alpha, beta, temperature):
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    pred_student = _cat_mask(pred_student, gt_mask, other_mask)
    pred_teacher = _cat_mask(pred_teacher, gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd_loss = (
        F.kl_div(log_pred_student, pred_teacher, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd_loss = (
        F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
        * (temperature**2)
        / target.shape[0]
    )
    return alpha * tckd_loss + beta * nckd_loss


def _mdistiller_step(name, logits_student, logits_teacher, target, epoch):
    """The sum of mdistiller's forward_train losses (KD: CE_WEIGHT 0.1, KD_WEIGHT 0.9, T 4;
    DKD: CE_WEIGHT 1, ALPHA 1, BETA 8, T 4, WARMUP 20 epochs)."""
    if name == "forward_kl":
        return 0.1 * F.cross_entropy(logits_student, target) + 0.9 * _mdistiller_kd_loss(
            logits_student, logits_teacher, 4.0
        )
    warm = min(epoch / 20, 1.0)
    return F.cross_entropy(logits_student, target) + warm * _mdistiller_dkd_loss(
        logits_student, logits_teacher, target, 1.0, 8.0, 4.0
    )


@pytest.mark.parametrize("name", ["forward_kl", "dkd"])
@pytest.mark.parametrize("epoch", [10, 240])  # inside DKD's warm-up (10 of 20) and after it
def test_one_training_step_matches_mdistiller(name, epoch):
    """The loss of one OfflineKD training step and the student's gradients equal mdistiller's on
    the same student, batch and teacher logits (float64); ``progress`` = epoch / 240."""
    torch.manual_seed(0)
    net = SmallCNN((4, 8), 16).double()
    method = resolve_offline(OFFLINE[name], IMAGE["temperature"])
    module = OfflineKD(net, method, IMAGE["optim"], total_steps=240)
    x = torch.rand(32, 1, 28, 28, dtype=torch.float64)
    y, t = torch.arange(32) % 10, torch.randn(32, 10, dtype=torch.float64) * 4
    assert module.progress() == 1 / 240  # (global step 0 + 1) / total steps
    module.progress = lambda: epoch / 240
    ours = module.training_step((x, y, t), 0)
    (g_ours,) = torch.autograd.grad(ours, net.head[-1].weight)
    theirs = _mdistiller_step(name, net(x), t, y, epoch)
    (g_theirs,) = torch.autograd.grad(theirs, net.head[-1].weight)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


# --- metrics, data -------------------------------------------------------------------------


def test_test_metrics_against_numpy(tmp_path):
    """OfflineKD's test pass (torchmetrics accumulation over batches of 100) against a
    float64 numpy computation of top-1, 15-bin top-label ECE, NLL and agreement."""
    g = torch.Generator().manual_seed(3)
    module = OfflineKD(_tiny_student(), {"terms": []}, IMAGE["optim"], 1)
    x, y = torch.rand(500, 1, 28, 28, generator=g), torch.randint(0, 10, (500,), generator=g)
    t_pred = torch.randint(0, 10, (500,), generator=g)
    trainer = build_trainer(CPU, tmp_path, logger=False, checkpoint=False)
    trainer.test(module, eval_loader([x, y, t_pred], batch_size=100), verbose=False)
    with torch.no_grad():
        p = module.eval()(x).double().softmax(-1).numpy()
    yn = y.numpy()
    conf, pred = p.max(1), p.argmax(1)
    ece, edges = 0.0, np.linspace(0, 1, 16)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == yn[inside]).mean() - conf[inside].mean())
    got = module.results
    assert got["accuracy"] == pytest.approx((pred == yn).mean(), abs=1e-7)
    assert got["ece"] == pytest.approx(ece, abs=1e-6)
    assert got["nll"] == pytest.approx(-np.log(p[np.arange(500), yn]).mean(), rel=1e-6)
    assert got["agreement"] == pytest.approx((pred == t_pred.numpy()).mean(), abs=1e-7)


def test_batch_indices_are_seeded_epochs_of_one_permutation_each():
    a, b = batch_indices(10, 4, 2, seed=3), batch_indices(10, 4, 2, seed=3)
    assert [len(i) for i in a] == [4, 4, 2, 4, 4, 2]
    assert all(torch.equal(i, j) for i, j in zip(a, b, strict=True))
    assert sorted(torch.cat(a[:3]).tolist()) == list(range(10))
    ds = IndexBatches([torch.arange(10) * 10, torch.arange(10)], a)
    assert torch.equal(ds[1][0], a[1] * 10) and len(ds) == 6
    with pytest.raises(ValueError, match="equal lengths"):
        IndexBatches([torch.zeros(3), torch.zeros(4)], a)


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory):
    root = tmp_path_factory.mktemp("fm")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 400), ("test", 60)):
        labels = torch.arange(n) % 10
        # class-dependent brightness so a few steps learn something
        images = (torch.rand(n, 28, 28, generator=g) * 100 + labels[:, None, None] * 15).byte()
        torch.save({"images": images, "labels": labels}, root / f"{split}.pt")
    return root


def test_student_subset_is_part_of_the_teacher_set(fake_fmnist):
    cfg = {"seed": 0, "teacher_size": 300, "train_size": 50, "test_size": 60}
    data = load_data(cfg, fake_fmnist)
    assert data["x_teacher"].shape == (300, 1, 28, 28) and data["x_train"].shape[0] == 50
    assert torch.equal(data["x_train"], data["x_teacher"][:50])
    with pytest.raises(ValueError, match="train_size .* must be <= data.teacher_size"):
        load_data({**cfg, "train_size": 301}, fake_fmnist)
    with pytest.raises(ValueError, match="teacher_size"):
        load_data({**cfg, "teacher_size": 0}, fake_fmnist)


@pytest.mark.parametrize("module", ["image_teacher", "image_offline", "image_online"])
def test_entry_point_help(module):
    out = subprocess.run(
        [sys.executable, "-m", f"projects.kd.{module}", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--params" in out.stdout and "--threads" in out.stdout


# --- the stages on fake data ---------------------------------------------------------------


def _argv(tmp_path, fake_fmnist, *sets):
    base = [
        "image.data.teacher_size=300", "image.data.train_size=100", "image.data.test_size=60",
        "image.teacher={arch: smallcnn, channels: [4, 8], hidden: 16}",
        "image.student={arch: smallcnn, channels: [2, 4], hidden: 8}",
        "image.teacher_optim.epochs=1", "image.optim.epochs=2", "image.optim.batch_size=50",
        "image.seeds=[0, 1]",
        "image.offline={ce: {terms: []}, forward_kl: {ce_weight: 0.1, terms: [{divergence: "
        "forward_kl, weight: 0.9}]}, dual_head_binary_kl: {ce_weight: 0.1, terms: [{divergence:"
        " forward_kl, weight: 0.9}, {divergence: dual_head_binary_kl, temperature: 2.0, head: "
        "aux}]}}",
        "image.online.methods={alone: {student: [], teacher: []}, dml: {student: [{divergence: "
        "forward_kl}], teacher: [{divergence: reverse_kl}]}}",
        f"image.paths={{outputs: {tmp_path / 'out'}, results: {tmp_path / 'res'}}}",
    ]  # fmt: skip
    argv = ["--fmnist-root", str(fake_fmnist), "--workers", "1"]
    for s in [*base, *sets]:
        argv += ["--set", s]
    return argv


def test_stages_on_fake_data_and_the_run_identity(fake_fmnist, tmp_path, capsys):
    argv = _argv(tmp_path, fake_fmnist)
    teacher = image_teacher.main(argv)
    assert (tmp_path / "out/teacher.pt").exists() and 0 <= teacher["metrics"]["ece"] <= 1
    assert (tmp_path / "out/teacher/dvclive/plots/metrics/val/accuracy.tsv").exists()
    offline = image_offline.main(argv)
    assert len(offline["runs"]) == 2 * 3 and not any(r["cached"] for r in offline["runs"])
    online = image_online.main(argv)
    assert {r["method"] for r in online["runs"]} == {"alone", "dml"}
    for run in offline["runs"] + online["runs"]:
        assert all(math.isfinite(v) for v in run["metrics"].values())
    # no terms on either side trains the student exactly as the offline student alone: the
    # report compares the online students with offline `ce`
    alone = {r["seed"]: r["metrics"] for r in online["runs"] if r["method"] == "alone"}
    ce = {r["seed"]: r["metrics"] for r in offline["runs"] if r["method"] == "ce"}
    assert alone[0]["accuracy"] == ce[0]["accuracy"] and alone[1]["nll"] == ce[1]["nll"]

    # machine knobs (threads, workers) are not part of a run's identity: nothing recomputes
    capsys.readouterr()
    again = image_offline.main([*argv, "--threads", "2", "--workers", "2"])
    assert all(r["cached"] for r in again["runs"])
    strip = lambda rs: [{k: r[k] for k in ("method", "seed", "metrics")} for r in rs]  # noqa: E731
    assert strip(again["runs"]) == strip(offline["runs"])
    assert image_teacher.main([*argv, "--threads", "2"])["metrics"] == teacher["metrics"]
    assert "resuming" in capsys.readouterr().out  # the finished teacher run is reused

    # a changed param recomputes exactly the runs it decides
    changed = image_offline.main(
        [*argv, "--set", "image.offline.forward_kl.terms=[{divergence: forward_kl, weight: 0.5}]"]
    )
    fresh = {(r["method"], r["seed"]) for r in changed["runs"] if not r["cached"]}
    assert fresh == {("forward_kl", 0), ("forward_kl", 1)}
    saved = json.loads((tmp_path / "res/offline.json").read_text())
    assert [r["method"] for r in saved["runs"]][:2] == ["ce", "ce"]


def test_offline_refuses_a_teacher_of_other_subsets(fake_fmnist, tmp_path):
    argv = _argv(tmp_path, fake_fmnist)
    image_teacher.main(argv)
    with pytest.raises(ValueError, match="rerun stage kd-image-teacher"):
        image_offline.main([*argv, "--set", "image.data.train_size=80"])


def test_the_gpu_variant_parses_for_every_stage():
    """variants/gpu.yaml merges onto params.yaml and every stage builds its run configs from it,
    with its own results paths (never the defaults')."""
    from projects.kd import lm_train

    gpu = load_params(DEFAULT_PARAMS, variant="gpu")
    assert gpu["trainer"]["accelerator"] == "gpu" and "machine" in gpu
    for key in ("outputs", "results"):
        assert gpu["image"]["paths"][key] != IMAGE["paths"][key]
    assert gpu["lm"]["paths"]["results"] != PARAMS["lm"]["paths"]["results"]
    assert gpu["report"]["results"] != PARAMS["report"]["results"]
    image_teacher.teacher_config(gpu)
    for name, seed in image_offline.jobs(gpu["image"]):
        assert image_offline.run_identity(gpu, name, seed)["trainer"]["accelerator"] == "gpu"
    for name, seed in image_online.jobs(gpu["image"]):
        image_online.run_identity(gpu, name, seed)
    lm_train.check_train(gpu["lm"]["train"])
    assert len(lm_train.jobs(gpu["lm"])) == len(gpu["lm"]["seeds"]) * len(gpu["lm"]["runs"])
