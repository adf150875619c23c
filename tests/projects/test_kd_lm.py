"""projects.kd LM part: params, teacher loading, the KD training step against the materialised
divergence, a tiny end-to-end stage run (resume included) and the report section."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.losses import get_divergence
from core.models.gpt import GPT, GPTConfig
from kernels.kd.api import FUSED_DIVERGENCES
from projects.kd import lm_train
from projects.kd.lm_common import (
    load_params,
    load_teacher,
    make_student,
    split_run,
    step_loss,
    window_batches,
)
from projects.kd.report_lm import lm_section

PARAMS = load_params(Path(__file__).resolve().parents[2] / "projects" / "kd" / "params.yaml")
RUNS = PARAMS["lm"]["runs"]
KD_RUNS = [n for n, r in RUNS.items() if r.get("divergence")]
TEACHER_CFG = dict(vocab_size=67, block_size=16, n_layer=2, n_head=2, n_embd=24)
STUDENT_CFG = dict(n_layer=1, n_head=2, n_embd=16, dropout=0.0, tie_weights=True)


def save_teacher(path: Path, seed: int = 1) -> GPT:
    """A tiny GPT saved the way the cce LMModule's Lightning checkpoint stores it."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TEACHER_CFG))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"model_cfg": TEACHER_CFG}, "state_dict": state}, path)
    return model


def tiny_pair(tmp_path: Path) -> tuple[GPT, GPT]:
    """(teacher loaded from a checkpoint, seeded student)."""
    save_teacher(tmp_path / "t.ckpt")
    teacher = load_teacher(tmp_path / "t.ckpt")
    return teacher, make_student(teacher.cfg, STUDENT_CFG, seed=0)


def test_params_lm_section():
    lm = PARAMS["lm"]
    assert {"paths", "student", "optim", "train", "workers", "runs"} <= set(lm)
    assert "ce" in RUNS and not RUNS["ce"].get("divergence")
    assert {"forward_kl", "reverse_kl", "js", "skew_kl", "akl"} <= set(KD_RUNS)
    assert RUNS["skew_kl"]["lam"] == 0.1 and RUNS["akl"]["mu"] == 0.5  # DistiLLM, AKL papers
    z = torch.randn(3, 11)
    for name in KD_RUNS:
        assert RUNS[name]["divergence"] in FUSED_DIVERGENCES
        kw, hparams = split_run(RUNS[name])
        get_divergence(kw["divergence"])(z, z.flip(0), temperature=kw["temperature"], **hparams)


def test_load_teacher_roundtrip(tmp_path):
    model = save_teacher(tmp_path / "last.ckpt")
    teacher = load_teacher(tmp_path / "last.ckpt")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    idx = torch.randint(0, 67, (2, 16))
    torch.testing.assert_close(teacher(idx), model.eval()(idx))


def test_window_batches_deterministic():
    tokens = np.arange(500, dtype=np.uint16)
    a = window_batches(tokens, 16, 10, 4, seed=3)
    b = window_batches(tokens, 16, 10, 4, seed=3)
    assert [x.shape[0] for x, _ in a] == [4, 4, 2]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1]) and xa.dtype == torch.int64


@pytest.mark.parametrize("name", KD_RUNS)
def test_kd_step_matches_materialised_divergence(name, tmp_path):
    """The fused loss inside the training step equals the materialised divergence of the two
    models' logits, and so do the student's gradients; the teacher gets none."""
    teacher, student = tiny_pair(tmp_path)
    teacher, student = teacher.double(), student.double()
    x = torch.randint(0, 67, (2, 16))
    y = torch.randint(0, 67, (2, 16))
    run = RUNS[name]
    loss = step_loss(student, teacher, x, y, run)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    kw, hparams = split_run(run)
    zs = student.logits(student(x))  # (B, T, V) materialised
    with torch.no_grad():
        zt = teacher.logits(teacher(x))
    div = get_divergence(kw["divergence"])(
        zs.flatten(0, 1), zt.flatten(0, 1), temperature=kw["temperature"], **hparams
    )
    h = kw.get("hard_weight", 0.0)
    ref = (1 - h) * div + h * torch.nn.functional.cross_entropy(zs.flatten(0, 1), y.flatten())
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-9, atol=1e-12)
    for n, p in student.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-7, atol=1e-10, msg=n)
    assert all(p.grad is None for p in teacher.parameters())


def test_ce_step_is_cross_entropy(tmp_path):
    teacher, student = tiny_pair(tmp_path)
    x, y = torch.randint(0, 67, (2, 16)), torch.randint(0, 67, (2, 16))
    ref = torch.nn.functional.cross_entropy(student.logits(student(x)).flatten(0, 1), y.flatten())
    torch.testing.assert_close(step_loss(student, None, x, y, RUNS["ce"]), ref)


def tiny_params(tmp_path: Path) -> dict:
    save_teacher(tmp_path / "last.ckpt")
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 4000), ("val", 600)):
        np.save(data / f"{split}.npy", rng.integers(0, 67, n).astype(np.uint16))
    p = copy.deepcopy(PARAMS)
    lm = p["lm"]
    lm["paths"] = {
        "teacher_ckpt": str(tmp_path / "last.ckpt"),
        "data": str(data),
        "results": str(tmp_path / "results" / "lm"),
    }
    lm["student"] = STUDENT_CFG
    lm["train"] |= {"steps": 4, "batch_size": 2, "val_windows": 4, "val_every": 2}
    lm["optim"] |= {"warmup_steps": 1}
    lm["workers"] = 1
    return p


def test_stage_end_to_end_resume_and_report(tmp_path, monkeypatch, capsys):
    """Every run trains through main(); a second call skips them all; the report renders."""
    p = tiny_params(tmp_path)
    monkeypatch.setattr(lm_train, "load_params", lambda path: p)
    lm_train.main([])
    out = Path(p["lm"]["paths"]["results"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["runs"]) == set(RUNS)
    assert {"val_loss", "val_ppl", "n_params"} <= set(metrics["teacher"])
    for name, m in metrics["runs"].items():
        assert m["steps"] == 4 and np.isfinite(m["val_ppl"]) and m["val_ppl"] > 1
        assert {"val_loss", "final_train_loss", "wall_s", "n_params"} <= set(m)
        assert (out / "runs" / f"{name}_val.csv").read_text().count("\n") == 3  # header + 2
    assert metrics["runs"]["skew_kl"]["hparams"] == {"lam": 0.1}
    stamp = (out / "runs" / "akl.json").stat().st_mtime_ns
    lm_train.main([])
    assert capsys.readouterr().out.count("up to date, skipped") == len(RUNS)
    assert (out / "runs" / "akl.json").stat().st_mtime_ns == stamp

    p["lm"]["runs"]["akl"] = {**p["lm"]["runs"]["akl"], "mu": 0.4}  # a changed run reruns
    fp = lm_train.fingerprint(p, "akl", lm_train.inputs_digest(p))
    assert not lm_train.done(out / "runs", "akl", fp)

    md = lm_section(out.parent)
    assert (out / "val_ppl.png").stat().st_size > 0
    assert "| student alone | CE only |" in md and "KD beats the student alone" in md
    assert "skew_kl vs forward KL: DistiLLM" in md
