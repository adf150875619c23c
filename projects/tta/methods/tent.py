"""Tent: test entropy minimisation (Wang et al., 2021, arXiv:2006.10726)."""

from __future__ import annotations

from projects.tta.methods.base import METHODS, TTAMethod

__all__ = ["Tent"]


@METHODS.register(name="tent", paper="Wang et al. 2021, arXiv:2006.10726")
class Tent(TTAMethod):
    """Entropy minimisation of norm affine params with test-batch statistics (Wang et al., 2021).

    One step per batch on ``mean_n H(softmax(f(x_n)))``; the base class holds the whole rule.
    Defaults: the paper's CIFAR setting, Adam lr 1e-3 (its released config also offers SGD with
    ``nesterov=True``). As in SAR's code, GroupNorm/LayerNorm affine params are adapted too (the
    original adapts BN only). After ``.eval()`` BatchNorm keeps using batch statistics, as the
    authors' Tent does (the running buffers are removed).
    """
