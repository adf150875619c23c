"""Dispatch of the fused linear KD loss on validated inputs: flatten, pick the path, shape.

``impl="auto"`` picks the chunked path (on CPU and, lacking a Triton KD kernel, on CUDA too)
and never silently materialises the logits; ``"reference"`` materialises them on request.
"""

from __future__ import annotations

import torch

from kernels.kd.chunked import FusedDivergence, chunked_linear_kd
from kernels.kd.reference import reference_linear_kd
from kernels.vocab_parallel import VocabShard

IMPLS = ("auto", "chunked", "reference")


def linear_kd_impl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    targets: torch.Tensor | None,
    divergence: FusedDivergence,
    *,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: int | None = None,
    memory_target: float | None = None,
    vocab: VocabShard | None = None,
) -> torch.Tensor:
    """Fused (1 - h) T^2 D(p_t || p_s) + h CE: hidden states (..., D) flattened to rows.

    Returns a scalar ("mean" over non-ignored rows / "sum") or the per-row losses shaped like
    the leading dims ("none"), in fp32 (fp64 for fp64 inputs). ``vocab``: both heads hold this
    rank's vocabulary rows (chunked path; see ``chunked_linear_kd``).
    """
    lead = student_hidden.shape[:-1]
    e_s = student_hidden.reshape(lead.numel(), student_hidden.shape[-1])  # (N, D_s)
    e_t = teacher_hidden.reshape(lead.numel(), teacher_hidden.shape[-1])  # (N, D_t)
    tg = None if targets is None else targets.reshape(-1).to(torch.int64)
    kw = dict(
        temperature=temperature, hard_weight=hard_weight, ignore_index=ignore_index,
        reduction=reduction,
    )  # fmt: skip
    if impl == "reference":
        if vocab is not None:
            raise ValueError(
                "impl='reference' is single-process; a vocabulary shard needs 'chunked' or 'auto'"
            )
        loss = reference_linear_kd(e_s, student_weight, e_t, teacher_weight, tg, divergence, **kw)
    elif impl in ("auto", "chunked"):
        loss = chunked_linear_kd(
            e_s, student_weight, e_t, teacher_weight, tg, divergence, chunk_size=chunk_size,
            memory_target=memory_target, vocab=vocab, **kw,
        )  # fmt: skip
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return loss.view(lead) if reduction == "none" else loss
