"""The loss and divergence registries that params.yaml names resolve through."""

from __future__ import annotations

from collections.abc import Callable

from core.registry import Registry

LOSSES: Registry[Callable] = Registry("loss")
DIVERGENCES: Registry[Callable] = Registry("divergence")


def get_loss(name: str) -> Callable:
    """The loss function registered as ``name`` (e.g. ``"ce"``, ``"focal"``, ``"ldr_kl"``)."""
    return LOSSES.get(name)


def get_divergence(name: str) -> Callable:
    """The KD divergence ``f(student_logits, teacher_logits, *, temperature=1.0, reduction="mean", **hp)``."""
    return DIVERGENCES.get(name)
