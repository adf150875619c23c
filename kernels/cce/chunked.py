"""Chunked pure-PyTorch Cut Cross-Entropy: the fast CPU path, on the shared chunking core.

Only the per-chunk maths lives here (``kernels.chunking`` owns the chunks, GEMMs, valid rows,
reduction and autograd): log-sum-exp and target logit of each row, and the logit gradient
(w_loss + w_lse) softmax - w_loss onehot, written in place over the chunk's logit buffer (with
a second buffer for the softcap's tanh); label smoothing and z-loss add terms to both. On a
vocabulary shard (``kernels.vocab_parallel``) each chunk's row statistics are combined over the
group by one all-gather before its gradient is formed. fp16/bf16 inputs: on a CPU with matrix
instructions for the dtype the core's native half path (GEMMs in the input dtype, this maths in
fp32 on SUB_ROWS-row sub-blocks; every option but vocabulary sharding), elsewhere upcast once to
fp32 (``kernels.chunking.half_path``); losses come back in fp32, gradients in the input dtype.
``filter_eps`` is not used here: on CPU the dense GEMMs cost the same whether or not a tile
could be skipped.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import torch

from kernels.chunking import ChunkLoss, fused_linear_loss, row_indices
from kernels.vocab_parallel import VocabShard

# Native half path: a target probability below this takes the exact LSE (log p_t loses
# relative precision in fp32's subnormal range, and is -inf once p_t underflows).
TINY_P = 1e-30


def row_loss(lse, z_target, z_sum, label_smoothing: float, z_loss: float, v: int):
    """Per-row CE from its statistics (k,): lse - z_target, with label smoothing
    (torch.nn.functional.cross_entropy's: (1 - eps) CE + eps (lse - z_sum / V)) and PaLM's
    z-loss z_loss * lse^2 (Chowdhery et al. 2022, arXiv:2204.02311) added."""
    loss = lse - z_target
    if label_smoothing:
        loss = loss.mul_(1.0 - label_smoothing).add_(lse - z_sum / v, alpha=label_smoothing)
    if z_loss:
        loss = loss.addcmul_(lse, lse, value=z_loss)
    return loss


def combine_rows(vocab: VocabShard, lse, z_target, z_sum):
    """Global (lse, target logit, logit sum) (k,) from this shard's: one all-gather."""
    parts = [lse, z_target] + ([] if z_sum is None else [z_sum])
    every = vocab.all_gather(torch.stack(parts))  # (W, 2 or 3, k)
    z_sum = None if z_sum is None else every[:, 2].sum(0)
    return every[:, 0].logsumexp(0), every[:, 1].sum(0), z_sum


class CrossEntropyChunk(ChunkLoss):
    """loss_i = LSE_j(z_ij) - z_{i, t_i} (and LSE_i with ``return_lse``) of one chunk; z is
    first soft-capped to cap * tanh(z / cap) when ``softcap`` is set (Gemma 2); optional label
    smoothing and z-loss (``row_loss``). With ``vocab`` z holds this rank's vocabulary columns
    and the row statistics are combined over its group before the gradient."""

    def __init__(
        self,
        targets: torch.Tensor,
        softcap: float | None,
        return_lse: bool,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        vocab: VocabShard | None = None,
    ) -> None:
        self.targets, self.softcap, self.vocab = targets, softcap, vocab
        self.local = targets if vocab is None else vocab.local_targets(targets)
        self.smooth, self.z_loss = float(label_smoothing), float(z_loss)
        self.n_outputs = 2 if return_lse else 1
        self.n_buffers = 1 if softcap is None else 2

    def chunk(self, z, rows, w):
        k, v = z.shape
        tk, ar = self.local[rows], torch.arange(k, device=z.device)  # (k,), (k,)
        if self.softcap is not None:  # z <- cap * tanh(z / cap); keep tanh for the chain rule
            th = self.buffer(0, z)
            torch.div(z, self.softcap, out=th).tanh_()
            torch.mul(th, self.softcap, out=z)
        if self.vocab is None:
            z_target = z[ar, tk]  # (k,)
        else:  # the target's column lies on one rank; the others add 0
            mine = tk >= 0
            z_target = torch.where(mine, z[ar, tk.clamp_min(0)], 0.0)
        z_sum = z.sum(1) if self.smooth else None  # (k,)
        if self.native and self.vocab is None:  # z <- softmax(z) in place (see _softmax_lse)
            lse, m = self._softmax_lse(z, rows, z_target, ar, tk), None
        else:
            m = z.amax(1)  # (k,)
            z.sub_(m[:, None]).exp_()
            lse = z.sum(1).log_().add_(m)  # (k,)
        if self.vocab is not None:
            lse, z_target, z_sum = combine_rows(self.vocab, lse, z_target, z_sum)
        n_vocab = v if self.vocab is None else self.vocab.total
        loss = row_loss(lse, z_target, z_sum, self.smooth, self.z_loss, n_vocab)
        outs = (loss, lse)[: self.n_outputs]
        if w is None:
            return outs, None
        wl = w[0]
        coef = wl if len(w) == 1 or w[1] is None else wl + w[1]
        if self.z_loss:  # d (z_loss lse^2) = 2 z_loss lse softmax
            coef = coef + wl * (2.0 * self.z_loss) * lse
        # d obj / d z = coef softmax - w_loss ((1 - eps) onehot + eps / V); z holds exp(z - m)
        # (m this shard's max), softmax = exp(z - m) exp(m - lse), lse over the whole vocabulary;
        # on the native half path z already holds the softmax (m None)
        z.mul_((coef if m is None else coef * torch.exp(m - lse))[:, None])
        hit = -wl if not self.smooth else -wl * (1.0 - self.smooth)
        if self.vocab is None:
            z.index_put_((ar, tk), hit, accumulate=True)
        else:
            z.index_put_((ar[mine], tk[mine]), hit[mine], accumulate=True)
        if self.smooth:
            z.sub_((wl * (self.smooth / n_vocab))[:, None])
        if self.softcap is not None:  # d tanh: (1 - th^2)
            th.mul_(th)
            z.addcmul_(z, th, value=-1.0)
        return outs, z

    def _softmax_lse(self, z, rows, z_target, ar, tk) -> torch.Tensor:
        """Native half path (row-major fp32 sub-blocks): z <- softmax(z) by ATen's fused
        row-wise kernel, in place (it reads each element before writing it: exact, tested),
        faster than max / exp / sum as separate passes (kernels/README.md); returns LSE (k,) =
        z_target - log p_target. Rows whose target probability is below TINY_P (where its log
        would lose precision or be -inf) get their LSE from their logits recomputed by the
        core (``head_logits``), soft-capped as z was."""
        torch.softmax(z, 1, out=z)
        p_t = z[ar, tk]
        lse = z_target - torch.log(p_t)
        bad = p_t < TINY_P
        if bool(bad.any()):
            idx = bad.nonzero().squeeze(1)
            exact = self.head_logits(row_indices(rows, idx))
            if self.softcap is not None:
                exact = exact.div_(self.softcap).tanh_().mul_(self.softcap)
            lse[idx] = exact.logsumexp(1)
        return lse


def chunked_linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    return_lse: bool = False,
    chunk_size: int | None = None,
    memory_target: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    vocab: VocabShard | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused linear + cross-entropy on flat rows without the (N, V) logits.

    e (N, D), c (V, D), targets (N,) int64, bias (V,) -> loss: a scalar (mean over non-ignored
    rows / sum) or (N,) for "none", in fp32 (fp64 for fp64 inputs); with ``return_lse`` also
    the differentiable LSE (N,), 0 on ignored rows. ``chunk_size`` (rows per chunk) overrides
    ``memory_target`` (peak above the inputs as a multiple of the gradient buffers, default
    1.25), from which it is derived. ``label_smoothing`` / ``z_loss``: see ``row_loss``.
    ``vocab``: c and bias are this rank's vocabulary shard, targets global ids, e replicated.
    Wijmans et al. 2024, arXiv 2411.09009.
    """
    loss = CrossEntropyChunk(targets, softcap, return_lse, label_smoothing, z_loss, vocab)
    out = fused_linear_loss(
        e, c, bias, targets, loss, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, memory_target=memory_target,
    )  # fmt: skip
    return out if return_lse else out[0]
