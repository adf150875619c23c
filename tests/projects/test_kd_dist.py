"""projects.kd under Lightning's DDP on 2 gloo processes: the LM stage's val curves and teacher
score, and the image stages' test metrics, equal 1 process's (each global batch split over the
ranks, the metrics synced by torchmetrics); pools refuse to nest inside a distributed trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from projects.kd import lm_train
from projects.kd.lm_modules import batch_loader, window_batches
from tests.projects.test_kd_image import _argv as image_argv
from tests.projects.test_kd_image import fake_fmnist  # noqa: F401 - the fixture
from tests.projects.test_kd_lm import tiny_argv

ROOT = Path(__file__).resolve().parents[2]


DDP = ("--set", "trainer.strategy=ddp", "--set", "trainer.devices=2")


def _run(module: str, argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", f"projects.kd.{module}", *argv, "--threads", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _stage(tmp_path: Path, *extra: str) -> dict:
    tmp_path.mkdir()
    _run("lm_train", [*tiny_argv(tmp_path), *extra])
    return json.loads((tmp_path / "results" / "lm" / "summary.json").read_text())


@pytest.mark.slow
def test_lm_stage_on_two_ddp_processes_equals_one(tmp_path):
    """Every (run, seed)'s val curve and the teacher's val loss within 1e-5 relative of 1
    process (float32 sums in another order: gradient all-reduce, the synced weighted mean)."""
    one = _stage(tmp_path / "one")
    two = _stage(tmp_path / "ddp", *DDP)
    np.testing.assert_allclose(two["teacher"]["val_loss"], one["teacher"]["val_loss"], rtol=1e-5)
    key = lambda r: (r["run"], r["seed"])  # noqa: E731
    for a, b in zip(sorted(one["runs"], key=key), sorted(two["runs"], key=key), strict=True):
        assert key(a) == key(b) and [s for s, _ in a["curve"]] == [s for s, _ in b["curve"]]
        np.testing.assert_allclose(
            [v for _, v in b["curve"]], [v for _, v in a["curve"]], rtol=1e-5
        )
    records = list((tmp_path / "ddp" / "results" / "lm" / "runs").glob("*.json"))
    assert len(records) == 6
    assert json.loads(records[0].read_text())["identity"]["config"]["trainer"]["devices"] == 2


def test_batch_loader_gives_each_rank_its_rows(monkeypatch):
    tokens = np.arange(500, dtype=np.uint16)
    batches = window_batches(tokens, 8, 8, 4, seed=0)
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        got = list(batch_loader(batches, world=2))
        assert len(got) == len(batches)
        for (x, y), (bx, by) in zip(got, batches, strict=True):
            assert (x == bx[rank::2]).all() and (y == by[rank::2]).all()
    with pytest.raises(ValueError, match=r"batches of \[1\] rows do not split over 2"):
        batch_loader(window_batches(tokens, 8, 5, 4, seed=0), world=2)  # last batch: 1 row


def test_pool_and_ddp_do_not_nest(tmp_path):
    argv = tiny_argv(tmp_path)[:-2]  # drop --workers 1
    ddp = ["--set", "trainer.strategy=ddp", "--set", "trainer.devices=2"]
    with pytest.raises(ValueError, match="do not nest"):
        lm_train.main([*argv, *ddp, "--workers", "2"])
    with pytest.raises(ValueError, match="multiple of the 3"):
        lm_train.main([*argv, "--set", "trainer.devices=3", "--workers", "1"])


@pytest.mark.slow
def test_image_stages_on_two_ddp_processes_equal_one(fake_fmnist, tmp_path):  # noqa: F811
    """Teacher, offline and online stages on fake data: every run's test metrics (accuracy,
    agreement exactly; ECE and NLL, float64 on float32 logits, within 1e-5 relative) and the
    teacher's logits equal 1 process's; every result file is written once, by rank 0."""
    out = {}
    for name in ("one", "ddp"):
        argv = image_argv(tmp_path / name, fake_fmnist) + (list(DDP) if name == "ddp" else [])
        for stage in ("image_teacher", "image_offline", "image_online"):
            _run(stage, argv)
        res = tmp_path / name / "res"
        out[name] = {
            f: json.loads((res / f).read_text())
            for f in ("teacher.json", "offline.json", "online.json")
        }
        out[name]["logits"] = torch.load(tmp_path / name / "out" / "teacher.pt")["test_logits"]
    torch.testing.assert_close(out["ddp"]["logits"], out["one"]["logits"], rtol=1e-4, atol=1e-5)
    pairs = [(out["one"]["teacher.json"], out["ddp"]["teacher.json"])]
    for f in ("offline.json", "online.json"):
        pairs += zip(out["one"][f]["runs"], out["ddp"][f]["runs"], strict=True)
    for a, b in pairs:
        for key in ("metrics", "teacher_metrics"):
            if key in a:
                assert a[key]["accuracy"] == b[key]["accuracy"], (a, b)
                np.testing.assert_allclose(
                    [b[key][m] for m in ("ece", "nll")],
                    [a[key][m] for m in ("ece", "nll")],
                    rtol=1e-5,
                )


def test_image_loader_splits_rows_and_refuses_uneven_training_batches(monkeypatch):
    from projects.kd.image_data import eval_loader, loader

    x = torch.arange(10)
    batches = [torch.tensor([3, 1, 4, 0]), torch.tensor([9, 2])]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [b.tolist() for (b,) in loader([x], batches, world=2)] == [[1, 0], [2]]
    assert [b.tolist() for (b,) in eval_loader([x], 4, world=2)] == [[1, 3], [5, 7], [9]]
    with pytest.raises(ValueError, match=r"batches of \[3\] rows"):
        loader([x], [torch.tensor([0, 1, 2])], world=2)
    with pytest.raises(ValueError, match=r"batches of \[1\] rows"):
        eval_loader([x], 3, world=2)  # the last batch holds one row
