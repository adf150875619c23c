"""Shared pieces of the robust-losses project: params, label noise, the MLP LightningModule."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from torch import nn

from core.entropy import diffusion_spectral_entropy, diffusion_spectral_mi
from core.losses import get_loss

DEFAULT_PARAMS = Path("projects/robust_losses/params.yaml")
NUM_CLASSES = 10
# Fashion-MNIST classes: 0 T-shirt, 1 trouser, 2 pullover, 3 dress, 4 coat, 5 sandal, 6 shirt,
# 7 sneaker, 8 bag, 9 ankle boot. Asymmetric noise swaps look-alike garments (our choice).
ASYM_FLIPS = {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5, 9: 7}
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST pixel statistics


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The params dict from a YAML file."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def arg_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the ``--params`` option every entry point takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params YAML file")
    return parser


def symmetric_noise(labels: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Replace a ``rate`` fraction of labels (n,) by a uniformly drawn different class."""
    noisy = labels.copy()
    flip = rng.random(len(labels)) < rate
    shift = rng.integers(1, NUM_CLASSES, size=len(labels))  # never 0: always another class
    noisy[flip] = (labels[flip] + shift[flip]) % NUM_CLASSES
    return noisy


def asymmetric_noise(labels: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Flip labels (n,) of the classes in ``ASYM_FLIPS`` to their partner with prob ``rate``."""
    noisy = labels.copy()
    flip = rng.random(len(labels)) < rate
    for src, dst in ASYM_FLIPS.items():
        noisy[flip & (labels == src)] = dst
    return noisy


NOISES = {"symmetric": symmetric_noise, "asymmetric": asymmetric_noise}
CLEAN = "clean"  # the 0 % condition, run once and shared by both noise types


def conditions(noise: dict[str, list[float]]) -> list[tuple[str, float]]:
    """``[(noise type, rate)]`` from params ``noise: {type: [rates]}``; a 0 rate in any list
    becomes one ``("clean", 0.0)`` condition (first), since 0 % noise is the same for all types."""
    out = [(CLEAN, 0.0)] if any(r == 0 for rates in noise.values() for r in rates) else []
    for kind, rates in noise.items():
        if kind not in NOISES:
            raise ValueError(f"unknown noise type {kind!r}; known: {sorted(NOISES)}")
        out += [(kind, float(r)) for r in rates if r > 0]
    return out


def condition_name(noise: str, rate: float) -> str:
    """Display / key name of a condition: ``clean`` or e.g. ``symmetric 40%``."""
    return noise if noise == CLEAN else f"{noise} {rate:.0%}"


def noisy_labels(labels: np.ndarray, noise: str, rate: float, seed: int) -> np.ndarray:
    """Training labels (n,) of one (condition, seed); clean labels for ``clean``."""
    if noise == CLEAN:
        return labels.copy()
    return NOISES[noise](labels, rate, np.random.default_rng(1000 + seed))


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> standardised float inputs (N, 784)."""
    return (images.reshape(len(images), -1).float() / 255 - MEAN) / STD


class NoisyLabelMLP(L.LightningModule):
    """MLP classifier trained with a registered loss; at initialisation and after each epoch it
    records clean test accuracy and the DSE (Liao et al., 2023) of its penultimate features on
    a probe set, and after the last epoch their DSMI with the true labels."""

    def __init__(
        self,
        loss: str,
        loss_hp: dict,
        hidden: list[int],
        lr: float,
        weight_decay: float,
        eval_data: dict[str, torch.Tensor],
        probe: dict[str, Any],
    ) -> None:
        super().__init__()
        dims = [28 * 28, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(dims[-1], NUM_CLASSES)
        self.loss_fn, self.loss_hp = get_loss(loss), dict(loss_hp)
        self.lr, self.weight_decay = lr, weight_decay
        self.eval_data, self.probe = eval_data, probe
        self.history: list[dict[str, float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self(x), y, **self.loss_hp)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_train_start(self) -> None:
        self._record(epoch=0)  # at initialisation, the baseline of "DSE grows in training"

    def on_train_epoch_end(self) -> None:
        self._record(epoch=self.current_epoch + 1)

    @torch.no_grad()
    def _record(self, epoch: int) -> None:
        """Append accuracy and DSE at ``epoch``; DSMI (~60 eigendecompositions, most of a
        run's probe cost) only after the last epoch, NaN before."""
        was_training = self.training
        self.eval()
        d = self.eval_data
        acc = (self(d["x_test"]).argmax(1) == d["y_test"]).float().mean().item()
        train_acc_noisy = (self(d["x_train"]).argmax(1) == d["y_train_noisy"]).float().mean()
        feats = self.features(d["x_probe"])
        feats = feats / feats.norm(dim=1, keepdim=True).clamp(min=1e-12)  # (n, h), unit norm
        sigma, t = self.probe["sigma"], self.probe["t"]
        last = epoch == self.trainer.max_epochs
        self.history.append(
            {
                "epoch": epoch,
                "test_acc": acc,
                "fit_noisy_train_acc": train_acc_noisy.item(),
                "dse": diffusion_spectral_entropy(feats, sigma=sigma, t=t),
                "dsmi_y": (
                    diffusion_spectral_mi(feats, d["y_probe"], sigma=sigma, t=t)
                    if last
                    else float("nan")
                ),
            }
        )
        self.train(was_training)
