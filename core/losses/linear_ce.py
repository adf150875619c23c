"""Front door of the fused linear cross-entropy (Cut Cross-Entropy): validation + dispatch.

loss_i = LSE_j(e_i . c_j + b_j) - (e_i . c_{t_i} + b_{t_i}) without the (N, V) logits, with
optional label smoothing, z-loss and vocabulary parallelism (the head split by rows over a
process group, as in Megatron-LM's vocab-parallel cross-entropy, arXiv:1909.08053).
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from core.losses._registry import LOSSES

if TYPE_CHECKING:
    from kernels.vocab_parallel import VocabShard

# The kernels are imported where a fused loss is called, not with core.losses: a run that never
# calls one does not load their code, so its run identity (core.engine.identity) and results
# stay valid when only the kernels change.

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _real(name: str, value, allowed: str, ok) -> None:
    """A real number (not a bool) for which ``ok(value)`` holds, else TypeError/ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {allowed}, got {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _validate(
    e, c, targets, bias, ignore_index, softcap, reduction, shift, filter_eps, return_lse, impl,
    memory_target, label_smoothing, z_loss,
) -> None:  # fmt: skip
    from kernels.cce.api import IMPLS
    from kernels.chunking import check_options

    check_options(
        reduction=reduction, ignore_index=ignore_index, memory_target=memory_target, impl=impl,
        impls=IMPLS,
    )  # fmt: skip
    for name, x in (("e", e), ("c", c), ("targets", targets), ("bias", bias)):
        if not (isinstance(x, torch.Tensor) or (name == "bias" and x is None)):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if c.ndim != 2 or e.ndim < 1:
        raise ValueError(
            f"expected e (..., D) and c (V, D), got e {tuple(e.shape)}, c {tuple(c.shape)}"
        )
    if c.shape[0] == 0:
        raise ValueError(f"c (V, D) needs V >= 1 classes, got {tuple(c.shape)}")
    if e.shape[-1] != c.shape[1]:
        raise ValueError(
            f"hidden size mismatch: e {tuple(e.shape)} has D={e.shape[-1]}, "
            f"c {tuple(c.shape)} has D={c.shape[1]}"
        )
    if tuple(e.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"targets {tuple(targets.shape)} must match e's leading dims {tuple(e.shape[:-1])}"
        )
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
    if not isinstance(shift, bool | numbers.Integral) or shift < 0:
        raise TypeError(f"shift must be a bool or an int >= 0, got {shift!r}")
    if shift and (targets.ndim < 1 or shift >= targets.shape[-1]):
        time = targets.shape[-1] if targets.ndim else 0
        raise ValueError(
            f"shift must lie in [0, T) = [0, {time}) (targets' last dim), got {shift!r}"
        )
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if softcap is not None:
        _real("softcap", softcap, "None or a finite number > 0", lambda x: 0 < x < math.inf)
    _real("label_smoothing", label_smoothing, "a number in [0, 1]", lambda x: 0 <= x <= 1)
    _real("z_loss", z_loss, "a finite number >= 0", lambda x: 0 <= x < math.inf)
    if filter_eps not in (None, "auto", "high"):
        _real(
            "filter_eps",
            filter_eps,
            "None, 'auto', 'high' or a number in [0, 1)",
            lambda x: 0 <= x < 1,
        )


def check_target_range(targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Class ids in [0, n_classes) or ignore_index, else a ValueError naming the first bad one."""
    t = targets.to(torch.int64)  # uint8 ids would wrap a negative ignore_index
    bad = ((t < 0) | (t >= n_classes)) & (t != ignore_index)
    if bool(bad.any()):
        raise ValueError(
            f"targets must lie in [0, {n_classes}) or equal ignore_index={ignore_index}; "
            f"found {int(t[bad][0])}"
        )


def _dtensor_local(x, name: str, shard: bool):
    """(local tensor, its mesh's group or None) of a DTensor sharded on dim 0 (``shard``) or
    replicated, on a 1-D mesh; a plain tensor (or None) comes back as it is."""
    if not dist.is_available():
        return x, None
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(x, DTensor):
        return x, None
    want = Shard(0) if shard else Replicate()
    if x.device_mesh.ndim != 1 or tuple(x.placements) != (want,):
        kind = "sharded on dim 0 (Shard(0))" if shard else "replicated (Replicate())"
        raise ValueError(
            f"{name} as a DTensor must be {kind} on a 1-D device mesh, got placements "
            f"{tuple(x.placements)} on a {x.device_mesh.ndim}-D mesh"
        )
    return x.to_local(), x.device_mesh.get_group(0)


def local_heads(process_group, dense: dict, sharded: dict) -> tuple[object, dict]:
    """(the process group of a vocabulary-parallel loss or None, every tensor local).

    ``sharded``: name -> this rank's vocabulary rows (V_r, ...) (a DTensor sharded on dim 0
    gives its local rows and its mesh's group); ``dense``: name -> a replicated tensor (a
    replicated DTensor gives its local copy). A group from ``process_group`` and from DTensors
    must agree.
    """
    groups, out = {}, {}
    for names, shard in ((dense, False), (sharded, True)):
        for name, x in names.items():
            out[name], g = _dtensor_local(x, name, shard)
            if g is not None:
                groups[name] = g
    if process_group is not None:
        if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(
                f"process_group must be a torch.distributed ProcessGroup or None, got "
                f"{type(process_group).__name__}"
            )
        groups["process_group"] = process_group
    if len({tuple(dist.get_process_group_ranks(g)) for g in groups.values()}) > 1:
        raise ValueError(f"the process groups of {sorted(groups)} differ")
    return next(iter(groups.values()), None), out


def vocab_split(group, head: torch.Tensor) -> VocabShard | None:
    """The vocabulary split over ``group`` (None: single process) from one all-gather of every
    rank's head rows; each shard must hold >= 1 row."""
    if group is None:
        return None
    from kernels.vocab_parallel import VocabShard

    vocab = VocabShard.gather(group, head.shape[0], head.device)
    if min(vocab.sizes) < 1:
        raise ValueError(f"every vocabulary shard needs >= 1 row, got shard sizes {vocab.sizes}")
    return vocab


@LOSSES.register(paper="Wijmans et al. 2024, arXiv:2411.09009")
def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    shift: bool | int = False,
    filter_eps: float | str | None = "auto",
    return_lse: bool = False,
    impl: str = "auto",
    memory_target: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    process_group=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``e @ c.T + bias`` against ``targets`` without materialising the logits.

    e (..., D) hidden states, c (V, D) classifier, targets (...) ids (``ignore_index`` skipped),
    bias (V,). Returns the loss in fp32 (fp64 for fp64 inputs; fp16/bf16 accumulate in fp32): a
    scalar for "mean" (over non-ignored tokens) / "sum", shaped like targets for "none"
    ((..., T - k) with ``shift`` k); with ``return_lse`` also the differentiable per-token LSE
    (0 on ignored tokens; for z-loss). ``softcap``: cap * tanh(x / cap) (Gemma 2); ``shift`` k
    (True = 1): e[..., :-k, :] predicts targets[..., k:]; ``filter_eps`` in [0, 1): the Triton
    backward's gradient-filter threshold (unused on the chunked path). ``impl``: "auto" (CUDA
    -> Triton, CPU or float64 -> chunked), "chunked", "triton", "reference" (materialised,
    tests only). ``memory_target`` (the chunked path's; refused with impl "triton" or
    "reference", unused when "auto" picks Triton): the peak memory above the inputs as a multiple
    of the gradient buffers ((N + V) x D), default 1.25; more buys bigger chunks, faster GEMMs.
    ``label_smoothing`` in [0, 1]: torch.nn.functional.cross_entropy's ((1 - eps) CE + eps
    (lse - mean_j z_j); ignored tokens excluded). ``z_loss`` >= 0: PaLM's z_loss * lse^2 added
    to each token's loss, gradient fused (Chowdhery et al. 2022, arXiv:2204.02311; not de
    Brebisson & Vincent's Z-loss). ``process_group`` (or a DTensor c sharded on dim 0 on a 1-D
    mesh, whose mesh gives the group): vocabulary parallelism. c and bias hold this rank's
    contiguous rows of the vocabulary (shards may differ in size; rank order), targets are
    global ids and e is replicated (same e and targets on every rank); every rank gets the
    global loss (and LSE), its own shard's gradient for c and bias, and the full gradient for e
    (all-reduced inside the autograd Function). Paths "chunked" and "triton".
    Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
    """
    group, local = local_heads(process_group, {"e": e}, {"c": c, "bias": bias})
    e, c, bias = local["e"], local["c"], local["bias"]
    _validate(
        e, c, targets, bias, ignore_index, softcap, reduction, shift, filter_eps, return_lse, impl,
        memory_target, label_smoothing, z_loss,
    )  # fmt: skip
    vocab = vocab_split(group, c)
    check_target_range(targets, c.shape[0] if vocab is None else vocab.total, ignore_index)
    from kernels.cce.api import linear_cross_entropy_impl

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
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        vocab=vocab,
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
        shift: bool | int = False,
        filter_eps: float | str | None = "auto",
        return_lse: bool = False,
        impl: str = "auto",
        memory_target: float | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        process_group=None,
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
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            process_group=process_group,
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
