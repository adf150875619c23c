"""The kd image networks and LightningModules: offline KD from precomputed teacher logits, online
KD of a teacher-student pair, and their test metrics (torchmetrics, on the module's device).

Every run of a stage is ``train_and_test``: a Trainer from the params ``trainer:`` block
(``core.engine.trainer.build_trainer``; the per-step overhead against the bare loop is measured
in projects/kd/README.md), one pass over the run's seeded batches, then the test set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from core.calibration.torchmetrics_metrics import (
    ExpectedCalibrationError,
    NegativeLogLikelihood,
)
from core.engine.trainer import build_trainer
from core.models.cnn import SmallCNN
from core.models.resnet import ResNet
from projects.kd.image_data import N_CLASSES
from projects.kd.image_losses import offline_loss, online_losses


def build_net(spec: dict[str, Any]) -> nn.Module:
    """``{arch: smallcnn, channels, hidden}`` -> SmallCNN; ``{arch: resnet, ...}`` -> ResNet."""
    kw = {k: v for k, v in spec.items() if k != "arch"}
    if spec.get("arch") == "smallcnn":
        return SmallCNN(tuple(kw["channels"]), kw["hidden"], N_CLASSES)
    if spec.get("arch") == "resnet":
        return ResNet(N_CLASSES, **kw)
    raise ValueError(f"net arch must be 'smallcnn' or 'resnet', got {spec.get('arch')!r}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class DualHead(nn.Module):
    """A network plus an auxiliary linear head on its penultimate features (Dual-Head KD).

    ``forward`` is the main head only (test time); ``both(x)`` gives (main, aux) logits (N, C).
    The penultimate features are the input of the network's last ``nn.Linear``.
    Yang et al. 2024, "Dual-Head Knowledge Distillation", arXiv:2411.08937.
    """

    def __init__(self, net: nn.Module, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.net = net
        self.last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        self.aux = nn.Linear(self.last.in_features, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats: list[Tensor] = []
        hook = self.last.register_forward_hook(lambda _m, inputs, _out: feats.append(inputs[0]))
        try:
            main = self.net(x)
        finally:
            hook.remove()
        return main, self.aux(feats[0])


def make_optimizer(
    params: Iterable[Any], optim: dict[str, Any], total_steps: int
) -> dict[str, Any]:
    """Lightning's optimiser dict: Adam (lr, weight_decay) over ``params`` (tensors or param
    groups) with a per-step cosine decay to 0 (``schedule: cosine``) or a constant rate."""
    schedule = optim.get("schedule", "cosine")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {schedule!r}")
    opt = torch.optim.Adam(params, lr=optim["lr"], weight_decay=optim.get("weight_decay", 0.0))
    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total_steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _metrics(n_bins: int) -> MetricCollection:
    """Top-1, top-label ECE (``n_bins`` equal-width bins) and NLL, all fed (probs, labels)."""
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(N_CLASSES, average="micro"),
            "ece": ExpectedCalibrationError(n_bins),
            "nll": NegativeLogLikelihood(),
        }
    )


class OfflineKD(L.LightningModule):
    """A network trained with ``offline_loss`` against precomputed, constant teacher logits.

    Training batches: (x (B, 1, 28, 28), y (B,), teacher logits (B, C)); a method without terms
    is plain CE (the student alone, or the teacher itself). Test batches: (x, y, teacher
    prediction (B,)): top-1, ECE, NLL and top-1 agreement with the teacher. Hinton et al. 2015.
    """

    def __init__(
        self,
        net: nn.Module,
        method: dict[str, Any],
        optim: dict[str, Any],
        total_steps: int,
        n_bins: int = 15,
    ) -> None:
        super().__init__()
        self.net = DualHead(net) if method.get("aux_head") else net
        self.method, self.optim, self.total_steps = method, optim, total_steps
        self.test_metrics = _metrics(n_bins)
        self.agreement = MulticlassAccuracy(N_CLASSES, average="micro")
        self.val_accuracy = MulticlassAccuracy(N_CLASSES, average="micro")
        self.results: dict[str, float] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def progress(self) -> float:
        """Fraction of training done after this step: (global step + 1) / total steps."""
        return (self.global_step + 1) / self.total_steps

    def training_step(self, batch: tuple[Tensor, ...], _: int) -> Tensor:
        x, y, t = batch
        logits, aux = self.net.both(x) if isinstance(self.net, DualHead) else (self.net(x), None)
        teacher = t if self.method.get("terms") else None
        loss = offline_loss(self.method, logits, aux, teacher, y, self.progress())
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return make_optimizer(self.parameters(), self.optim, self.total_steps)

    def validation_step(self, batch: tuple[Tensor, ...], _: int) -> None:
        """A learning curve (the teacher's): val top-1 and CE per validation pass."""
        x, y = batch[:2]
        logits = self(x)
        self.val_accuracy.update(logits, y)
        self.log("val/accuracy", self.val_accuracy, on_epoch=True)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)

    def predict_step(self, batch: tuple[Tensor, ...], _: int) -> Tensor:
        return self(batch[0])

    def test_step(self, batch: tuple[Tensor, ...], _: int) -> None:
        x, y, t_pred = batch
        logits = self(x).double()  # (B, C)
        self.test_metrics.update(logits.softmax(-1), y)
        self.agreement.update(logits, t_pred)

    def on_test_epoch_end(self) -> None:
        out = {k: float(v) for k, v in self.test_metrics.compute().items()}
        out["agreement"] = float(self.agreement.compute())
        self.results = out
        self.test_metrics.reset()
        self.agreement.reset()


class OnlineKD(L.LightningModule):
    """Teacher and student trained together from scratch with ``online_losses``.

    One Adam over two parameter groups (student, teacher) with the same hyperparameters: Adam's
    state is per parameter, so this is exactly two optimisers, one per network. Training
    batches (x, y); test batches (x, y): each network's top-1, ECE, NLL and their agreement.
    Zhang et al. 2018 (DML), arXiv:1706.00384; Amara et al. (BD-KD), arXiv:2212.12965.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        method: dict[str, Any],
        optim: dict[str, Any],
        total_steps: int,
        n_bins: int = 15,
    ) -> None:
        super().__init__()
        self.student, self.teacher = student, teacher
        self.method, self.optim, self.total_steps = method, optim, total_steps
        self.student_metrics = _metrics(n_bins)
        self.teacher_metrics = _metrics(n_bins)
        self.agreement = MulticlassAccuracy(N_CLASSES, average="micro")
        self.results: dict[str, dict[str, float]] = {}

    def training_step(self, batch: tuple[Tensor, ...], _: int) -> Tensor:
        x, y = batch
        progress = (self.global_step + 1) / self.total_steps
        loss_s, loss_t = online_losses(self.method, self.student(x), self.teacher(x), y, progress)
        self.log_dict({"train/loss_s": loss_s, "train/loss_t": loss_t}, on_step=True)
        return loss_s + loss_t

    def configure_optimizers(self) -> dict[str, Any]:
        groups = [{"params": self.student.parameters()}, {"params": self.teacher.parameters()}]
        return make_optimizer(groups, self.optim, self.total_steps)

    def test_step(self, batch: tuple[Tensor, ...], _: int) -> None:
        x, y = batch
        s, t = self.student(x).double(), self.teacher(x).double()  # (B, C)
        self.student_metrics.update(s.softmax(-1), y)
        self.teacher_metrics.update(t.softmax(-1), y)
        self.agreement.update(s, t.argmax(-1))

    def on_test_epoch_end(self) -> None:
        s = {k: float(v) for k, v in self.student_metrics.compute().items()}
        s["agreement"] = float(self.agreement.compute())
        t = {k: float(v) for k, v in self.teacher_metrics.compute().items()}
        self.results = {"metrics": s, "teacher_metrics": t}
        for m in (self.student_metrics, self.teacher_metrics, self.agreement):
            m.reset()


def train_and_test(
    module: L.LightningModule,
    trainer_cfg: dict[str, Any],
    out_dir: str | os.PathLike,
    train: DataLoader,
    test: DataLoader,
    name: str = "",
) -> L.Trainer:
    """One pass over ``train`` (every epoch's seeded batches), then the test set; no logger and
    no checkpoints (a multi-run stage caches whole results, ``core.engine.cache.cached_run``)."""
    trainer = build_trainer(
        trainer_cfg, out_dir, logger=False, checkpoint=False, name=name, max_epochs=1
    )
    trainer.fit(module, train_dataloaders=train)
    trainer.test(module, dataloaders=test, verbose=False)
    return trainer
