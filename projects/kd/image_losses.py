"""The kd image loss rules: a params method -> its offline-KD loss, or the online pair's two losses.

A method is ``ce_weight * CE + sum of terms``; a term names a registered divergence
(``core.losses.DIVERGENCES``) with its weight, temperature, hyperparameters, warm-up and the head
it reads. Every divergence follows the T^2 convention of ``core/losses/divergences.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from core.losses import get_divergence


def resolve_terms(terms: Sequence[dict[str, Any]], temperature: float) -> list[dict[str, Any]]:
    """Each term with the default ``temperature`` and weight 1 filled in (a copy)."""
    return [{"temperature": temperature, "weight": 1.0, **t} for t in terms]


def resolve_offline(method: dict[str, Any], temperature: float) -> dict[str, Any]:
    """An ``image.offline`` method with every term resolved and ``aux_head`` set when a term
    reads the auxiliary head (Dual-Head KD)."""
    terms = resolve_terms(method.get("terms", []), temperature)
    aux = any(t.get("head", "main") == "aux" for t in terms)
    return {"ce_weight": method.get("ce_weight", 1.0), "aux_head": aux, "terms": terms}


def resolve_online(method: dict[str, Any], temperature: float) -> dict[str, Any]:
    """An ``image.online.methods`` entry with both sides' terms resolved."""
    return {
        side: resolve_terms(method.get(side, []), temperature) for side in ("student", "teacher")
    }


def divergence_term(
    term: dict[str, Any], student: Tensor, teacher: Tensor, targets: Tensor, progress: float
) -> Tensor:
    """``weight * warm * D(student, teacher)`` for one resolved term.

    Logits (N, C), targets (N,) (DKD reads them). ``warmup`` is a fraction of training over
    which the term ramps linearly from 0 (DKD's min(epoch / 20, 1) over 240 epochs is 1/12);
    ``progress`` in (0, 1] is the fraction of training steps done. Zhao et al. 2022 (DKD),
    arXiv:2203.08679, for the warm-up.
    """
    warmup = term.get("warmup", 0.0)
    warm = min(progress / warmup, 1.0) if warmup > 0 else 1.0
    value = get_divergence(term["divergence"])(
        student,
        teacher,
        temperature=term["temperature"],
        targets=targets,
        **term.get("hparams", {}),
    )
    return term["weight"] * warm * value


def offline_loss(
    method: dict[str, Any],
    logits: Tensor,
    aux_logits: Tensor | None,
    teacher_logits: Tensor | None,
    targets: Tensor,
    progress: float,
) -> Tensor:
    """``ce_weight * CE(main) + sum of terms`` (Hinton et al. 2015, arXiv:1503.02531); a term
    with ``head: aux`` reads the auxiliary head. logits, aux_logits, teacher_logits (N, C)
    (teacher constant); targets (N,)."""
    loss = method.get("ce_weight", 1.0) * F.cross_entropy(logits, targets)
    for term in method.get("terms", []):
        if teacher_logits is None:
            raise ValueError(f"term {term['divergence']} needs teacher logits")
        student = aux_logits if term.get("head", "main") == "aux" else logits
        if student is None:
            raise ValueError(f"term {term['divergence']} reads the aux head: set aux_head: true")
        loss = loss + divergence_term(term, student, teacher_logits, targets, progress)
    return loss


def online_losses(
    method: dict[str, Any], s: Tensor, t: Tensor, targets: Tensor, progress: float
) -> tuple[Tensor, Tensor]:
    """(student loss, teacher loss) of one online-KD step, each network learning from the other.

    Student: CE(s) + D_s(s, t.detach()); teacher: CE(t) + D_t(s.detach(), t); s, t (N, C).
    Divergences keep the registry's (student, teacher) order, so ``reverse_kl`` as the teacher's
    term is KL(p_s || p_t) with gradient to the teacher: DML's peer loss (Zhang et al. 2018,
    arXiv:1706.00384). Because each loss sees the other network detached, one backward of the
    sum gives each network exactly its own loss's gradient.
    """
    loss_s = F.cross_entropy(s, targets)
    loss_t = F.cross_entropy(t, targets)
    for term in method["student"]:
        loss_s = loss_s + divergence_term(term, s, t.detach(), targets, progress)
    for term in method["teacher"]:
        loss_t = loss_t + divergence_term(term, s.detach(), t, targets, progress)
    return loss_s, loss_t
