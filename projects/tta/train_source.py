"""Stage tta-train-source: train the BatchNorm and GroupNorm ResNets on clean Fashion-MNIST.

Each norm is one run of ``core.engine.trainer.fit`` in ``paths.runs/source/<norm>`` (checkpoints,
DVCLive logs, ``identity.json``): it resumes only while its identity (seed, model, the
``source`` params of that norm, the Fashion-MNIST files, the imported code) holds, so a changed
param retrains from scratch instead of restoring the finished run. Writes the weights to
``paths.checkpoints/source-<norm>.pt`` (DVC-cached) and the clean test accuracy to
``paths.results/source_metrics.json``. The two norms train side by side in
``machine.workers`` single-threaded processes, or one after the other on every rank under
``source.trainer.strategy: ddp`` (``--workers 1``); only global rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from core.data.fashion_mnist import load_fashion_mnist, to_float_images
from core.engine.config import entry_parser, parse_entry
from core.engine.dist import check_pool, is_global_zero
from core.engine.identity import run_config
from core.engine.trainer import Run, build_trainer, fit, seed_everything
from core.models.resnet import ResNet
from core.utils.io import atomic_save_torch, atomic_write_json
from core.utils.parallel import map_processes
from projects.tta import DEFAULT_PARAMS
from projects.tta.source_model import checkpoint_path

NORMS = ("bn", "gn")


class Classifier(L.LightningModule):
    """Cross-entropy training of a ResNet (He et al. 2016); AdamW with a one-cycle schedule
    (Smith & Topin 2017, arXiv:1708.07120). Batches: images (B, 1, 28, 28), labels (B,)."""

    def __init__(self, model_cfg: dict, norm: str, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = ResNet(norm=norm, **model_cfg)
        self.lr, self.weight_decay = lr, weight_decay
        self.val_acc = MulticlassAccuracy(num_classes=self.model.fc.out_features, average="micro")

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True)  # a torchmetrics object: synced

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def source_config(params: dict, norm: str) -> dict[str, Any]:
    """What decides the ``norm`` source model: seed, model, and the ``source`` params with that
    norm's epoch count (the other norm's count, and the machine knobs, are left out)."""
    cfg = {k: v for k, v in params["source"].items() if k not in ("norms", "max_epochs")}
    cfg["max_epochs"] = params["source"]["max_epochs"][norm]
    return run_config({"seed": params["seed"], "model": params["model"], "norm": norm} | cfg)


def train_norm(norm: str, params: dict) -> dict[str, Any]:
    """Train (or resume, while its identity holds) the ``norm`` source model; write its weights
    and return its clean test accuracy and wall time."""
    if norm not in NORMS:
        raise ValueError(f"source.norms: each norm must be one of {NORMS}, got {norm!r}")
    cfg, clean = params["source"], params["paths"]["clean"]
    data = load_fashion_mnist(clean)
    x_train, x_test = to_float_images(data.x_train), to_float_images(data.x_test)
    seed_everything(params["seed"])
    train = DataLoader(
        TensorDataset(x_train, data.y_train), batch_size=cfg["batch_size"], shuffle=True
    )
    val = DataLoader(TensorDataset(x_test, data.y_test), batch_size=1000)
    module = Classifier(params["model"], norm, cfg["lr"], cfg["weight_decay"])
    run = Run(
        Path(params["paths"]["runs"]) / "source" / norm,
        source_config(params, norm),
        [clean],
        name=f"source-{norm}",
    )
    start = time.perf_counter()
    fit(  # a finished run is restored (no step taken) while its identity holds
        module,
        cfg["trainer"],
        run,
        max_epochs=cfg["max_epochs"][norm],
        train_dataloaders=train,
        val_dataloaders=val,
    )
    evaluator = build_trainer(cfg["trainer"], run.dir, logger=False, checkpoint=False)
    # on the device, no log; under DDP each rank validates half the test set, val_acc syncs
    acc = evaluator.validate(module, val, verbose=False)[0]["val/acc"]
    if is_global_zero():
        print(f"source-{norm}: clean test accuracy {acc:.4f}", flush=True)
        state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
        atomic_save_torch(state, checkpoint_path(params, norm))
    return {"clean_test_accuracy": acc, "seconds": round(time.perf_counter() - start, 1)}


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line: the engine's options plus ``--norms``."""
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--norms", nargs="+", choices=NORMS, help="train only these")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, params, mach = parse_entry(build_parser(), argv)
    norms = args.norms or params["source"]["norms"]
    path = Path(params["paths"]["results"]) / "source_metrics.json"
    metrics = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    workers = check_pool(mach.workers, params["source"]["trainer"], "source.trainer")
    runs = map_processes(train_norm, norms, params, workers=workers, threads=mach.threads)
    metrics = {n: m for n, m in metrics.items() if n in params["source"]["norms"]}
    metrics.update(zip(norms, runs))
    if is_global_zero():
        atomic_write_json(path, {n: metrics[n] for n in sorted(metrics)})
    return metrics


if __name__ == "__main__":
    main()
