"""Fused large-vocabulary KD loss front door: student/teacher hidden states and heads in, the
divergence between their token distributions out, without the (N, V) logit matrices.

Validation happens here, once, as in ``linear_cross_entropy``; the divergence reaches the kernel
as a ``FusedDivergence`` built from its definition in ``core.losses.divergences``, whose own
checks vet the hyperparameters (the fused and unfused paths accept and refuse the same values).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import TYPE_CHECKING

import torch

from core.losses._registry import DIVERGENCES, get_divergence
from core.losses.linear_ce import check_target_range, local_heads, vocab_split
from core.registry import RegistryError

if TYPE_CHECKING:
    from kernels.kd import FusedDivergence

# kernels imported where the fused loss is called (see core.losses.linear_ce)

__all__ = ["fused_divergence", "fused_divergence_names", "linear_kd_loss"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_divergence_names() -> list[str]:
    """The registered divergences ``linear_kd_loss`` runs: every per-row one (not sinkhorn)."""
    return [name for name, f in DIVERGENCES.items() if getattr(f, "rows", None) is not None]


def fused_divergence(name: str, **hparams: float) -> FusedDivergence:
    """The registered per-row divergence ``name`` with its hyperparameters, as the fused loss
    runs it: its per-row maths (differentiated by autograd per chunk) and its closed form if it
    has one. The definition itself checks the hyperparameters (a 1 x 2 probe call)."""
    try:
        div = get_divergence(name)
    except RegistryError as err:
        raise ValueError(f"divergence: {err}") from None
    rows = getattr(div, "rows", None)
    if rows is None:
        raise ValueError(f"divergence {name!r} is not per row (batch-wise): it has no fused form")
    probe = torch.zeros(1, 2, dtype=torch.float64)
    kw = {"targets": torch.zeros(1, dtype=torch.int64)} if div.needs_targets else {}
    rows(probe, probe, **kw, **hparams)  # raises on a bad or unknown hyperparameter
    closed = div.closed_form
    from kernels.kd import FusedDivergence

    return FusedDivergence(
        per_row=functools.partial(rows, **hparams),
        closed_form=functools.partial(closed, **hparams) if closed is not None else None,
        buffers=div.closed_form_buffers,
        needs_targets=div.needs_targets,
    )


def _validate(e_s, w_s, e_t, w_t, targets, temperature, hard_weight, needs_targets) -> None:
    named = (
        ("student_hidden", e_s), ("student_weight", w_s), ("teacher_hidden", e_t),
        ("teacher_weight", w_t), ("targets", targets),
    )  # fmt: skip
    for name, x in named:
        if not (isinstance(x, torch.Tensor) or (name == "targets" and x is None)):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x in named[:4]:
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float tensor, got dtype {x.dtype}")
        if x.ndim < (2 if "weight" in name else 1):
            raise ValueError(f"{name} has too few dimensions: {tuple(x.shape)}")
    if w_s.dtype != e_s.dtype:
        raise ValueError(
            f"student_weight dtype {w_s.dtype} must match student_hidden's {e_s.dtype}"
        )
    for name, w, e in (("student_weight", w_s, e_s), ("teacher_weight", w_t, e_t)):
        if w.ndim != 2 or w.shape[1] != e.shape[-1]:
            raise ValueError(f"{name} must be (V, D={e.shape[-1]}), got {tuple(w.shape)}")
    if e_s.shape[:-1] != e_t.shape[:-1]:
        raise ValueError(
            f"student and teacher token counts differ: {tuple(e_s.shape[:-1])} vs "
            f"{tuple(e_t.shape[:-1])}"
        )
    if w_s.shape[0] != w_t.shape[0] or w_s.shape[0] < 1:
        raise ValueError(
            f"student and teacher vocabularies differ or are empty: {w_s.shape[0]} vs "
            f"{w_t.shape[0]}"
        )
    devices = {name: str(x.device) for name, x in named if x is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    for name, value, ok, allowed in (
        ("temperature", temperature, lambda x: 0 < x < math.inf, "a finite number > 0"),
        ("hard_weight", hard_weight, lambda x: 0 <= x <= 1, "a number in [0, 1]"),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be {allowed}, got {value!r}")
        if not ok(value):
            raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if targets is None:
        if hard_weight > 0 or needs_targets:
            raise ValueError("hard_weight > 0 (and DKD) needs targets for the cross-entropy term")
        return
    if targets.shape != e_s.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must match the hidden states' leading dims "
            f"{tuple(e_s.shape[:-1])}"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}")


def linear_kd_loss(
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
    memory_target: float | None = None,
    process_group=None,
    **hparams: float,
) -> torch.Tensor:
    """(1 - h) T^2 D(p_t || p_s) + h CE per token, without the (N, V) logits.

    student_hidden (..., D_s) @ student_weight (V, D_s)^T gives the student logits, likewise
    the teacher's with (..., D_t), (V, D_t); targets (...) int or None. ``divergence``: any
    per-row divergence of ``core.losses`` (forward_kl, reverse_kl, js, skew_kl, akl, dkd, ...),
    its hyperparameters as keywords, checked by its definition. Returns, in fp32 (fp64 for
    fp64 inputs), the mean over tokens whose target is not ``ignore_index`` (or over all tokens
    without targets), the sum, or per-token values shaped like the leading dims ("none", 0 on
    ignored tokens). Gradients reach the student hidden states and weight only (offline KD).
    ``impl``: "auto"/"chunked" (no (N, V) logits) or "reference" (materialised, for tests);
    ``memory_target``: the chunked path's peak above the inputs as a multiple of the gradient
    buffers (default 1.25), as in ``linear_cross_entropy``. ``process_group`` (or DTensor heads
    sharded on dim 0 on a 1-D mesh): vocabulary parallelism as in ``linear_cross_entropy``:
    student_weight and teacher_weight hold the same contiguous vocabulary rows on each rank,
    hidden states and targets (global ids) are replicated; every rank gets the global loss, its
    shard's gradient for student_weight and the full (all-reduced) gradient for student_hidden.
    Every fused divergence runs on shards; AKL's head (the teacher's top classes up to mass mu)
    is merged from each rank's top-k candidates, so all ranks find the same global head.
    Chunking after Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary LMs", arXiv:2411.09009.
    """
    from kernels.chunking import check_options
    from kernels.kd import IMPLS, linear_kd_impl

    check_options(
        reduction=reduction, ignore_index=ignore_index, memory_target=memory_target, impl=impl,
        impls=IMPLS,
    )  # fmt: skip
    fused = fused_divergence(divergence, **hparams)
    group, local = local_heads(
        process_group,
        {"student_hidden": student_hidden, "teacher_hidden": teacher_hidden},
        {"student_weight": student_weight, "teacher_weight": teacher_weight},
    )
    e_s, e_t = local["student_hidden"], local["teacher_hidden"]
    w_s, w_t = local["student_weight"], local["teacher_weight"]
    _validate(e_s, w_s, e_t, w_t, targets, temperature, hard_weight, fused.needs_targets)
    vocab = vocab_split(group, w_s)
    if targets is not None:
        check_target_range(targets, w_s.shape[0] if vocab is None else vocab.total, ignore_index)
    return linear_kd_impl(
        e_s, w_s, e_t, w_t, targets, fused, temperature=float(temperature),
        hard_weight=float(hard_weight), ignore_index=ignore_index, reduction=reduction, impl=impl,
        memory_target=memory_target, vocab=vocab,
    )  # fmt: skip
