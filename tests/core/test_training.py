import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from core.training import build_trainer, fit_resumable, last_checkpoint, seed_everything


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g)),
        batch_size=8,
    )


CFG = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


def test_unknown_trainer_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown trainer keys \['max_epoch'\]"):
        build_trainer({"max_epoch": 3}, tmp_path)


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path):
    seed_everything(0)
    first = build_trainer({**CFG, "max_epochs": 1}, tmp_path, logger=False)
    fit_resumable(first, Tiny(), train_dataloaders=_loader(), out_dir=tmp_path)
    assert last_checkpoint(tmp_path) is not None and first.global_step == 4
    # a "restarted" stage with a longer budget continues where the first one stopped
    second = build_trainer({**CFG, "max_epochs": 2}, tmp_path, logger=False)
    module = Tiny()
    fit_resumable(second, module, train_dataloaders=_loader(), out_dir=tmp_path)
    assert second.global_step == 8 and second.current_epoch == 2
    # ...and ends with the same weights as an uninterrupted two-epoch run from the same init
    seed_everything(0)
    straight = build_trainer({**CFG, "max_epochs": 2}, tmp_path / "b", logger=False)
    ref = Tiny()
    straight.fit(ref, train_dataloaders=_loader())
    torch.testing.assert_close(module.net.weight, ref.net.weight)


def test_dvclive_logger_writes_metrics(tmp_path):
    trainer = build_trainer(
        {**CFG, "max_steps": 3, "log_every_n_steps": 1}, tmp_path, checkpoint=False
    )
    trainer.fit(Tiny(), train_dataloaders=_loader())
    rows = (
        (tmp_path / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    )
    assert rows[0].split("\t") == ["step", "loss"] and len(rows) == 1 + 3  # one row per step


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """Two steps of a tiny model with strategy ddp on CPU (gloo), in two processes."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(root)!r})
        from tests.core.test_training import Tiny, _loader
        from core.training import build_trainer, seed_everything
        seed_everything(0)
        t = build_trainer({{"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_steps": 2,
                           "enable_progress_bar": False}}, {str(tmp_path / "out")!r}, logger=False)
        m = Tiny()
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
