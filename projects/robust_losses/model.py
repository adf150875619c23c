"""The robust-losses network: an MLP LightningModule trained with a registered loss on noisy
labels, which records clean test accuracy, its fit of the noisy training labels and (optionally)
the diffusion spectral entropy of its penultimate features at initialisation and every epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from core.data.fashion_mnist import to_float_images
from core.entropy import diffusion_spectral_entropy, diffusion_spectral_mi
from core.losses import get_loss
from projects.robust_losses.label_noise import NUM_CLASSES

__all__ = ["LOGIT_MAPS", "MEAN", "STD", "NoisyLabelMLP", "l1_mean", "softplus_mean", "to_inputs"]

SCHEDULES = ("constant", "cosine")  # Adam's lr: fixed, or cosine-annealed to 0 per epoch
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-pixel statistics (as core.models.cnn)


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> standardised float inputs (N, 784)."""
    return (to_float_images(images).flatten(1) - MEAN) / STD


def softplus_mean(z: torch.Tensor) -> torch.Tensor:
    """``softplus(z) / mean_k softplus(z_k)`` (N, C) -> (N, C): non-negative rows of mean 1, so
    logit gaps are at most C. The map LDRLoss_V1 applies before LDR-KL in Zhu, Ying & Yang's
    code (github.com/DixianZhu/LDR, loss.py; arXiv:2112.14869)."""
    s = F.softplus(z)
    return s / s.mean(dim=1, keepdim=True)


def l1_mean(z: torch.Tensor) -> torch.Tensor:
    """``z / mean_k |z_k|`` (N, C) -> (N, C): rows of mean absolute value 1 (gaps at most 2C).
    The map ALDRLoss_V1 applies before ALDR-KL in the same code (its softplus=False path, used
    for every data set but CIFAR-100); a 1e-12 floor keeps an all-zero row finite."""
    return z / z.abs().mean(dim=1, keepdim=True).clamp_min(1e-12)


LOGIT_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda z: z,
    "softplus_mean": softplus_mean,
    "l1_mean": l1_mean,
}


class NoisyLabelMLP(L.LightningModule):
    """784-hidden...-10 ReLU MLP trained with the registered loss ``loss`` (``loss_hp``) on
    ``logit_map(logits)``; prediction uses the raw logits (every map keeps the row's argmax).

    ``eval_data``: ``x_test`` (M, 784), ``y_test`` (M,), ``x_train`` (N, 784), ``y_train_noisy``
    (N,) and, with ``probe``, ``x_probe`` (P, 784), ``y_probe`` (P,). They are non-persistent
    buffers, so they follow the module to its device and stay out of checkpoints (and out of
    DDP's per-step buffer broadcast: every rank holds the same copy). ``history``
    gets one row per epoch (0 = initialisation): test accuracy, accuracy on the noisy training
    labels and, with ``probe`` (``sigma``, ``t``), the DSE of the L2-normalised penultimate
    features of the probe images (Liao et al. 2023, arXiv:2312.04823), their DSMI with the true
    labels after the last epoch only (about 60 eigendecompositions), NaN before.
    """

    def __init__(
        self,
        loss: str,
        loss_hp: Mapping[str, Any],
        hidden: list[int],
        optim: Mapping[str, Any],
        eval_data: Mapping[str, torch.Tensor],
        *,
        logit_map: str = "identity",
        probe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if logit_map not in LOGIT_MAPS:
            raise ValueError(f"logit_map must be one of {sorted(LOGIT_MAPS)}, got {logit_map!r}")
        if optim.get("schedule", "constant") not in SCHEDULES:
            raise ValueError(
                f"optim.schedule must be one of {SCHEDULES}, got {optim['schedule']!r}"
            )
        if not hidden or min(hidden) < 1:
            raise ValueError(f"hidden must list positive layer widths, got {hidden!r}")
        dims = [28 * 28, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], NUM_CLASSES)
        self.loss_fn, self.loss_hp = get_loss(loss), dict(loss_hp)
        self.logit_map = LOGIT_MAPS[logit_map]
        self.optim, self.probe = dict(optim), probe
        for name, value in eval_data.items():
            self.register_buffer(name, torch.as_tensor(value), persistent=False)
        # every rank holds the same copy: DDP must not broadcast ~40 MB of them every step
        self._ddp_params_and_buffers_to_ignore = list(eval_data)
        self.history: list[dict[str, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, C)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.logit_map(self(x)), y, **self.loss_hp)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(
            self.parameters(), lr=self.optim["lr"], weight_decay=self.optim["weight_decay"]
        )
        if self.optim.get("schedule", "constant") == "constant":
            return opt
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return [opt], [cosine]

    def on_train_start(self) -> None:
        self._record(epoch=0)  # at initialisation: the baseline of "DSE grows in training"

    def on_train_epoch_end(self) -> None:
        self._record(epoch=self.current_epoch + 1)

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        pred = self(x).argmax(1)
        return multiclass_accuracy(pred, y, NUM_CLASSES, average="micro").item()

    @torch.no_grad()
    def _record(self, epoch: int) -> None:
        was_training = self.training
        self.eval()
        row = {
            "epoch": epoch,
            "test_acc": self._accuracy(self.x_test, self.y_test),
            "fit_noisy_train_acc": self._accuracy(self.x_train, self.y_train_noisy),
        }
        if self.probe:
            feats = F.normalize(self.features(self.x_probe), dim=1)  # (P, h), unit rows
            sigma, t = self.probe["sigma"], self.probe["t"]
            row["dse"] = diffusion_spectral_entropy(feats, sigma=sigma, t=t)
            last = epoch == self.trainer.max_epochs
            row["dsmi_y"] = (
                diffusion_spectral_mi(feats, self.y_probe, sigma=sigma, t=t) if last else np.nan
            )
        self.history.append(row)
        self.train(was_training)
