"""Front door of the fused linear KD loss: validation and dispatch on ``impl``.

``impl="auto"`` picks the chunked path (on CPU and, lacking a Triton KD kernel, on CUDA too)
and never silently materialises the logits; ``"reference"`` materialises them on request.
"""

from __future__ import annotations

import math

import torch

from kernels.kd.chunked import SPECS, chunked_linear_kd
from kernels.kd.reference import reference_linear_kd

IMPLS = ("auto", "chunked", "reference")
FUSED_DIVERGENCES = tuple(sorted(SPECS))


def _validate(e_s, w_s, e_t, w_t, targets, temperature, hard_weight, reduction) -> None:
    for name, x in (("student_hidden", e_s), ("teacher_hidden", e_t)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be (N, D) after flattening, got {tuple(x.shape)}")
    for name, w, e in (("student_weight", w_s, e_s), ("teacher_weight", w_t, e_t)):
        if w.ndim != 2 or w.shape[1] != e.shape[1]:
            raise ValueError(f"{name} must be (V, D={e.shape[1]}), got {tuple(w.shape)}")
    if e_s.shape[0] != e_t.shape[0]:
        raise ValueError(
            f"student and teacher token counts differ: {e_s.shape[0]} vs {e_t.shape[0]}"
        )
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(
            f"student and teacher vocabularies differ: {w_s.shape[0]} vs {w_t.shape[0]}"
        )
    if targets is not None and targets.shape != (e_s.shape[0],):
        raise ValueError(f"targets must be ({e_s.shape[0]},), got {tuple(targets.shape)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must lie in [0, 1], got {hard_weight!r}")
    if hard_weight > 0 and targets is None:
        raise ValueError("hard_weight > 0 needs targets for the cross-entropy term")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    **hparams: float,
) -> torch.Tensor:
    """Fused linear KD loss (1 - h) T^2 D(p_t || p_s) + h CE without (N, V) logits.

    Hidden states (..., D) are flattened to rows, targets (...) likewise. Returns a scalar
    (mean over non-ignored rows, or sum); gradients reach the student hidden states and
    weight, never the teacher's. Divergences: ``FUSED_DIVERGENCES`` (chunked) or any per-row
    divergence of ``core.losses`` with ``impl="reference"`` (materialised, for tests).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    e_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    e_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    tg = targets.reshape(-1) if targets is not None else None
    _validate(e_s, student_weight, e_t, teacher_weight, tg, temperature, hard_weight, reduction)
    kw = dict(
        divergence=divergence,
        temperature=temperature,
        targets=tg,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        **hparams,
    )
    if impl == "reference":
        return reference_linear_kd(e_s, student_weight, e_t, teacher_weight, **kw)
    if divergence not in SPECS:
        raise ValueError(
            f"divergence {divergence!r} has no fused chunked form (fused: {', '.join(FUSED_DIVERGENCES)}); "
            "pass impl='reference' to materialise the logits explicitly"
        )
    return chunked_linear_kd(e_s, student_weight, e_t, teacher_weight, chunk_size=chunk_size, **kw)
