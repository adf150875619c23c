"""The TTA method base class, its registry, and the helpers every method shares.

A method wraps any torch classifier (a copy of it unless ``inplace=True``); calling the wrapper
on a batch ``(N, C, H, W)`` returns logits ``(N, K)`` and adapts as the method says. ``reset()``
restores the state the wrapper had right after it was built, bit for bit. Tensors are created
on the input's or the model's device; random draws come from a CPU generator (same numbers on
every device), so ``method.to(device)`` after building is enough.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable

import torch
from torch import nn

from core.entropy import shannon_entropy
from core.registry import Registry

__all__ = [
    "METHODS",
    "NORM_TYPES",
    "TTAMethod",
    "build",
    "check_batch",
    "check_number",
    "drop_running_stats",
    "make_optimizer",
    "norm_layers",
    "reliable",
]

METHODS: Registry[type[TTAMethod]] = Registry("tta method")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build(name: str, model: nn.Module, **hparams) -> TTAMethod:
    """The TTA method registered as ``name`` wrapped around ``model`` (copied unless inplace)."""
    return METHODS.build(name, model, **hparams)


def check_number(
    owner: str,
    name: str,
    value,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
    integer: bool = False,
) -> None:
    """TypeError unless ``value`` is a real (or integer) number, ValueError unless it lies in the
    interval; both messages name ``owner: name`` and the interval (``[0, inf)`` excludes inf)."""
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    real = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, real):
        raise TypeError(f"{owner}: {name} must be {allowed}, got {value!r}")
    v = float(value)
    if (
        math.isnan(v)
        or not low <= v <= high
        or (open_low and v == low)
        or (open_high and v == high)
    ):
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")


def check_batch(x: torch.Tensor, name: str = "the batch") -> None:
    """Raise ValueError for what no method can adapt on: non-float, empty or non-finite input."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating image tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm / GroupNorm / LayerNorm layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def drop_running_stats(model: nn.Module) -> None:
    """Make every BatchNorm use test-batch statistics in train *and* eval mode: the running
    buffers are removed, as in the Tent authors' ``configure_model`` (Wang et al., 2021)."""
    for _, m in norm_layers(model):
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None


def reliable(logits: torch.Tensor, e0: float) -> torch.Tensor:
    """Mask of samples whose prediction entropy is below ``e0`` (EATA / SAR / DeYO): (N,)."""
    return shannon_entropy(logits.detach()) < e0


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = False,
    owner: str = "tta",
) -> torch.optim.Optimizer:
    """Adam (beta1 = momentum) or SGD over ``params``, hyperparameters checked by name."""
    if name not in ("adam", "sgd"):
        raise ValueError(f"{owner}: optimizer must be 'adam' or 'sgd', got {name!r}")
    check_number(owner, "lr", lr, 0, math.inf, open_high=True)
    check_number(owner, "momentum", momentum, 0, 1, open_high=True)
    check_number(owner, "weight_decay", weight_decay, 0, math.inf, open_high=True)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{owner}: nesterov must be True or False, got {nesterov!r}")
    if nesterov and (name != "sgd" or momentum == 0):
        raise ValueError(f"{owner}: nesterov=True needs optimizer='sgd' and momentum > 0")
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


class TTAMethod(nn.Module):
    """Wraps a classifier; ``forward(x)`` returns logits and adapts (``steps`` times).

    Subclasses override ``configure_model`` (train/eval modes, which params get gradients),
    ``collect_params`` (what the optimizer updates), ``loss`` and ``forward_and_adapt``; the
    defaults are Tent's (Wang et al., 2021, arXiv:2006.10726).
    """

    adapts = True  # False: inference only, no optimizer
    needs_norm = True  # needs BatchNorm/GroupNorm/LayerNorm layers

    def __init__(
        self,
        model: nn.Module,
        *,
        inplace: bool = False,
        steps: int = 1,
        optimizer: str = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        check_number(owner, "steps", steps, 1, integer=True)
        check_number(owner, "seed", seed, integer=True)
        self.model = model if inplace else copy.deepcopy(model)
        if self.needs_norm and not norm_layers(self.model):
            raise ValueError(
                f"{owner} adapts normalisation layers, but the model has no "
                "BatchNorm/GroupNorm/LayerNorm layer"
            )
        self.steps = steps
        self.last_loss: torch.Tensor | None = None  # the last adaptation loss, detached
        self.generator = torch.Generator().manual_seed(seed)
        self.configure_model()
        self.optimizer = None
        if self.adapts:
            params = list(self.collect_params())
            if not params:
                raise ValueError(f"{owner}: no parameters to adapt in this model")
            self.optimizer = make_optimizer(
                params, optimizer, lr, momentum, weight_decay, nesterov, owner
            )
        self.setup()
        self._snapshot = copy.deepcopy(self.state_dict())
        self._opt_snapshot = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None
        self._gen_snapshot = self.generator.get_state()

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the model's device, floating ``x`` also in its dtype (held data: Fisher
        and source samples, which do not move with ``method.to(...)``)."""
        p = next(self.model.parameters(), None)
        if p is None:
            return x
        return x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)

    # -- hooks --------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Tent's setup: train mode; only norm affine params learn; BN uses batch statistics
        in train and eval mode (running buffers removed, as in the authors' code)."""
        self.model.train()
        self.model.requires_grad_(False)
        for _, m in norm_layers(self.model):
            m.requires_grad_(True)
        drop_running_stats(self.model)

    def collect_params(self) -> list[nn.Parameter]:
        """Affine weight and bias of every norm layer."""
        return [p for _, m in norm_layers(self.model) for p in m.parameters() if p.requires_grad]

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean prediction entropy (Tent): (N, K) -> scalar."""
        return shannon_entropy(logits).mean()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """One adaptation step on ``x`` (N, ...); returns the logits before the step (N, K)."""
        logits = self.model(x)
        self.optimizer.zero_grad()
        loss = self.loss(logits)
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()
        return logits.detach()

    def setup(self) -> None:
        """Anything built once after the optimizer (Fisher, teacher, warm-up)."""

    def reset_state(self) -> None:
        """Clear non-tensor running state (EMAs) on reset."""

    # -- front door ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_batch(x)
        if not self.adapts:
            with torch.no_grad():
                return self.forward_and_adapt(x)
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self.forward_and_adapt(x)
        return logits

    def _apply(self, fn, *args, **kwargs):
        """``.to(...)``, ``.cuda()``, ``.double()``: the optimizer state (RMT's warm-up builds
        some) follows the parameters; reloading its state dict casts it to theirs."""
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "optimizer", None) is not None and self.optimizer.state:
            self.optimizer.load_state_dict(self.optimizer.state_dict())
        return out

    def reset(self) -> None:
        """Restore model, helper modules, optimizer and running state to their built state."""
        self.load_state_dict(self._snapshot)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self._opt_snapshot)
        self.generator.set_state(self._gen_snapshot)
        self.last_loss = None
        self.reset_state()
