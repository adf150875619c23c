"""projects.kd LM stage under Lightning's DDP on 2 gloo processes: every run's val curve and the
teacher's score equal 1 process's (each global batch split over the ranks, the val mean synced by
torchmetrics), one writer, and pools that refuse to nest inside a distributed trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from projects.kd import lm_train
from projects.kd.lm_modules import batch_loader, window_batches
from tests.projects.test_kd_lm import tiny_argv

ROOT = Path(__file__).resolve().parents[2]


def _stage(tmp_path: Path, *extra: str) -> dict:
    tmp_path.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(name, None)
    argv = [*tiny_argv(tmp_path), "--threads", "1", *extra]
    done = subprocess.run(
        [sys.executable, "-m", "projects.kd.lm_train", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((tmp_path / "results" / "lm" / "summary.json").read_text())


@pytest.mark.slow
def test_lm_stage_on_two_ddp_processes_equals_one(tmp_path):
    """Every (run, seed)'s val curve and the teacher's val loss within 1e-5 relative of 1
    process (float32 sums in another order: gradient all-reduce, the synced weighted mean)."""
    one = _stage(tmp_path / "one")
    two = _stage(tmp_path / "ddp", "--set", "trainer.strategy=ddp", "--set", "trainer.devices=2")
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
    with pytest.raises(ValueError, match="at least one row per training process"):
        batch_loader(window_batches(tokens, 8, 5, 4, seed=0), world=2)  # last batch: 1 row


def test_pool_and_ddp_do_not_nest(tmp_path):
    argv = tiny_argv(tmp_path)[:-2]  # drop --workers 1
    ddp = ["--set", "trainer.strategy=ddp", "--set", "trainer.devices=2"]
    with pytest.raises(ValueError, match="do not nest"):
        lm_train.main([*argv, *ddp, "--workers", "2"])
    with pytest.raises(ValueError, match="multiple of the 3"):
        lm_train.main([*argv, "--set", "trainer.devices=3", "--workers", "1"])
