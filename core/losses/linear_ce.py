"""Front door of the fused linear cross-entropy (Cut Cross-Entropy): validation + dispatch.

loss_i = LSE_j(e_i . c_j + b_j) - (e_i . c_{t_i} + b_{t_i}) without the (N, V) logits.
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import torch
from torch import nn

from core.losses._registry import LOSSES
from kernels.cce.api import IMPLS, linear_cross_entropy_impl

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _validate(
    e, c, targets, bias, ignore_index, softcap, reduction, shift, filter_eps, impl, memory_target
):
    if memory_target is not None and not (
        isinstance(memory_target, float | int) and 1.0 < memory_target < float("inf")
    ):
        raise ValueError(
            f"memory_target must be None or a finite number > 1 (x the gradient buffers), "
            f"got {memory_target!r}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if c.ndim != 2 or e.ndim < 1:
        raise ValueError(
            f"expected e (..., D) and c (V, D), got e {tuple(e.shape)}, c {tuple(c.shape)}"
        )
    if e.shape[-1] != c.shape[1]:
        raise ValueError(
            f"hidden size mismatch: e {tuple(e.shape)} has D={e.shape[-1]}, "
            f"c {tuple(c.shape)} has D={c.shape[1]}"
        )
    if tuple(e.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets {tuple(targets.shape)} must match e's leading dims {tuple(e.shape[:-1])}"
        )
    if shift and targets.ndim < 1:
        raise ValueError("shift=True needs targets with a time dimension (..., T)")
    if e.dtype not in FLOAT_DTYPES or c.dtype != e.dtype:
        raise ValueError(f"e and c must share a float dtype, got e {e.dtype}, c {c.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer class ids, got dtype {targets.dtype}")
    tensors = {"e": e, "c": c, "targets": targets}
    if bias is not None:
        if bias.shape != (c.shape[0],):
            raise ValueError(f"bias {tuple(bias.shape)} must have shape (V,) = ({c.shape[0]},)")
        if bias.dtype != e.dtype:
            raise ValueError(f"bias dtype {bias.dtype} must match e/c dtype {e.dtype}")
        tensors["bias"] = bias
    devices = {k: str(t.device) for k, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    if not (filter_eps in (None, "auto", "high") or isinstance(filter_eps, float | int)):
        raise ValueError(f"filter_eps must be None, 'auto', 'high' or a float, got {filter_eps!r}")
    v = c.shape[0]
    bad = ((targets < 0) | (targets >= v)) & (targets != ignore_index)
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"targets must lie in [0, {v}) or equal ignore_index={ignore_index}; found {value}"
        )


@LOSSES.register("linear_cross_entropy")
def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool = False,
    filter_eps: float | str | None = "auto",
    return_lse: bool = False,
    impl: str = "auto",
    memory_target: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``e @ c.T + bias`` against ``targets`` without materialising the logits.

    e (..., D) hidden states, c (V, D) classifier, targets (...) ids (``ignore_index`` skipped),
    bias (V,). Returns the loss: a scalar for "mean" (over non-ignored tokens) / "sum", shaped
    like targets for "none" ((..., T - 1) with ``shift``); with ``return_lse`` also the
    differentiable per-token LSE (0 on ignored tokens; for z-loss). fp16/bf16 inputs accumulate
    in fp32. ``softcap``: cap * tanh(x / cap) (Gemma 2); ``shift``: e[..., :-1, :] predicts
    targets[..., 1:]; ``filter_eps``: the Triton backward's gradient-filter threshold (ignored
    on CPU). ``impl``: "auto" (CUDA -> Triton, CPU -> chunked), "chunked", "triton",
    "reference" (materialised, tests only). ``memory_target`` (chunked path only): the peak
    memory above the inputs as a multiple of the gradient buffers ((N + V) x D), default 1.25;
    a larger value buys bigger token chunks, i.e. longer and faster GEMMs.
    Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
    """
    _validate(
        e,
        c,
        targets,
        bias,
        ignore_index,
        softcap,
        reduction,
        shift,
        filter_eps,
        impl,
        memory_target,
    )
    return linear_cross_entropy_impl(
        e,
        c,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        softcap=softcap,
        reduction=reduction,
        shift=shift,
        filter_eps=filter_eps,
        return_lse=return_lse,
        impl=impl,
        memory_target=memory_target,
    )


class LinearCrossEntropy(nn.Module):
    """Module wrapper of :func:`linear_cross_entropy` holding its options; forward(e, c, targets).

    Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        softcap: float | None = None,
        reduction: str = "mean",
        shift: bool = False,
        filter_eps: float | str | None = "auto",
        return_lse: bool = False,
        impl: str = "auto",
        memory_target: float | None = None,
    ) -> None:
        super().__init__()
        self.options = dict(
            ignore_index=ignore_index,
            softcap=softcap,
            reduction=reduction,
            shift=shift,
            filter_eps=filter_eps,
            return_lse=return_lse,
            impl=impl,
            memory_target=memory_target,
        )

    def forward(
        self,
        e: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """e (..., D), c (V, D), targets (...), bias (V,) -> loss (and LSE with return_lse)."""
        return linear_cross_entropy(e, c, targets, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
