"""The entropy-estimator registry that params.yaml names resolve through."""

from __future__ import annotations

from collections.abc import Callable

from core.registry import Registry

ESTIMATORS: Registry[Callable] = Registry("entropy estimator")
