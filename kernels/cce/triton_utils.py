"""Triton helpers shared by the Cut Cross-Entropy kernels (softcap, matmul precision).

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def tanh_softcap(x, cap):
    """Returns (cap * tanh(x / cap), tanh(x / cap)) (Gemma 2 logit soft-capping)."""
    y = x / cap
    q = tl.exp(-2.0 * tl.abs(y))  # in (0, 1]: no overflow; the interpreter lacks libdevice
    t = (1.0 - q) / (1.0 + q)
    t = tl.where(y < 0, -t, t)
    return cap * t, t


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot(a, b, acc); UPCAST: fp32 operands (the 3.8 interpreter's bf16/fp16 dot is wrong)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether half-precision dots must run in fp32: only under TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1" and dtype in (torch.float16, torch.bfloat16)


def dot_precision(dtype: torch.dtype) -> str:
    """ "ieee" (exact fp32) unless torch allows TF32 for fp32 matmuls."""
    tf32 = dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"
