"""projects.kd LM part: params, teacher loading, the KD training step against the materialised
divergence, one optimiser step by hand, and the stage end to end with the run-identity rules."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.engine.config import load_params
from core.losses import get_divergence
from core.models.gpt import GPT, GPTConfig
from core.optim import warmup_cosine
from projects.kd import DEFAULT_PARAMS, lm_train
from projects.kd.lm_modules import (
    LMDistill,
    batch_loader,
    load_teacher,
    make_student,
    split_run,
    step_loss,
    window_batches,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = load_params(DEFAULT_PARAMS)
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
    assert {"paths", "seeds", "student", "optim", "train", "runs"} <= set(lm)
    assert len(lm["seeds"]) >= 3 and "workers" not in lm
    assert "ce" in RUNS and not RUNS["ce"].get("divergence")
    assert {"forward_kl", "reverse_kl", "skew_kl", "akl"} <= set(KD_RUNS)
    assert RUNS["skew_kl"]["lam"] == 0.1 and RUNS["akl"]["mu"] == 0.5  # DistiLLM, AKL papers
    lm_train.check_train(lm["train"])
    z = torch.randn(3, 11)
    for name in KD_RUNS:
        kw, hparams = split_run(RUNS[name])
        get_divergence(kw["divergence"])(z, z.flip(0), temperature=kw["temperature"], **hparams)


def test_check_train_refuses_a_last_step_without_validation():
    with pytest.raises(ValueError, match="multiple of lm.train.val_every"):
        lm_train.check_train({**PARAMS["lm"]["train"], "steps": 101, "val_every": 25})
    with pytest.raises(ValueError, match="lm.train.steps must be a positive integer"):
        lm_train.check_train({**PARAMS["lm"]["train"], "steps": 0})


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


def test_one_training_step_by_hand(tmp_path):
    """One LMDistill step through the Trainer (forward KL, grad clip, AdamW warm-up) equals the
    hand-written step: materialised KL, clip_grad_norm_, AdamW at the warm-up lr."""
    teacher, student = tiny_pair(tmp_path)
    ref = copy.deepcopy(student)
    x, y = torch.randint(0, 67, (2, 16)), torch.randint(0, 67, (2, 16))
    optim = {**PARAMS["lm"]["optim"], "warmup_steps": 4}
    module = LMDistill(student, teacher, RUNS["forward_kl"], optim, total_steps=10)
    from lightning import Trainer

    Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=0.5,
    ).fit(module, batch_loader([(x, y)]))  # fmt: skip
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert not module.train().teacher.training and module.student.training  # teacher stays eval

    zs = ref.logits(ref(x)).flatten(0, 1)
    with torch.no_grad():
        pt = teacher.logits(teacher(x)).flatten(0, 1).softmax(-1)
    kl = (pt * (pt.log() - zs.log_softmax(-1))).sum(-1).mean()
    kl.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    lr = optim["lr"] * warmup_cosine(0, 10, 4, optim["min_lr_ratio"])  # 1/4 of the peak
    decay = [p for n, p in ref.named_parameters() if p.ndim == 2 and "emb" not in n]
    rest = [p for n, p in ref.named_parameters() if not (p.ndim == 2 and "emb" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": optim["weight_decay"]}, {"params": rest, "weight_decay": 0}],
        lr=lr, betas=tuple(optim["betas"]),
    )  # fmt: skip
    opt.step()
    for (n, p), q in zip(student.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "projects.kd.lm_train", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--run" in out.stdout and "--workers" in out.stdout


def tiny_argv(tmp_path: Path) -> list[str]:
    save_teacher(tmp_path / "last.ckpt")
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 4000), ("val", 600)):
        np.save(data / f"{split}.npy", rng.integers(0, 67, n).astype(np.uint16))
    sets = [
        f"lm.paths={{teacher_ckpt: {tmp_path / 'last.ckpt'}, data: {data}, "
        f"results: {tmp_path / 'results' / 'lm'}}}",
        f"lm.student={STUDENT_CFG}",
        "lm.train={steps: 4, batch_size: 2, val_windows: 4, val_seed: 9, val_every: 2, "
        "grad_clip: 1.0}",
        "lm.optim.warmup_steps=1",
        "lm.seeds=[0, 1]",
        "lm.runs={skew_kl: {divergence: skew_kl, temperature: 1.0, hard_weight: 0.0, lam: 0.1},"
        " forward_kl: {divergence: forward_kl, temperature: 1.0, hard_weight: 0.0}, ce: {}}",
    ]
    return [x for s in sets for x in ("--set", s)] + ["--workers", "1"]


def test_stage_end_to_end_and_the_run_identity(tmp_path):
    """Every (run, seed) trains through main(); machine knobs recompute nothing; a changed run
    recomputes that run only."""
    argv = tiny_argv(tmp_path)
    summary = lm_train.main(argv)
    out = tmp_path / "results" / "lm"
    saved = json.loads((out / "summary.json").read_text())
    assert {(r["run"], r["seed"]) for r in saved["runs"]} == {
        (n, s) for n in ("skew_kl", "forward_kl", "ce") for s in (0, 1)
    }
    assert {"val_loss", "val_ppl", "n_params"} <= set(saved["teacher"])
    for r in summary["runs"]:
        assert r["steps"] == 4 and np.isfinite(r["val_ppl"]) and r["val_ppl"] > 1
        assert [s for s, _ in r["curve"]] == [2, 4] and r["curve"][-1][1] == r["val_loss"]
        assert (out / "runs" / f"{r['run']}_seed{r['seed']}.json").exists()
    by = {(r["run"], r["seed"]): r for r in summary["runs"]}
    assert by[("skew_kl", 0)]["hparams"] == {"lam": 0.1}
    assert by[("ce", 0)]["val_loss"] != by[("ce", 1)]["val_loss"]  # seeds differ

    again = lm_train.main([*argv, "--threads", "2", "--workers", "2"])
    assert all(r["cached"] for r in again["runs"])
    changed = lm_train.main([*argv, "--set", "lm.runs.skew_kl.lam=0.2"])
    fresh = {(r["run"], r["seed"]) for r in changed["runs"] if not r["cached"]}
    assert fresh == {("skew_kl", 0), ("skew_kl", 1)}
