"""Test-time adaptation methods: one module per paper on one base class; ``build(name, model, **hp)``.

Every method wraps any torch classifier (a copy of it unless ``inplace=True``); calling the
wrapper on a batch ``(N, C, H, W)`` returns logits ``(N, K)`` and adapts as the method says.
``reset()`` restores the state the wrapper had right after it was built, bit for bit.

  source  no adaptation (eval mode)                                            source.py
  bn      test-batch normalisation statistics (Schneider et al., 2020)        bn.py
  tent    entropy minimisation of norm affine params (Wang et al., 2021)      tent.py
  eata    reliable + non-redundant samples, Fisher anchor (Niu et al., 2022)  eata.py
  sar     reliable samples, sharpness-aware step, recovery (Niu et al., 2023) sar.py
  deyo    entropy + PLPD filter and weighting (Lee et al., 2024)               deyo.py
  rmt     symmetric-CE mean teacher + source prototypes (Doebler et al., 2023) rmt.py

Defaults are the papers'; params.yaml holds the values used here. The shared maths (PLPD,
SupCon, RMT's symmetric CE) lives in ``core.losses.consistency``.
"""

from projects.tta.methods.base import (
    METHODS,
    TTAMethod,
    build,
    check_batch,
    drop_running_stats,
    norm_layers,
    reliable,
)
from projects.tta.methods.bn import BatchNormAdapt
from projects.tta.methods.deyo import DeYO, deyo_weights, patch_shuffle
from projects.tta.methods.eata import EATA, eata_select, eata_weights
from projects.tta.methods.rmt import RMT, ema_update
from projects.tta.methods.sar import SAR
from projects.tta.methods.source import Source
from projects.tta.methods.tent import Tent

__all__ = [
    "EATA",
    "METHODS",
    "RMT",
    "SAR",
    "BatchNormAdapt",
    "DeYO",
    "Source",
    "TTAMethod",
    "Tent",
    "build",
    "check_batch",
    "deyo_weights",
    "drop_running_stats",
    "eata_select",
    "eata_weights",
    "ema_update",
    "norm_layers",
    "patch_shuffle",
    "reliable",
]
