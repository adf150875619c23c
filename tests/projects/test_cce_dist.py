"""projects.cce under Lightning's DDP on 2 gloo processes: the same training as 1 process (the
global batch split over the ranks), synced validation, and one writer (rank 0)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.engine.config import load_params
from projects.cce.data import make_loaders
from tests.projects.report_helpers import random_token_data

ROOT = Path(__file__).resolve().parents[2]
CSVS = ("train_loss.csv", "val_loss.csv")
TINY_MODEL = dict(vocab_size=67, block_size=16, n_layer=2, n_head=2, n_embd=24)

# Runs projects.cce.train's entry point with every result write logged as "<rank> <path>";
# Lightning's launcher re-runs this very script in the rank-1 child, so both ranks are logged.
RECORDER = """
import os, sys
from core.engine import cache, dist
from projects.cce import train

def logged(fn):
    def wrapper(path, *args, **kwargs):
        with open(os.environ["WRITES_LOG"], "a") as f:
            f.write(f"{dist.global_rank()} {path}\\n")
        return fn(path, *args, **kwargs)
    return wrapper

cache.atomic_write_json = logged(cache.atomic_write_json)
train.atomic_open = logged(train.atomic_open)
train.main(sys.argv[1:])
"""


def _data(tmp_path: Path) -> Path:
    return random_token_data(tmp_path)


def _params(tmp_path: Path, data: Path) -> Path:
    """Large lr, weight decay and a tight clip, so a wrong global batch, decay group or clip
    norm under DDP would move the losses well past the tolerance."""
    p = load_params(ROOT / "projects" / "cce" / "params.yaml")
    p["paths"] |= {"data": str(data)} | {k: str(tmp_path / k) for k in ("runs", "results")}
    p["model"] |= TINY_MODEL
    p["optim"] |= {"lr": 0.01, "weight_decay": 0.5, "warmup_steps": 1}
    p["train"] |= {"batch_size": 4, "val_windows": 6, "val_batch_size": 4}
    p["trainer"] |= {"max_steps": 6, "val_check_interval": 3, "log_every_n_steps": 3}
    p["trainer"] |= {"gradient_clip_val": 0.05}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(p))
    return path


def _train(tmp_path: Path, data: Path, *overrides: str) -> tuple[dict, list[str]]:
    tmp_path.mkdir()
    script, log = tmp_path / "recorder.py", tmp_path / "writes.log"
    script.write_text(RECORDER)
    args = ["--params", str(_params(tmp_path, data)), "--loss-impl", "cce"]
    args += ["--set", "machine.threads=1", *overrides]
    env = {**os.environ, "WRITES_LOG": str(log), "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "results" / "cce" / "run.json").read_text())
    return record, log.read_text().splitlines()


def test_ddp_two_processes_train_as_one_and_only_rank0_writes(tmp_path):
    """2 gloo ranks x batch 2 = the 1-process batch of 4, same windows per step: every step's
    global train loss and both val losses match 1 process to 1e-5 relative (float32 sums in
    another order: the gradient all-reduce and the mean of the two ranks' means; measured
    ~2e-7). Only rank 0 writes the run record, the CSVs and identity.json. ~20 s on 2 cores: not
    slow-marked, so CI runs this DDP parity check."""
    data = _data(tmp_path)
    one, one_writes = _train(tmp_path / "one", data)
    two, two_writes = _train(
        tmp_path / "ddp", data, "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"
    )
    assert one["steps"] == two["steps"] == 6
    for split in ("train", "val"):
        s1, v1 = zip(*one["history"][split], strict=True)
        s2, v2 = zip(*two["history"][split], strict=True)
        assert s1 == s2
        np.testing.assert_allclose(v2, v1, rtol=1e-5)
    np.testing.assert_allclose(two["final_val_loss"], one["final_val_loss"], rtol=1e-5)
    assert two["identity"]["config"]["trainer"]["devices"] == 2
    ranks = {line.split()[0] for line in two_writes}
    written = {Path(line.split()[1]).name for line in two_writes}
    assert ranks == {"0"} and written == {"identity.json", "run.json", *CSVS}
    assert {Path(line.split()[1]).name for line in one_writes} == written


def test_loaders_split_the_global_batch_over_the_ranks(tmp_path, monkeypatch):
    """Rank r's step-k batch holds windows r, r + 2, ... of the 1-process step-k batch; val
    splits evenly; batch sizes that do not divide by the ranks are refused."""
    data = _data(tmp_path)
    cfg = {"batch_size": 4, "val_windows": 6, "val_batch_size": 4}
    train1, val1 = make_loaders(data, 16, cfg, 3, seed=0)
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        per_rank.append(make_loaders(data, 16, cfg, 3, seed=0, world=2))
    for (x1, _), (x0r, _), (x1r, _) in zip(train1, per_rank[0][0], per_rank[1][0], strict=True):
        assert x0r.shape[0] == x1r.shape[0] == 2
        torch.testing.assert_close(x0r, x1[0::2])
        torch.testing.assert_close(x1r, x1[1::2])
    val_all = torch.cat([x for x, _ in val1])
    val_ranks = [torch.cat([x for x, _ in loaders[1]]) for loaders in per_rank]
    assert [len(v) for v in val_ranks] == [3, 3]
    torch.testing.assert_close(torch.cat(val_ranks).sort(0).values, val_all.sort(0).values)
    with pytest.raises(ValueError, match="multiples of the 2"):
        make_loaders(data, 16, cfg | {"val_windows": 5}, 3, seed=0, world=2)
    with pytest.raises(ValueError, match="multiples of the 3"):
        make_loaders(data, 16, cfg, 3, seed=0, world=3)
