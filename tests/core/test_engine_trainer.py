"""core.engine.trainer: Trainer / Fabric from params, identity-aware resume, progress lines."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.engine.trainer import (
    TRAINER_KEYS,
    Run,
    _check_sync_batchnorm,
    build_fabric,
    build_trainer,
    fit,
    seed_everything,
)
from tests.core.engine_probe import probe_repo

CFG = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def _loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def test_unknown_trainer_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown trainer keys \['max_epoch'\]"):
        build_trainer({"max_epoch": 3}, tmp_path)


def test_sync_batchnorm_is_a_key_and_needs_gpus(tmp_path, monkeypatch):
    """sync_batchnorm is a trainer key: false builds, true on a CPU trainer is refused by name
    (torch's SyncBatchNorm refuses CPU tensors), true with a GPU accelerator passes the check."""
    assert "sync_batchnorm" in TRAINER_KEYS
    t = build_trainer({**CFG, "sync_batchnorm": False}, tmp_path, logger=False)
    assert t is not None
    with pytest.raises(ValueError, match="trainer.sync_batchnorm=True needs GPU devices"):
        build_trainer({**CFG, "sync_batchnorm": True}, tmp_path, logger=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="accelerator='auto'"):
        _check_sync_batchnorm({"sync_batchnorm": True, "accelerator": "auto"})
    _check_sync_batchnorm({"sync_batchnorm": True, "accelerator": "gpu"})


def test_interrupted_run_resumes_when_its_identity_holds(tmp_path, monkeypatch):
    repo = probe_repo(tmp_path, monkeypatch)
    Tiny = repo.model().Tiny
    run = Run(tmp_path / "run", {"lr": 0.1})
    seed_everything(0)
    first = fit(Tiny(), {**CFG, "max_epochs": 1}, run, logger=False, train_dataloaders=_loader())
    assert first.global_step == 4 and (run.dir / "identity.json").exists()
    # a restarted stage with a longer budget continues where the first one stopped ...
    module = Tiny()
    second = fit(module, {**CFG, "max_epochs": 2}, run, logger=False, train_dataloaders=_loader())
    assert second.global_step == 8 and second.current_epoch == 2
    # ... and ends with the weights of an uninterrupted two-epoch run from the same init
    seed_everything(0)
    ref = Tiny()
    build_trainer({**CFG, "max_epochs": 2}, tmp_path / "b", logger=False).fit(
        ref, train_dataloaders=_loader()
    )
    torch.testing.assert_close(module.net.weight, ref.net.weight)


@pytest.mark.parametrize("change", ["config", "code"])
def test_a_changed_identity_starts_fresh(tmp_path, monkeypatch, capsys, change):
    repo = probe_repo(tmp_path, monkeypatch)
    run = Run(tmp_path / "run", {"lr": 0.1})
    fit(
        repo.model().Tiny(),
        {**CFG, "max_epochs": 1},
        run,
        logger=False,
        train_dataloaders=_loader(),
    )
    if change == "config":
        run = Run(run.dir, {"lr": 0.2})
    else:
        repo.edit("model", "\n# an edit to the module that defines the LightningModule\n")
    trainer = fit(
        repo.model().Tiny(),
        {**CFG, "max_epochs": 1},
        run,
        logger=False,
        train_dataloaders=_loader(),
    )
    assert trainer.global_step == 4  # trained again from step 0, not restored as finished
    out = capsys.readouterr().out
    assert "starting fresh" in out and (
        "config changed" in out if change == "config" else "code changed: probe_pkg/model.py" in out
    )


def test_epoch_lines_and_dvclive_metrics(tmp_path, monkeypatch, capsys):
    repo = probe_repo(tmp_path, monkeypatch)
    run = Run(tmp_path / "run", {}, name="probe")
    fit(
        repo.model().Tiny(),
        {**CFG, "max_epochs": 2, "log_every_n_steps": 1},
        run,
        train_dataloaders=_loader(),
    )
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[probe] train")]
    assert len(lines) == 2 and "epoch 2/2 step 8" in lines[1] and "train/loss" in lines[1]
    tsv = run.dir / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv"
    rows = tsv.read_text().splitlines()
    assert rows[0].split("\t") == ["step", "loss"] and len(rows) == 1 + 8


def test_build_fabric_reads_the_device_keys_of_a_trainer_block():
    fabric = build_fabric({"accelerator": "cpu", "devices": 1, "max_epochs": 3})
    assert fabric.device == torch.device("cpu") and fabric.world_size == 1
    with pytest.raises(ValueError, match="precision"):
        build_fabric({"accelerator": "cpu", "devices": 1, "precision": "nonsense"})


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """Two steps of a tiny model with strategy ddp on CPU (gloo), in two processes."""
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(root)!r})
        from tests.core.test_engine_trainer import _loader
        from tests.core.engine_probe import MODEL
        ns = {{}}
        exec(MODEL, ns)
        from core.engine.trainer import build_trainer, seed_everything
        seed_everything(0)
        t = build_trainer({{"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 2}},
                          {str(tmp_path / "out")!r}, logger=False)
        m = ns["Tiny"]()
        t.fit(m, train_dataloaders=_loader())
        w = m.net.weight.detach().clone()
        gathered = t.strategy.all_gather(w)
        assert t.world_size == 2 and t.global_step == 2
        assert torch.allclose(gathered[0], gathered[1]), "ddp replicas diverged"
        print("DDP_OK rank", t.global_rank)
    """)
    )
    out = subprocess.run(
        [sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DDP_OK rank 0" in out.stdout
