"""Fused large-vocabulary KD loss front door: student/teacher hidden states and heads in,
the divergence between their token distributions out, without the (N, V) logit matrices.
"""

from __future__ import annotations

import torch

__all__ = ["linear_kd_loss"]


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
    impl: str = "auto",
    **hparams: float,
) -> torch.Tensor:
    """(1 - h) T^2 D(p_t || p_s) + h CE, mean over tokens whose target is not ignore_index.

    student_hidden (..., D_s) @ student_weight (V, D_s)^T gives the student logits, likewise
    the teacher's with (..., D_t), (V, D_t); targets (...) int or None. ``divergence`` is a
    ``core.losses`` divergence name that decomposes per token (forward_kl, reverse_kl, js,
    total_variation, skew_kl, skew_reverse_kl, symmetric_kl, akl, bdkd, binary_kl,
    dual_head_binary_kl), with its hyperparameters as keywords. Gradients reach the student
    hidden states and weight only (offline KD). ``impl``: "auto"/"chunked" (no (N, V)
    logits; gradients computed during the forward) or "reference" (materialised, for tests).
    Chunking after Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary LMs", arXiv:2411.09009.
    """
    from kernels.kd.api import linear_kd  # lazy: kernels.kd imports core.losses

    return linear_kd(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        divergence=divergence,
        temperature=temperature,
        targets=targets,
        hard_weight=hard_weight,
        ignore_index=ignore_index,
        impl=impl,
        **hparams,
    )
