"""CA calibrator: a per-sample temperature predicted from the softmax outputs of transformed views.

Liu, Wang, Zou, Zou & Zheng 2024, "Optimizing Calibration by Gaining Aware of Prediction
Correctness" (arXiv 2404.13016; code: github.com/liuyvchi/Correctness-aware-calibration). A small
MLP reads, for each transformed view (all views but the original, which comes first), the softmax
probabilities at the original view's top-k classes, and outputs T in [0.1, 10]; the original logits
are divided by T (so the argmax, hence accuracy, is kept). It is trained with the
correctness-aware (CA) loss: the squared error between the calibrated max confidence and the 0/1
correctness of the prediction.

Grayscale adaptation: the paper's views are rotation, greyscale and colour jitter of RGB images;
for 28x28 grayscale images we offer rotations, flips, blur and contrast (``VIEW_TRANSFORMS``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.calibration.calibrators import (
    CALIBRATORS,
    Calibrator,
    _check_int,
    _check_nonneg,
    check_fit_inputs,
)

__all__ = ["VIEW_TRANSFORMS", "CACalibrator", "correctness_aware_loss", "make_views"]

T_MIN, T_MAX = 0.1, 10.0


def _gaussian_blur(x: Tensor, sigma: float = 1.0) -> Tensor:
    """3x3 Gaussian blur of (N, Ch, H, W) images, reflect-padded."""
    t = torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device)
    k1 = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k1[:, None] * k1[None, :]) / k1.sum() ** 2  # (3, 3)
    ch = x.shape[1]
    weight = k.expand(ch, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, groups=ch)


def _contrast(x: Tensor, factor: float = 0.5) -> Tensor:
    """Scale each image's deviation from its mean intensity by ``factor``."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + factor * (x - mean)


VIEW_TRANSFORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "rot90": lambda x: torch.rot90(x, 1, dims=(2, 3)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(2, 3)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(2, 3)),
    "hflip": lambda x: torch.flip(x, dims=(3,)),
    "vflip": lambda x: torch.flip(x, dims=(2,)),
    "blur": _gaussian_blur,
    "contrast": _contrast,
}
DEFAULT_VIEWS = ("identity", "rot90", "rot270", "hflip", "blur", "contrast")


@torch.no_grad()
def make_views(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    views: Sequence[str] = DEFAULT_VIEWS,
    batch_size: int = 1024,
) -> Tensor:
    """Logits of ``model`` on transformed copies of grayscale images (N, 1, H, W), e.g. 28x28
    Fashion-MNIST. Returns (V, N, C), views in the order given (the first should be "identity").
    Liu et al. 2024 (arXiv 2404.13016).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, channels, H, W), got shape {tuple(images.shape)}")
    unknown = [v for v in views if v not in VIEW_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown views {unknown}; known: {sorted(VIEW_TRANSFORMS)}")
    out = [
        torch.cat([model(VIEW_TRANSFORMS[v](chunk)) for chunk in images.split(batch_size)])
        for v in views
    ]
    return torch.stack(out)


def correctness_aware_loss(
    calibrated_logits: Tensor, labels: Tensor, balanced: bool = False
) -> Tensor:
    """CA loss: mean of (conf - correct)^2, conf = max softmax, correct = 1[argmax = y].

    Its pointwise minimiser is conf = P(correct | features): it calibrates the confidence.
    ``balanced=True`` is the weighting of the authors' released code: correct samples weigh
    1 - acc, wrong ones acc, normalised by the weight sum (= 0.5 * mean_correct + 0.5 *
    mean_wrong; one group alone when the other is empty). Its minimiser is the balanced-prior
    posterior q(1-a) / (q(1-a) + (1-q)a), not q: under-confident whenever accuracy a > 0.5
    (confidence 0.5 where the views carry no information). calibrated_logits (N, C), labels (N,).
    Liu et al. 2024 (arXiv 2404.13016).
    """
    conf, pred = calibrated_logits.softmax(dim=1).max(dim=1)  # (N,), (N,)
    correct = pred.eq(labels).to(conf.dtype)
    sq_err = (conf - correct).square()
    if not balanced:
        return sq_err.mean()
    acc = correct.mean()
    if acc == 0 or acc == 1:  # one group only: its plain mean
        return sq_err.mean()
    weight = correct * (1 - acc) + (1 - correct) * acc  # (N,)
    return (weight * sq_err).sum() / weight.sum()


@CALIBRATORS.register(name="ca", paper="Liu et al. 2024, arXiv:2404.13016")
class CACalibrator(Calibrator):
    """Per-sample temperature from multi-view softmax features, trained with the CA loss.

    ``fit(view_logits, labels)`` and ``forward(view_logits)`` take (V, N, C) logits of the V views
    (``views``, original first; see ``make_views``) and return calibrated (N, C) logits of the
    original view. Features, top_k = 4 and T clamped to [0.1, 10] follow the authors' code; the
    MLP is wider (``hidden``), predicts log T (so it starts at T = 1) and is trained full-batch to
    convergence (their code: 5 hidden units, T = clamp(linear), Adam 1e-4 for 10 epochs of
    batches of 1000). ``balanced`` selects the CA loss weighting (see
    ``correctness_aware_loss``). Liu et al. 2024 (arXiv 2404.13016).
    """

    def __init__(
        self,
        n_classes: int,
        views: Sequence[str] = DEFAULT_VIEWS,
        top_k: int = 4,
        hidden: int = 64,
        epochs: int = 300,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        balanced: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_int("n_classes", n_classes, 2)
        _check_int("hidden", hidden, 1)
        _check_int("epochs", epochs, 1)
        _check_int("seed", seed, 0)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= n_classes:
            raise ValueError(f"top_k must be in [1, n_classes = {n_classes}], got {top_k!r}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < float("inf"):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        _check_nonneg("weight_decay", weight_decay)
        unknown = [v for v in views if v not in VIEW_TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown views {unknown}; known: {sorted(VIEW_TRANSFORMS)}")
        if len(views) < 2:
            raise ValueError(f"need the original and at least one transformed view, got {views}")
        self.n_classes, self.views, self.top_k = n_classes, tuple(views), top_k
        self.epochs, self.lr, self.weight_decay, self.balanced = epochs, lr, weight_decay, balanced
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear((len(self.views) - 1) * top_k, hidden), nn.ReLU(), nn.Linear(hidden, 1)
            )
        with torch.no_grad():  # start at T = 1
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()

    def _check_views(self, view_logits: Tensor) -> None:
        shape = (len(self.views), self.n_classes)
        if view_logits.ndim != 3 or (view_logits.shape[0], view_logits.shape[2]) != shape:
            raise ValueError(
                f"view_logits must be (V={shape[0]}, N, C={shape[1]}), "
                f"got shape {tuple(view_logits.shape)}"
            )
        if not torch.isfinite(view_logits).all():
            raise ValueError("view_logits contain NaN or inf")

    def features(self, view_logits: Tensor) -> Tensor:
        """(V, N, C) logits -> (N, (V - 1) * top_k): each transformed view's softmax probabilities
        at the original view's top-k classes (how far the views agree with the prediction)."""
        probs = view_logits.softmax(dim=-1)  # (V, N, C)
        top = probs[0].topk(self.top_k, dim=1).indices  # (N, k)
        picked = probs[1:].gather(2, top.expand(probs.shape[0] - 1, -1, -1))  # (V - 1, N, k)
        return picked.permute(1, 0, 2).reshape(probs.shape[1], -1)

    def temperature(self, view_logits: Tensor) -> Tensor:
        """Per-sample temperature (N,), clamped to [0.1, 10]."""
        self._check_views(view_logits)
        return self.net(self.features(view_logits)).squeeze(1).exp().clamp(T_MIN, T_MAX)

    def forward(self, view_logits: Tensor) -> Tensor:
        """(V, N, C) view logits -> calibrated (N, C) logits of the original view: z_0 / T(x)."""
        return view_logits[0] / self.temperature(view_logits)[:, None]

    def fit(self, view_logits: Tensor, labels: Tensor) -> CACalibrator:
        """Train the MLP full-batch with Adam on held-out view logits (V, N, C) and labels (N,)."""
        self._check_views(view_logits)
        labels = check_fit_inputs(view_logits[0], labels)
        view_logits = view_logits.detach().float()
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        for _ in range(self.epochs):
            opt.zero_grad()
            correctness_aware_loss(self(view_logits), labels, self.balanced).backward()
            opt.step()
        return self
