"""Entropy and mutual-information estimators, each registered in ``ESTIMATORS`` by name.

Estimators accept torch tensors or numpy arrays; see each function for its return type.
"""

from core.entropy._registry import ESTIMATORS
from core.entropy.discrete import shannon_entropy

__all__ = ["ESTIMATORS", "shannon_entropy"]
