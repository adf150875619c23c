"""The classifier every calibration run trains: a network plus a loss chosen from the registry.

``loss`` in params is ``{fn: <core.losses.LOSSES key>, **hyper-parameters}``. How a batch is fed
to the loss follows from the function's signature and the hyper-parameters, never from its name:

- ``mixed_logits`` in the signature (RankMixup's ``mrl``, ``mndcg``; Noh et al. 2023): the raw
  batch and its mixup copies share one forward; ``n_mixups`` copies are stacked (M, N, C), one
  copy without ``n_mixups`` is passed as (N, C);
- ``mixup_alpha`` given (``mixup_cross_entropy``; Zhang et al. 2018): the mixed batch against
  its soft targets;
- otherwise ``fn(logits, labels, **hp)`` (``ce``, ``label_smoothing``, ``focal``, ...).

Validation accumulates ECE, NLL and accuracy with torchmetrics (``core.calibration``'s metric
classes), so the per-epoch numbers are exact over batches and DDP processes.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from core.calibration import ExpectedCalibrationError, NegativeLogLikelihood
from core.losses import get_loss
from core.losses.calibration_losses import mixup_batch
from core.models import ResNet, SmallCNN

__all__ = ["LossClassifier", "build_net", "mlp"]


def mlp(dim: int, hidden: list[int], n_classes: int) -> nn.Sequential:
    """Linear-ReLU blocks of widths ``hidden`` then a linear head: (N, dim) -> (N, n_classes)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(dim, width), nn.ReLU()]
        dim = width
    return nn.Sequential(*layers, nn.Linear(dim, n_classes))


def build_net(spec: Mapping[str, Any], n_classes: int) -> nn.Module:
    """A 28x28 image classifier from ``{name: small_cnn | resnet, **kwargs}`` (core.models)."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name == "small_cnn":
        return SmallCNN(tuple(spec.pop("channels")), spec.pop("hidden"), n_classes, **spec)
    if name == "resnet":
        return ResNet(num_classes=n_classes, **spec)
    raise ValueError(f"model.name must be 'small_cnn' or 'resnet', got {name!r}")


class LossClassifier(L.LightningModule):
    """``net`` trained with Adam (``lr``) on a registered loss (module docstring).

    ``history`` maps epoch -> {train_loss, and after validation val_ece, val_nll, val_acc}.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: Mapping[str, Any],
        *,
        lr: float,
        n_classes: int,
        n_bins: int = 15,
    ) -> None:
        super().__init__()
        if not (isinstance(lr, int | float) and lr > 0):
            raise ValueError(f"lr must be a number > 0, got {lr!r}")
        if not isinstance(loss, Mapping) or "fn" not in loss:
            raise ValueError(f"loss must be a mapping with a registry key 'fn', got {loss!r}")
        self.net, self.lr, self.n_classes = net, float(lr), n_classes
        self.loss_fn = get_loss(loss["fn"])
        hp = {k: v for k, v in loss.items() if k != "fn"}
        self.mixup_alpha = hp.pop("mixup_alpha", None)
        self.n_mixups = hp.pop("n_mixups", None)
        if "mixed_logits" in inspect.signature(self.loss_fn).parameters:
            self.kind = "ranking"
        elif self.mixup_alpha is not None:
            self.kind = "mixup"
        else:
            self.kind = "plain"
        if self.kind != "plain" and not (
            isinstance(self.mixup_alpha, int | float) and self.mixup_alpha > 0
        ):
            raise ValueError(f"{loss['fn']}: mixup_alpha must be a number > 0, got {hp!r}")
        if self.n_mixups is not None and (
            self.kind != "ranking" or not isinstance(self.n_mixups, int) or self.n_mixups < 1
        ):
            raise ValueError(
                f"{loss['fn']}: n_mixups (an integer >= 1) applies only to ranking losses"
            )
        self.hp = hp
        self.val_ece = ExpectedCalibrationError(n_bins)
        self.val_nll = NegativeLogLikelihood()
        self.val_acc = MulticlassAccuracy(n_classes, average="micro")
        self.history: dict[int, dict[str, float]] = {}
        # the epoch's mean training loss, weighted by batch size, synced over the ranks by
        # compute() under DDP (Trainer or Fabric); fp64 sums, no host sync per step
        self.train_loss = MeanMetric().set_dtype(torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _mix(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        xm, soft, _ = mixup_batch(x, y, self.n_classes, alpha=self.mixup_alpha)
        return xm, soft

    def batch_loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The training loss of one batch x (N, ...), labels y (N,)."""
        if self.kind == "plain":
            return self.loss_fn(self(x), y, **self.hp)
        if self.kind == "mixup":
            xm, soft = self._mix(x, y)
            return self.loss_fn(self(xm), soft, **self.hp)
        m = self.n_mixups or 1
        mixed = [self._mix(x, y) for _ in range(m)]
        out = self(torch.cat([x] + [xm for xm, _ in mixed]))  # ((M + 1) N, C)
        logits, mixed_logits = out[: len(x)], out[len(x) :].view(m, len(x), -1)
        soft = torch.stack([t for _, t in mixed])  # (M, N, C)
        if self.n_mixups is None:
            mixed_logits, soft = mixed_logits[0], soft[0]
        return self.loss_fn(logits, y, mixed_logits, soft, **self.hp)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.batch_loss(x, y)
        self.train_loss.update(loss.detach(), weight=len(y))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def end_epoch(self, epoch: int) -> None:
        """Close epoch ``epoch`` (0-based) in ``history``: the mean training loss (over every
        rank's batches under DDP, Trainer or Fabric alike; every rank calls this)."""
        if self.train_loss.update_called:
            self.history.setdefault(epoch, {})["train_loss"] = float(self.train_loss.compute())
        self.train_loss.reset()

    def on_train_epoch_end(self) -> None:
        self.end_epoch(self.current_epoch)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        probs = self(x).double().softmax(dim=1)
        for metric in (self.val_ece, self.val_nll, self.val_acc):
            metric.update(probs, y)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        values = {
            "val_ece": float(self.val_ece.compute()),
            "val_nll": float(self.val_nll.compute()),
            "val_acc": float(self.val_acc.compute()),
        }
        for metric in (self.val_ece, self.val_nll, self.val_acc):
            metric.reset()
        self.history.setdefault(self.current_epoch, {}).update(values)  # synced by compute()
        self.log_dict({k.replace("_", "/", 1): v for k, v in values.items()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
