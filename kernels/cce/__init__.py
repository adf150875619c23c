"""Cut Cross-Entropy: linear + cross-entropy without the (N, V) logits (reference, chunked CPU
path, Triton kernels, dispatch). Use ``core.losses.linear_cross_entropy`` as the front door.
Triton modules are imported lazily so TRITON_INTERPRET can be set first.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from kernels.cce.api import linear_cross_entropy_impl
from kernels.cce.chunked import chunked_linear_cross_entropy
from kernels.cce.reference import reference_linear_cross_entropy

__all__ = [
    "chunked_linear_cross_entropy",
    "linear_cross_entropy_impl",
    "reference_linear_cross_entropy",
]
