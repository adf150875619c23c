"""Fused large-vocabulary KD loss: reference (materialised), chunked (CPU), api (dispatch)."""

from kernels.kd.api import FUSED_DIVERGENCES, linear_kd

__all__ = ["FUSED_DIVERGENCES", "linear_kd"]
