"""A small ResNet for 28x28 grayscale images, with a choice of norm layer.

He, Zhang, Ren & Sun, 2016, "Deep Residual Learning for Image Recognition" (arXiv:1512.03385):
basic blocks in three stages (width w, 2w, 4w at 28, 14, 7 px; at 14, 7, 4 px with
``stem_stride=2``, ~4x cheaper). ``norm="bn"`` uses BatchNorm
(Ioffe & Szegedy, 2015), ``norm="gn"`` GroupNorm (Wu & He, 2018, arXiv:1803.08494), the
batch-agnostic variant that SAR (Niu et al., 2023, arXiv:2302.12400) argues is more stable in
wild test-time adaptation; ``norm="none"`` has no normalisation layer at all.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet", "make_norm"]

# Fashion-MNIST training-set pixel mean and std (images in [0, 1])
_MEAN, _STD = 0.2860, 0.3530


def make_norm(norm: str, channels: int, groups: int = 8) -> nn.Module:
    """BatchNorm2d ("bn"), GroupNorm with ``min(groups, channels)`` groups ("gn") or Identity."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(min(groups, channels), channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'bn', 'gn' or 'none', got {norm!r}")


class BasicBlock(nn.Module):
    """conv3x3-norm-relu-conv3x3-norm plus a (1x1 conv + norm when the shape changes) skip."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=norm == "none")
        self.bn1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=norm == "none")
        self.bn2 = make_norm(norm, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=norm == "none"), make_norm(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for (N, 1, 28, 28) images in [0, 1] -> logits (N, num_classes).

    ``features(x)`` gives the pooled (N, 4 * width) representation that ``fc`` classifies.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 16,
        blocks: int = 1,
        norm: str = "bn",
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        make_norm(norm, 1)  # validate early
        self.norm = norm
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, stem_stride, 1, bias=norm == "none")
        self.bn1 = make_norm(norm, w)
        self.layer1 = self._stage(w, w, 1, blocks, norm)
        self.layer2 = self._stage(w, 2 * w, 2, blocks, norm)
        self.layer3 = self._stage(2 * w, 4 * w, 2, blocks, norm)
        self.fc = nn.Linear(4 * w, num_classes)

    @staticmethod
    def _stage(cin: int, cout: int, stride: int, blocks: int, norm: str) -> nn.Sequential:
        layers = [BasicBlock(cin, cout, stride, norm)]
        layers += [BasicBlock(cout, cout, 1, norm) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) in [0, 1] -> (N, 4 * width) pooled features."""
        x = (x - _MEAN) / _STD
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 4w, 7, 7) at stem_stride 1
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
