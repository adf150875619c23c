"""Chunked pure-PyTorch Cut Cross-Entropy: the fast CPU path, on the shared chunking core.

Only the per-chunk maths lives here (``kernels.chunking`` owns the chunks, GEMMs, valid rows,
reduction and autograd): log-sum-exp and target logit of each row, and the logit gradient
(w_loss + w_lse) softmax - w_loss onehot, written in place over the chunk's logit buffer (with
a second buffer for the softcap's tanh). fp16/bf16 inputs are upcast once to fp32 (CPU half GEMMs
are slow and accumulate less exactly); losses come back in fp32, gradients in the input dtype.
``filter_eps`` is not used here: on CPU the dense GEMMs cost the same whether or not a tile
could be skipped.

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import torch

from kernels.chunking import ChunkLoss, fused_linear_loss


class CrossEntropyChunk(ChunkLoss):
    """loss_i = LSE_j(z_ij) - z_{i, t_i} (and LSE_i with ``return_lse``) of one chunk; z is
    first soft-capped to cap * tanh(z / cap) when ``softcap`` is set (Gemma 2)."""

    def __init__(self, targets: torch.Tensor, softcap: float | None, return_lse: bool) -> None:
        self.targets, self.softcap = targets, softcap
        self.n_outputs = 2 if return_lse else 1
        self.n_buffers = 1 if softcap is None else 2

    def chunk(self, z, rows, w):
        k = z.shape[0]
        tk, ar = self.targets[rows], torch.arange(k, device=z.device)  # (k,), (k,)
        if self.softcap is not None:  # z <- cap * tanh(z / cap); keep tanh for the chain rule
            th = self.buffer(0, z)
            torch.div(z, self.softcap, out=th).tanh_()
            torch.mul(th, self.softcap, out=z)
        z_target = z[ar, tk]  # (k,)
        m = z.amax(1)  # (k,)
        z.sub_(m[:, None]).exp_()
        lse = z.sum(1).log_().add_(m)  # (k,)
        outs = (lse - z_target, lse)[: self.n_outputs]
        if w is None:
            return outs, None
        wl = w[0]
        coef = wl if len(w) == 1 or w[1] is None else wl + w[1]
        # d obj / d z = (w_loss + w_lse) softmax - w_loss onehot; exp(z - m) / sum = exp(z - m - lse)
        z.mul_((coef * torch.exp(m - lse))[:, None])
        z.index_put_((ar, tk), -wl, accumulate=True)
        if self.softcap is not None:  # d tanh: (1 - th^2)
            th.mul_(th)
            z.addcmul_(z, th, value=-1.0)
        return outs, z


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused linear + cross-entropy on flat rows without the (N, V) logits.

    e (N, D), c (V, D), targets (N,) int64, bias (V,) -> loss: a scalar (mean over non-ignored
    rows / sum) or (N,) for "none", in fp32 (fp64 for fp64 inputs); with ``return_lse`` also
    the differentiable LSE (N,), 0 on ignored rows. ``chunk_size`` (rows per chunk) overrides
    ``memory_target`` (peak above the inputs as a multiple of the gradient buffers, default
    1.25), from which it is derived. Wijmans et al. 2024, arXiv 2411.09009.
    """
    loss = CrossEntropyChunk(targets, softcap, return_lse)
    out = fused_linear_loss(
        e, c, bias, targets, loss, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, memory_target=memory_target,
    )  # fmt: skip
    return out if return_lse else out[0]
