"""Entropy and mutual-information estimators, each registered in ``ESTIMATORS`` by name.

Estimators accept torch tensors or numpy arrays; see each function for its return type.
"""

from core.entropy._registry import ESTIMATORS
from core.entropy.discrete import plugin_entropy, shannon_entropy
from core.entropy.knn import knn_entropy, ksg_mi

__all__ = ["ESTIMATORS", "knn_entropy", "ksg_mi", "plugin_entropy", "shannon_entropy"]
