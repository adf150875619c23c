"""Losses: cross-entropy family, fused linear cross-entropy, robust losses, KD divergences,
calibration-time losses. Every function is registered by name (``get_loss``, ``get_divergence``).

Each family module registers its functions on import; add one import line per new module.
"""

from core.losses._registry import DIVERGENCES, LOSSES, get_divergence, get_loss
from core.losses.calibration_losses import *  # noqa: F401,F403
from core.losses.classification import *  # noqa: F401,F403
from core.losses.consistency import *  # noqa: F401,F403
from core.losses.divergences import *  # noqa: F401,F403
from core.losses.linear_ce import LinearCrossEntropy, linear_cross_entropy
from core.losses.linear_kd import *  # noqa: F401,F403

__all__ = [
    "DIVERGENCES",
    "LOSSES",
    "LinearCrossEntropy",
    "get_divergence",
    "get_loss",
    "linear_cross_entropy",
]
