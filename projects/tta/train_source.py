"""Stage tta-train-source: train the BatchNorm and GroupNorm ResNets on clean Fashion-MNIST.

Lightning via ``core.training`` (seeded, DVCLive logs and resumable checkpoints under
``paths.runs/source-<norm>``). Writes the weights to ``paths.checkpoints/source-<norm>.pt``
(DVC-cached) and clean test accuracy to ``paths.results/source_metrics.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from core.data.fashion_mnist import load_fashion_mnist
from core.models.resnet import ResNet
from core.training import build_trainer, fit_resumable, seed_everything
from core.utils.io import atomic_save_torch, atomic_write_json
from core.utils.parallel import map_processes
from projects.tta.common import arg_parser, checkpoint_path, load_params, to_float


class Classifier(L.LightningModule):
    """Cross-entropy training of a ResNet; AdamW with a one-cycle schedule."""

    def __init__(self, model_cfg: dict, norm: str, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ResNet(norm=norm, **model_cfg)
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(xb).argmax(1) for xb in x.split(1000)])
    return (pred == y).float().mean().item()


def train_norm(norm: str, params: dict) -> dict:
    """Train the ``norm`` variant (resuming from its last checkpoint); returns its metrics."""
    cfg = params["source"]
    data = load_fashion_mnist()
    x_train, x_test = to_float(data.x_train), to_float(data.x_test)
    seed_everything(params["seed"])
    train = DataLoader(
        TensorDataset(x_train, data.y_train), batch_size=cfg["batch_size"], shuffle=True
    )
    val = DataLoader(TensorDataset(x_test, data.y_test), batch_size=1000)
    module = Classifier(params["model"], norm, cfg["lr"], cfg["weight_decay"])
    out_dir = Path(params["paths"]["runs"]) / f"source-{norm}"
    trainer = build_trainer(cfg["trainer"], out_dir, max_epochs=cfg["max_epochs"][norm])
    start = time.time()
    fit_resumable(trainer, module, train_dataloaders=train, val_dataloaders=val, out_dir=out_dir)
    acc = accuracy(module.model, x_test, data.y_test)
    print(f"source-{norm}: clean test accuracy {acc:.4f}")
    atomic_save_torch(module.model.state_dict(), checkpoint_path(params, norm))
    return {"clean_test_accuracy": acc, "train_seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--norms", nargs="+", help="train only these (others' metrics kept)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    norms = args.norms or params["source"]["norms"]
    path = Path(params["paths"]["results"]) / "source_metrics.json"
    metrics = json.loads(path.read_text()) if args.norms and path.exists() else {}
    # one single-threaded process per norm: both cores busy, no thread contention
    runs = map_processes(
        train_norm, norms, params, workers=params.get("workers", 1), threads=params["threads"]
    )
    metrics.update(zip(norms, runs))
    atomic_write_json(path, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
