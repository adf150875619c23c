"""A small two-conv CNN for 28x28 grayscale images (Fashion-MNIST), cheap enough for CPU sweeps.

LeCun et al. 1998, "Gradient-based learning applied to document recognition" (LeNet-style
conv-pool blocks); widths are parameters so a pipeline can trade accuracy for CPU time.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN"]

# Fashion-MNIST training-set pixel mean and std (images in [0, 1])
_MEAN, _STD = 0.2860, 0.3530


class SmallCNN(nn.Module):
    """conv3x3(c1)-ReLU-pool2 -> conv3x3(c2)-ReLU-pool2 -> linear(hidden)-ReLU -> linear(C).

    Input (N, 1, 28, 28) float images in [0, 1] (normalised inside); output logits (N, C).
    """

    def __init__(
        self, channels: tuple[int, int] = (16, 32), hidden: int = 64, n_classes: int = 10
    ) -> None:
        super().__init__()
        if len(channels) != 2 or min(channels) < 1 or hidden < 1 or n_classes < 2:
            raise ValueError(
                f"need two positive channel widths, hidden >= 1 and n_classes >= 2; got "
                f"channels={channels}, hidden={hidden}, n_classes={n_classes}"
            )
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, c1, 14, 14)
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (N, c2, 7, 7)
            nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(
            nn.Linear(c2 * 49, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) images in [0, 1] -> (N, C) logits."""
        if x.ndim != 4 or x.shape[1:] != (1, 28, 28):
            raise ValueError(f"x must be (N, 1, 28, 28), got shape {tuple(x.shape)}")
        return self.head(self.features((x - _MEAN) / _STD))
