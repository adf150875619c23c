"""Argument checks shared by the loss functions: one message format naming the loss, the argument
and its allowed range, e.g. ``focal: gamma must be a finite number >= 0, got -1``; and the
half-precision rule (``float32_inside``)."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable

import torch

__all__ = [
    "check_class_targets",
    "check_int",
    "check_number",
    "check_reduction",
    "float32_inside",
]

_HALF = (torch.float16, torch.bfloat16)

REDUCTIONS = ("mean", "sum", "none")


def check_number(
    fn: str,
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float when it is a finite real in the given interval, else ValueError."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            where = f"{'>' if low_open else '>='} {low:g}"
        elif high is not None:
            where = f"{'<' if high_open else '<='} {high:g}"
        else:
            where = "(any real)"
        raise ValueError(f"{fn}: {name} must be a finite number {where}, got {value!r}")
    return float(value)


def check_int(fn: str, name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` when it is an integer in [low, high] (bool refused), else ValueError."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        where = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{fn}: {name} must be an integer {where}, got {value!r}")
    return int(value)


def check_reduction(fn: str, reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_class_targets(fn: str, logits: object, targets: object) -> torch.Tensor:
    """Validate floating (N, C) logits and integer (N,) targets; return the targets as int64.

    Any integer dtype is accepted (uint8 / int32 class ids compare to ``ignore_index`` only after
    the cast, so uint8 255 is a class, never a wrapped -100). Values are not range-checked here.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = getattr(logits, "dtype", type(logits).__name__)
        raise TypeError(f"{fn}: logits must be a floating torch.Tensor, got {got}")
    if logits.dim() != 2:
        raise ValueError(f"{fn}: logits must be (N, C), got shape {tuple(logits.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype == torch.bool:
        got = getattr(targets, "dtype", type(targets).__name__)
        raise TypeError(f"{fn}: targets must be an integer torch.Tensor, got {got}")
    if targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"{fn}: targets must be integer class indices, got {targets.dtype}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"{fn}: targets must be (N,) = ({logits.shape[0]},), got {tuple(targets.shape)}"
        )
    return targets.long()


def float32_inside(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a loss on fp16 / bf16 tensors in float32 and return the first tensor's dtype.

    In half precision a softmax, a 1e-12 floor or an exp(60) would underflow or overflow inside
    the loss; float32 maths keeps it right, and autograd casts the gradient back.
    """

    def up(a: object) -> object:
        return a.float() if isinstance(a, torch.Tensor) and a.dtype in _HALF else a

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> torch.Tensor:
        first = args[0] if args else None
        if not isinstance(first, torch.Tensor) or first.dtype not in _HALF:
            return fn(*args, **kwargs)
        out = fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
        return out.to(first.dtype)

    return wrapper
