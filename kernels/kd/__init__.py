"""Fused large-vocabulary KD loss: reference (materialised), chunked (CPU), api (dispatch).
Use ``core.losses.linear_kd_loss`` as the front door; a divergence comes in as a
``FusedDivergence`` built from its definition (kernels import no core)."""

from kernels.kd.api import IMPLS, linear_kd_impl
from kernels.kd.chunked import AUTOGRAD_BUFFERS, FusedDivergence, chunked_linear_kd
from kernels.kd.reference import reference_linear_kd

__all__ = [
    "AUTOGRAD_BUFFERS",
    "IMPLS",
    "FusedDivergence",
    "chunked_linear_kd",
    "linear_kd_impl",
    "reference_linear_kd",
]
