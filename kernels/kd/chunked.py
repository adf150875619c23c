"""Chunked pure-PyTorch fused linear KD loss: the CPU path, no (N, V) logits.

Per-chunk maths on the shared chunking core (``kernels.chunking`` owns the chunks, the student
GEMMs, valid rows, reduction and autograd): the teacher's chunk logits by the same GEMM, the
hard-label CE, and the divergence of the scaled logits with its gradient w.r.t. the student
logits. The divergence comes in from its definition as a ``FusedDivergence`` (kernels import no
core): its per-row maths, differentiated by autograd over the chunk (Liger's chunked-loss
pattern), or its hand-written in-place closed form where it has one (fewer (chunk, V) buffers,
so longer GEMMs at equal memory). Cost 8 N V D flops (two forward GEMMs, two gradient GEMMs);
the teacher receives no gradient. fp16/bf16 inputs on CPU take the core's native half path
where the CPU has matrix instructions for them (``kernels.chunking.half_path``): both heads'
chunk logits in the input dtype, the divergence on SUB_ROWS-row fp32 copies of them; otherwise
the teacher is upcast to fp32 with the student, one sweep at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.chunking import ChunkLoss, acc_dtype, fused_linear_loss, row_indices
from kernels.vocab_parallel import VocabShard, active, using

# (chunk, V) buffers alive at the peak when autograd differentiates a divergence's per-row
# maths and the divergence declares none: the two logit chunks, the saved intermediates and
# their gradients. Measured 5.7 (TV) to 12.3 (binary KL) over this repository's divergences.
AUTOGRAD_BUFFERS = 13


@dataclass(frozen=True)
class FusedDivergence:
    """A per-row divergence as the fused KD loss runs it, built by the caller from its
    definition. ``per_row(s, t[, targets=...]) -> (k,)``: the divergence of scaled logits s, t
    (k, V) without T^2, differentiable in s. ``closed_form(s, t) -> (values (k,), d sum(values)
    / d s (k, V))``, optional, may overwrite s and t; ``buffers``: its (k, V) buffers at the
    peak, both logit chunks included."""

    per_row: Callable[..., torch.Tensor]
    closed_form: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    buffers: int | None = None
    needs_targets: bool = False

    @property
    def n_buffers(self) -> int:
        return AUTOGRAD_BUFFERS if self.buffers is None else self.buffers

    def __call__(
        self, s, t, want_grad: bool, exact: bool = False, **kw
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values (k,), d sum(values) / d s (k, V) or None) of one chunk; ``exact``: through
        the per-row maths even where a closed form exists."""
        if self.closed_form is not None and not exact:
            return self.closed_form(s, t)
        if not want_grad:
            return self.per_row(s, t, **kw), None
        s = s.detach().requires_grad_()
        shard = active()  # replicated values on a shard: their all-reduces' backward sums W
        seed = 1.0 if shard is None else 1.0 / shard.world  # ranks' seeds (kernels.vocab_parallel)
        with torch.enable_grad():
            values = self.per_row(s, t, **kw)
            (g,) = torch.autograd.grad(values, s, torch.full_like(values, seed))
        return values.detach(), g


class DistillationChunk(ChunkLoss):
    """(1 - h) T^2 D(p_t || p_s) + h CE(z_s, y) per row of a chunk; the chunk's student logits
    z_s come from the core, the teacher's from ``e_t`` (N, D_t) @ ``w_t`` (V, D_t)^T. With
    ``vocab`` both heads hold this rank's vocabulary rows: the divergence runs inside
    ``kernels.vocab_parallel.using(vocab)``, its row reductions combined over the group."""

    transposed = False  # row-major (k, V) chunks: the closed forms reduce along rows
    n_half_buffers = 2  # native half path: the student's and the teacher's chunk logits

    def __init__(
        self, e_t, w_t, targets, divergence: FusedDivergence, temperature, hard_weight,
        vocab: VocabShard | None = None, acc: torch.dtype | None = None,
    ):  # fmt: skip
        self.e_t, self.w_t, self.targets, self.div = e_t, w_t, targets, divergence
        self.temperature, self.hard_weight, self.vocab = temperature, hard_weight, vocab
        self.n_buffers = divergence.n_buffers + (1 if hard_weight > 0 else 0)
        self.acc = acc  # the student's accumulation dtype (default the teacher's)

    def chunk(self, s, rows, w):
        with using(self.vocab):
            return self._chunk(s, rows, w)

    def _chunk(self, s, rows, w):
        k, h, temp = s.shape[0], self.hard_weight, self.temperature
        t = self.teacher_logits(rows, reuse=True)  # (k, V)
        loss = s.new_zeros(k)
        if h > 0:
            tk, ar = self.targets[rows], torch.arange(k, device=s.device)
            lse = s.logsumexp(-1)  # (k,)
            if self.vocab is None:
                loss.add_(lse - s[ar, tk], alpha=h)
            else:  # this shard's LSE and target logit (0 where the target is elsewhere)
                tk = self.vocab.local_targets(tk)
                s_target = torch.where(tk >= 0, s[ar, tk.clamp_min(0)], 0.0)
                lse = self.vocab.logsumexp(lse)
                loss.add_(lse - self.vocab.sum(s_target), alpha=h)
            if w is not None:  # softmax(z_s), for the CE gradient
                soft = torch.sub(s, lse[:, None], out=self.buffer(1, s)).exp_()
        if temp != 1.0:
            s.div_(temp)
            t.div_(temp)
        kw = {"targets": self.targets[rows]} if self.div.needs_targets else {}
        d, g = self.div(s, t, w is not None, **kw)
        bad = ~torch.isfinite(d)  # a closed form met -inf (masked) logits: these rows exactly
        if self.vocab is not None:  # the same rows on every rank, so the collectives pair up
            bad = self.vocab.all_reduce_(bad.to(d.dtype), "max") > 0
        if bool(bad.any()):
            self._exact_rows(rows, bad, d, g, w is not None)
        loss.add_(d, alpha=(1.0 - h) * temp**2)  # T^2 convention
        if w is None:
            return (loss,), None
        wl = w[0]
        g.mul_((wl * ((1.0 - h) * temp))[:, None])  # d/dz_s = T^2 / T d/ds
        if h > 0:
            g.addcmul_(soft, (h * wl)[:, None])
            hit = tk >= 0  # all rows single-process; on a shard, the rows whose target is here
            g.index_put_((ar[hit], tk[hit]), -h * wl[hit], accumulate=True)
        return (loss,), g

    def teacher(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_t, w_t) as the GEMMs take them: as given on the native half path, else in the
        accumulation dtype (upcast once per sweep, dropped by ``release``)."""
        if self.native:
            return self.e_t, self.w_t
        if "_teacher" not in self.__dict__:
            acc = self.acc or acc_dtype(self.e_t.dtype)
            self.__dict__["_teacher"] = (self.e_t.to(acc), self.w_t.to(acc))
        return self.__dict__["_teacher"]

    def begin_chunk(self, rows) -> None:
        """Native half path: the teacher's chunk logits in the input dtype, buffer 0."""
        e_t, w_t = self.teacher()
        e_t = e_t[rows] if isinstance(rows, slice) else e_t.index_select(0, rows)
        self.__dict__["_chunk_t"] = self.logits(0, e_t, w_t)

    def teacher_logits(self, rows, reuse: bool) -> torch.Tensor:
        """The teacher's (k, V) logits of ``rows`` in the accumulation dtype; ``reuse``: in a
        persistent buffer (native half path: an fp32 copy of the chunk's current sub-block)."""
        if reuse and self.native:
            return self.upcast(3, self.__dict__["_chunk_t"][self.sub_block])
        e_t, w_t = self.teacher()
        e_t = e_t[rows] if isinstance(rows, slice) else e_t.index_select(0, rows)
        if reuse:
            return self.logits(0, e_t, w_t)
        return (e_t @ w_t.T).to(self.acc or acc_dtype(e_t.dtype))

    def _exact_rows(self, rows, bad, d, g, want_grad):
        """Recompute the rows flagged ``bad`` through the divergence's per-row maths (the
        closed forms overwrote their logits), in place of d (k,) and g (k, V)."""
        idx = bad.nonzero().squeeze(1)
        sub = row_indices(rows, idx)
        s = self.head_logits(sub).div_(self.temperature)
        t = self.teacher_logits(sub, reuse=False).div_(self.temperature)
        kw = {"targets": self.targets.index_select(0, sub)} if self.div.needs_targets else {}
        d_sub, g_sub = self.div(s, t, want_grad, exact=True, **kw)
        d[idx] = d_sub
        if want_grad:  # a closed form returns a gradient even when none is wanted
            g[idx] = g_sub


def chunked_linear_kd(
    e_s: torch.Tensor,
    w_s: torch.Tensor,
    e_t: torch.Tensor,
    w_t: torch.Tensor,
    targets: torch.Tensor | None,
    divergence: FusedDivergence,
    *,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    memory_target: float | None = None,
    vocab: VocabShard | None = None,
) -> torch.Tensor:
    """Fused (1 - h) T^2 D(p_t || p_s) + h CE without the (N, V) logits, on validated inputs.

    e_s (N, D_s), w_s (V, D_s), e_t (N, D_t), w_t (V, D_t), targets (N,) int64 or None (every
    row counts). Returns a scalar (mean over non-ignored rows, or sum) or (N,) for "none", in
    fp32 (fp64 for fp64 inputs); gradients reach e_s and w_s only, in their dtypes. ``vocab``:
    w_s and w_t hold this rank's vocabulary rows, targets are global ids, e_s and e_t are
    replicated; every rank gets the global loss and the full gradient of e_s.
    """
    loss = DistillationChunk(
        e_t, w_t, targets, divergence, float(temperature), float(hard_weight), vocab,
        acc=acc_dtype(e_s.dtype),
    )  # fmt: skip
    (out,) = fused_linear_loss(
        e_s, w_s, None, targets, loss, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, memory_target=memory_target,
    )  # fmt: skip
    return out
