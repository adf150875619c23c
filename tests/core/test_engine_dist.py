"""core.engine.dist: ranks from each launcher's environment, the pool/strategy rule, rank-0-only
writes in core.engine.cache, pools run in-process inside a rank, and torchmetrics calibration
metrics synced over 2 gloo processes equal 1 process over the same data (issue #17, item 5)."""

import json
import os

import pytest
import torch
import torch.multiprocessing as tmp_mp

from core.calibration import ExpectedCalibrationError, NegativeLogLikelihood
from core.calibration.metrics import expected_calibration_error
from core.engine import dist
from core.engine.cache import cached_run, claim_run_dir, seal_run_dir
from core.utils.parallel import imap_processes, map_processes

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
)
DDP2 = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


@pytest.fixture
def env(monkeypatch):
    """A clean launch environment; ``env(NAME=value, ...)`` sets a launcher's variables."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


@pytest.mark.parametrize(
    ("launch", "rank", "world"),
    [
        ({}, 0, 1),  # a plain run
        ({"RANK": 3, "WORLD_SIZE": 4, "LOCAL_RANK": 1}, 3, 4),  # torchrun
        ({"SLURM_PROCID": 1, "SLURM_NTASKS": 2}, 1, 2),  # srun
        ({"SLURM_PROCID": 0, "SLURM_NTASKS": 1}, 0, 1),  # an sbatch job of one task
        ({"LOCAL_RANK": 1, "NODE_RANK": 0, "WORLD_SIZE": 2}, 1, 2),  # Lightning's launcher
        ({"LOCAL_RANK": 1, "NODE_RANK": 1, "WORLD_SIZE": 4, "LOCAL_WORLD_SIZE": 2}, 3, 4),
    ],
)
def test_rank_and_world_size_from_each_launcher(env, launch, rank, world):
    env(**launch)
    assert (dist.global_rank(), dist.launched_world_size()) == (rank, world)
    assert dist.is_global_zero() == (rank == 0)


def test_a_second_node_is_never_rank_zero(env):
    env(NODE_RANK=1, WORLD_SIZE=4)  # the launching process of node 1, before its first fit
    assert not dist.is_global_zero()


def test_processes_and_is_distributed(env):
    assert dist.processes({"devices": 2, "num_nodes": 3}) == 6
    assert dist.processes({"devices": [0, 1]}) == 2
    assert dist.processes({"devices": "auto"}) is None
    assert not dist.is_distributed({"devices": 1, "strategy": "auto"})
    assert dist.is_distributed(DDP2) and dist.is_distributed({"strategy": "fsdp"})
    env(RANK=0, WORLD_SIZE=2)
    assert dist.is_distributed({"devices": 1})


def test_check_pool_refuses_a_pool_around_a_strategy(env):
    with pytest.raises(ValueError, match=r"machine.workers=2.*strategy='ddp'.*--workers 1"):
        dist.check_pool(2, DDP2, "source.trainer")
    with pytest.raises(ValueError, match="source.trainer.devices=1"):
        dist.check_pool(2, DDP2, "source.trainer")
    assert dist.check_pool(1, DDP2) == 1  # one run at a time, each on every rank
    assert dist.check_pool(2, {"accelerator": "cpu", "devices": 1, "strategy": "auto"}) == 2


def test_check_pool_under_an_external_launch_runs_one_at_a_time(env):
    env(RANK=1, WORLD_SIZE=2)  # torchrun with params that ask for no strategy
    assert dist.check_pool(2, {"devices": 1, "strategy": "auto"}) == 1


def test_pool_size_is_the_one_rule(env):
    """A launched rank gets a pool of 1, a plain run its count; check_pool answers the same."""
    assert dist.pool_size(4) == 4 == dist.check_pool(4, {"devices": 1})
    env(RANK=0, WORLD_SIZE=2)
    assert dist.pool_size(4) == 1 == dist.check_pool(4, {"devices": 1})


def test_rank_loader_splits_each_global_batch(env):
    """Over 2 ranks, rank 1 loads rows 1, 3, ... of every batch, in order; training batches
    (even) must be a multiple of the world, others at least one row per rank; one process
    gets the batches whole."""
    batches = [torch.arange(4) * 10, torch.arange(6) + 100]
    whole = list(dist.rank_loader(list, batches, 1))
    assert [b.tolist() for b in whole] == [b.tolist() for b in batches]
    env(RANK=1, WORLD_SIZE=2)
    got = [b.tolist() for b in dist.rank_loader(list, batches, 2, even=True)]
    assert got == [[10, 30], [101, 103, 105]]
    pairs = [(torch.arange(3), torch.arange(3) + 5)]
    shard = lambda b, r, w: (b[0][r::w], b[1][r::w])  # noqa: E731
    ((x, y),) = list(dist.rank_loader(list, pairs, 2, rows=lambda b: len(b[0]), shard=shard))
    assert x.tolist() == [1] and y.tolist() == [6]
    with pytest.raises(ValueError, match=r"batches of \[3\] rows do not split over 2"):
        dist.rank_loader(list, [torch.arange(3)], 2, even=True)
    with pytest.raises(ValueError, match=r"batches of \[1\] rows"):
        dist.rank_loader(list, [torch.arange(1)], 2)


def _pid(x, *_):
    return os.getpid()


def test_pools_run_in_this_process_inside_a_rank(env):
    env(RANK=0, WORLD_SIZE=2)
    assert set(map_processes(_pid, [1, 2, 3], workers=2)) == {os.getpid()}
    assert set(imap_processes(_pid, [1, 2, 3], workers=2)) == {os.getpid()}


def test_only_rank_zero_writes_run_records(env, tmp_path):
    env(RANK=1, WORLD_SIZE=2)
    calls = []
    path = tmp_path / "run.json"
    record = cached_run(path, {"lr": 0.1}, lambda: calls.append(1) or {"acc": 0.5})
    assert calls == [1] and record["acc"] == 0.5 and not record["cached"]  # trained, returned
    assert not path.exists()  # ... and nothing written
    seal_run_dir(tmp_path / "sealed", {"lr": 0.1})
    assert not (tmp_path / "sealed").exists()
    # rank 1 never clears the checkpoints rank 0 may be using or resuming from
    stale = tmp_path / "run" / "checkpoints"
    stale.mkdir(parents=True)
    (stale / "last.ckpt").write_bytes(b"x")
    assert claim_run_dir(tmp_path / "run", {"lr": 0.1}) is False
    assert (stale / "last.ckpt").exists()
    env(RANK=0)
    assert claim_run_dir(tmp_path / "run", {"lr": 0.1}) is False and not stale.exists()
    cached_run(path, {"lr": 0.1}, lambda: {"acc": 0.5})
    assert json.loads(path.read_text())["acc"] == 0.5


def _data():
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(1001, 10, generator=g, dtype=torch.float64).mul(3).softmax(1)
    labels = torch.randint(0, 10, (1001,), generator=g)
    return probs, labels


def _metrics():
    return [ExpectedCalibrationError(n_bins=15), NegativeLogLikelihood()]


def _sync_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    probs, labels = _data()
    mine = torch.arange(rank, len(labels), world)  # interleaved, unequal halves (501 / 500)
    metrics = _metrics()
    for chunk in mine.split(128):  # several updates per rank
        for m in metrics:
            m.update(probs[chunk], labels[chunk])
    values = [float(m.compute()) for m in metrics]  # compute() syncs the states across ranks
    if rank == 0:
        with open(out, "w") as f:
            json.dump(values, f)
    torch.distributed.destroy_process_group()


def test_calibration_metrics_synced_over_two_gloo_processes_equal_one(tmp_path):
    """ECE and NLL (torchmetrics, states concatenated on sync) accumulated on 2 gloo processes
    over interleaved halves equal 1 process over all of it, and the plain float64 function."""
    out = tmp_path / "values.json"
    init = f"file://{tmp_path / 'store'}"
    tmp_mp.spawn(_sync_worker, args=(2, init, str(out)), nprocs=2, join=True)
    synced = json.loads(out.read_text())
    probs, labels = _data()
    single = []
    for m in _metrics():
        for chunk in torch.arange(len(labels)).split(300):
            m.update(probs[chunk], labels[chunk])
        single.append(float(m.compute()))
    assert synced == pytest.approx(single, rel=1e-6, abs=1e-7)
    ece = float(expected_calibration_error(probs, labels, n_bins=15))
    assert synced[0] == pytest.approx(ece, rel=1e-6)
