"""Post-hoc calibrators, scikit-learn style: ``fit(logits, labels) -> self``, then
``calibrator(logits)`` (or ``.transform``) maps (N, C) logits to calibrated (N, C) logits.

Each is an ``nn.Module`` whose fitted state lives in parameters/buffers, so it saves in a
checkpoint; loading a state dict resizes the (shape-free until fitted) tensors. Non-parametric
calibrators (histogram binning, isotonic) return log-probabilities, which are valid logits.

Conventions (pinned by tests): ``fit`` takes floating (N, C) logits with |z| within the float32
range and labels of any integer dtype; the output has the dtype of the logits passed in, computed
in at least float32 (so a probability floor never underflows in fp16). Hyperparameters are checked
in ``__init__``; bad data raises TypeError/ValueError naming the argument.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.registry import Registry

CALIBRATORS: Registry[type[nn.Module]] = Registry("calibrator")

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "HistogramBinning",
    "IsotonicCalibration",
    "MatrixScaling",
    "TemperatureScaling",
    "VectorScaling",
    "check_fit_inputs",
]

_LOG_EPS = 1e-12  # floor for probabilities turned back into logits
_F32_MAX = torch.finfo(torch.float32).max
_RESCALE_ABOVE = 2.0**16  # vector / matrix scaling fit larger logits on z / 2^k (exact rescale)


def check_fit_inputs(logits: Tensor, labels: Tensor) -> Tensor:
    """Validate held-out (N, C) logits and (N,) labels; return the labels as int64.

    Raises TypeError (not a floating / integer tensor) or ValueError naming the argument.
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating torch.Tensor, got {_type_name(logits)}")
    if not isinstance(labels, Tensor) or labels.dtype == torch.bool or labels.is_floating_point():
        raise TypeError(f"labels must be an integer torch.Tensor, got {_type_name(labels)}")
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2, got shape {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N = len(logits) = {logits.shape[0]}, "
            f"got shape {tuple(labels.shape)}"
        )
    if logits.shape[0] < 2:
        raise ValueError(f"logits: need at least 2 samples to fit, got N = {logits.shape[0]}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be integer class indices in [0, {logits.shape[1]})")
    if labels.unique().numel() < 2:
        raise ValueError(
            f"need labels of at least 2 classes to fit, got only {labels.unique().tolist()}"
        )
    return labels


def _type_name(x: object) -> str:
    return f"{type(x).__name__} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


def _work_dtype(logits: Tensor) -> torch.dtype:
    """At least float32: fp16 / bf16 logits are computed in float32 and cast back."""
    return torch.promote_types(logits.dtype, torch.float32)


def _check_float32_range(logits: Tensor) -> None:
    """The scaling calibrators keep float32 parameters: |z| must be a float32 number."""
    if logits.abs().max() > _F32_MAX:
        raise ValueError(f"logits: |z| must be <= {_F32_MAX:.3g} (float32 range) to fit")


def _fit_scale(logits: Tensor) -> float:
    """1, or for |z| > 2^16 the power of two 2^k >= max|z|: fitting on z / 2^k keeps the
    L-BFGS steps finite (at |z| ~ 1e20 they overflow to NaN) and rescales exactly."""
    top = float(logits.abs().max())
    return 1.0 if top <= _RESCALE_ABOVE else 2.0 ** np.ceil(np.log2(top))


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_nonneg(name: str, value: object) -> None:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not ok or not 0 <= float(value) < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _fit_lbfgs(params: list[Tensor], objective, max_iter: int = 200) -> None:
    """Minimise ``objective()`` over ``params`` with full-batch L-BFGS (strong Wolfe search)."""
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)


class Calibrator(nn.Module):
    """Base: ``fit`` on held-out logits, ``forward``/``transform`` on new logits."""

    def fit(self, logits: Tensor, labels: Tensor) -> Calibrator:
        """Fit on held-out logits (N, C) and labels (N,); returns self."""
        raise NotImplementedError

    def transform(self, logits: Tensor) -> Tensor:
        """Calibrated logits (N, C); same as calling the module."""
        return self(logits)

    def predict_proba(self, logits: Tensor) -> Tensor:
        """Calibrated probabilities (N, C)."""
        return self(logits).softmax(dim=-1)

    def _check_fitted(self, tensor: Tensor, logits: Tensor) -> None:
        if tensor.numel() == 0:
            raise ValueError(f"{type(self).__name__} is not fitted: call fit(logits, labels) first")
        if logits.ndim != 2 or logits.shape[1] != tensor.shape[0]:
            raise ValueError(
                f"logits must be (N, {tensor.shape[0]}) as fitted, got shape {tuple(logits.shape)}"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fitted tensors take their shape from the data: resize ours to the incoming ones
        for store in (self._parameters, self._buffers):
            for name, tensor in store.items():
                incoming = state_dict.get(prefix + name)
                if tensor is not None and incoming is not None and incoming.shape != tensor.shape:
                    tensor.data = torch.empty_like(incoming, dtype=tensor.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@CALIBRATORS.register(name="temperature", paper="Guo et al. 2017, arXiv:1706.04599")
class TemperatureScaling(Calibrator):
    """logits / T with one scalar T > 0 fitted by NLL with L-BFGS (on logits, not probabilities);
    keeps the argmax, hence accuracy. Guo et al. 2017, "On Calibration of Modern Neural Networks".
    """

    def __init__(self, max_iter: int = 200) -> None:
        super().__init__()
        _check_int("max_iter", max_iter, 1)
        self.max_iter = max_iter
        self.log_temperature = nn.Parameter(torch.zeros(()))

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.detach().exp()

    def fit(self, logits: Tensor, labels: Tensor) -> TemperatureScaling:
        """Fit T on held-out logits (N, C) and labels (N,)."""
        labels = check_fit_inputs(logits, labels)
        _check_float32_range(logits)
        logits = logits.detach().double()
        with torch.no_grad():
            self.log_temperature.zero_()

        def nll() -> Tensor:
            return F.cross_entropy(logits / self.log_temperature.double().exp(), labels)

        _fit_lbfgs([self.log_temperature], nll, self.max_iter)
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """logits (N, C) -> logits / T."""
        return logits / self.log_temperature.exp().to(logits.dtype)


@CALIBRATORS.register(name="vector", paper="Guo et al. 2017, arXiv:1706.04599")
class VectorScaling(Calibrator):
    """logits * w + b with per-class w, b (C,) fitted by NLL (L-BFGS); the bias can change the
    argmax. Guo et al. 2017.
    """

    def __init__(self, max_iter: int = 200) -> None:
        super().__init__()
        _check_int("max_iter", max_iter, 1)
        self.max_iter = max_iter
        self.weight = nn.Parameter(torch.empty(0))
        self.bias = nn.Parameter(torch.empty(0))

    def fit(self, logits: Tensor, labels: Tensor) -> VectorScaling:
        """Fit w, b on held-out logits (N, C) and labels (N,)."""
        labels = check_fit_inputs(logits, labels)
        _check_float32_range(logits)
        c, scale = logits.shape[1], _fit_scale(logits)
        self.weight.data = torch.ones(c, device=logits.device)
        self.bias.data = torch.zeros(c, device=logits.device)
        logits = (
            (logits.detach().double() / scale).float() if scale != 1 else logits.detach().float()
        )
        _fit_lbfgs(
            [self.weight, self.bias], lambda: F.cross_entropy(self(logits), labels), self.max_iter
        )
        self.weight.data /= scale  # (z / s) w = z (w / s)
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """logits (N, C) -> logits * w + b."""
        self._check_fitted(self.weight, logits)
        z = logits.to(_work_dtype(logits))
        return (z * self.weight.to(z.dtype) + self.bias.to(z.dtype)).to(logits.dtype)


@CALIBRATORS.register(
    name="matrix", paper="Guo et al. 2017, arXiv:1706.04599; Kull et al. 2019, arXiv:1910.12656"
)
class MatrixScaling(Calibrator):
    """logits @ W^T + b with a full (C, C) W, fitted by NLL plus off-diagonal and intercept
    regularisation (ODIR): off_diagonal * mean_{i != j} W_ij^2 + bias * mean b^2.
    Guo et al. 2017; Kull et al. 2019, "Beyond temperature scaling" (ODIR).
    """

    def __init__(self, off_diagonal: float = 1e-2, bias: float = 1e-2, max_iter: int = 300) -> None:
        super().__init__()
        _check_nonneg("off_diagonal", off_diagonal)
        _check_nonneg("bias", bias)
        _check_int("max_iter", max_iter, 1)
        self.off_diagonal, self.bias_reg, self.max_iter = off_diagonal, bias, max_iter
        self.weight = nn.Parameter(torch.empty(0, 0))
        self.bias = nn.Parameter(torch.empty(0))

    def fit(self, logits: Tensor, labels: Tensor) -> MatrixScaling:
        """Fit W, b on held-out logits (N, C) and labels (N,)."""
        labels = check_fit_inputs(logits, labels)
        _check_float32_range(logits)
        c, scale = logits.shape[1], _fit_scale(logits)
        self.weight.data = torch.eye(c, device=logits.device)
        self.bias.data = torch.zeros(c, device=logits.device)
        logits = (
            (logits.detach().double() / scale).float() if scale != 1 else logits.detach().float()
        )
        off = ~torch.eye(c, dtype=torch.bool, device=logits.device)
        off_diagonal = self.off_diagonal / scale**2  # the penalty on W = W_fit / scale

        def objective() -> Tensor:
            penalty = off_diagonal * self.weight[off].square().mean()
            return (
                F.cross_entropy(self(logits), labels)
                + penalty
                + self.bias_reg * self.bias.square().mean()
            )

        _fit_lbfgs([self.weight, self.bias], objective, self.max_iter)
        self.weight.data /= scale  # (z / s) W^T = z (W / s)^T
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """logits (N, C) -> logits @ W^T + b."""
        self._check_fitted(self.bias, logits)
        z = logits.to(_work_dtype(logits))
        return (z @ self.weight.T.to(z.dtype) + self.bias.to(z.dtype)).to(logits.dtype)


def _renormalised_log(probs: Tensor) -> Tensor:
    """(N, C) non-negative one-vs-rest scores -> log of the renormalised distribution (N, C);
    an all-zero row becomes uniform."""
    total = probs.sum(dim=1, keepdim=True)
    probs = torch.where(total > 0, probs / total.clamp_min(_LOG_EPS), 1.0 / probs.shape[1])
    return probs.clamp_min(_LOG_EPS).log()


@CALIBRATORS.register(
    name="histogram_binning",
    paper='Zadrozny & Elkan 2001, "Obtaining calibrated probability estimates from decision trees and naive Bayesian classifiers"',
)
class HistogramBinning(Calibrator):
    """One-vs-rest histogram binning: p_c -> positive rate of class c in p_c's equal-width bin
    (empty bins keep their midpoint), then renormalised over classes. Returns log-probabilities.
    Zadrozny & Elkan 2001; multi-class one-vs-rest as in Guo et al. 2017.
    """

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        _check_int("n_bins", n_bins, 1)
        self.n_bins = n_bins
        self.register_buffer("bin_values", torch.empty(0, n_bins))  # (C, B)

    def _bin_index(self, probs: Tensor) -> Tensor:
        edges = torch.linspace(0, 1, self.n_bins + 1, dtype=probs.dtype, device=probs.device)
        index = torch.bucketize(probs.contiguous(), edges, right=True) - 1
        return index.clamp(0, self.n_bins - 1)  # p == 1 joins the last bin, (N, C)

    def fit(self, logits: Tensor, labels: Tensor) -> HistogramBinning:
        """Fit per-class bin frequencies on held-out logits (N, C) and labels (N,)."""
        labels = check_fit_inputs(logits, labels)
        probs = logits.detach().double().cpu().softmax(dim=1)
        labels = labels.cpu()
        n, c = probs.shape
        flat = (self._bin_index(probs) + self.n_bins * torch.arange(c)).T.reshape(-1)  # (C*N,)
        positives = F.one_hot(labels, c).double().T.reshape(-1)  # (C*N,)
        count = torch.zeros(c * self.n_bins, dtype=torch.float64).index_add_(
            0, flat, torch.ones(c * n, dtype=torch.float64)
        )
        hits = torch.zeros_like(count).index_add_(0, flat, positives)
        midpoints = ((torch.arange(self.n_bins) + 0.5) / self.n_bins).repeat(c).double()
        values = torch.where(count > 0, hits / count.clamp_min(1), midpoints)
        self.bin_values = values.reshape(c, self.n_bins).float().to(logits.device)
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """logits (N, C) -> log of the renormalised per-class bin frequencies (floored at 1e-12
        in at least float32, then cast back: in fp16 the floor would underflow to -inf)."""
        self._check_fitted(self.bin_values, logits)
        probs = logits.to(_work_dtype(logits)).softmax(dim=1)
        scores = self.bin_values.to(probs.dtype).gather(1, self._bin_index(probs).T).T  # (N, C)
        return _renormalised_log(scores).to(logits.dtype)


def _isotonic_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-decreasing least-squares fit of y on x by pool-adjacent-violators.

    Returns knots (unique sorted x, fitted value at each); ties in x are pooled first.
    """
    xs, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=y) / counts
    values, weights, sizes = [], [], []
    for m, w in zip(means, counts.astype(float)):
        values.append(m), weights.append(w), sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            w_sum = weights[-2] + weights[-1]
            merged = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w_sum
            size = sizes[-2] + sizes[-1]
            del values[-1], weights[-1], sizes[-1]
            values[-1], weights[-1], sizes[-1] = merged, w_sum, size
    return xs, np.repeat(values, sizes)


def _interp(x: Tensor, xk: Tensor, yk: Tensor) -> Tensor:
    """Piecewise-linear interpolation per row, clipped at the ends. x (C, N); xk, yk (C, K)
    non-decreasing knots (trailing duplicates allowed)."""
    x = torch.minimum(torch.maximum(x, xk[:, :1]), xk[:, -1:])
    hi = torch.searchsorted(xk, x.contiguous(), right=True).clamp(1, xk.shape[1] - 1)
    x0, x1 = xk.gather(1, hi - 1), xk.gather(1, hi)
    y0, y1 = yk.gather(1, hi - 1), yk.gather(1, hi)
    w = torch.where(x1 > x0, (x - x0) / (x1 - x0).clamp_min(1e-30), 0.0)
    return y0 + w * (y1 - y0)


@CALIBRATORS.register(
    name="isotonic",
    paper='Zadrozny & Elkan 2002, "Transforming classifier scores into accurate multiclass probability estimates"',
)
class IsotonicCalibration(Calibrator):
    """One-vs-rest isotonic regression of 1[y = c] on p_c (interpolated between knots, clipped
    outside), renormalised over classes. Returns log-probabilities.
    Zadrozny & Elkan 2002, "Transforming classifier scores into accurate multiclass probability
    estimates"; Guo et al. 2017.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("knots_x", torch.empty(0, 0, dtype=torch.float64))  # (C, K)
        self.register_buffer("knots_y", torch.empty(0, 0, dtype=torch.float64))  # (C, K)

    def fit(self, logits: Tensor, labels: Tensor) -> IsotonicCalibration:
        """Fit one isotonic map per class on held-out logits (N, C) and labels (N,)."""
        labels = check_fit_inputs(logits, labels)
        probs = logits.detach().double().softmax(dim=1).cpu().numpy()
        onehot = F.one_hot(labels, probs.shape[1]).double().cpu().numpy()
        knots = [_isotonic_fit(probs[:, c], onehot[:, c]) for c in range(probs.shape[1])]
        k = max(len(xs) for xs, _ in knots)
        # pad each class by repeating its last knot: a flat, clipped tail
        self.knots_x = torch.tensor(
            np.stack([np.pad(xs, (0, k - len(xs)), "edge") for xs, _ in knots]),
            device=logits.device,
        )
        self.knots_y = torch.tensor(
            np.stack([np.pad(ys, (0, k - len(ys)), "edge") for _, ys in knots]),
            device=logits.device,
        )
        return self

    def forward(self, logits: Tensor) -> Tensor:
        """logits (N, C) -> log of the renormalised per-class isotonic fits."""
        self._check_fitted(self.knots_x, logits)
        probs = logits.double().softmax(dim=1)
        scores = _interp(probs.T, self.knots_x, self.knots_y).T  # (N, C)
        return _renormalised_log(scores).to(logits.dtype)
