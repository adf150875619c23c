"""Shared pieces of the kd image stages: params, data, networks, losses, metrics.

The image stages train tiny CNNs with a plain PyTorch loop rather than Lightning: a step of the
student is ~20 ms of CPU, so Lightning's per-step hooks and logging would cost as much as the
maths; resumability comes from per-run result files instead of checkpoints
(``core.utils.runs.cached_run``).
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from core.calibration.metrics import expected_calibration_error
from core.data.fashion_mnist import load_fashion_mnist
from core.losses import get_divergence
from core.models.cnn import SmallCNN
from core.models.resnet import ResNet

DEFAULT_PARAMS = Path("projects/kd/params.yaml")
DEFAULT_FMNIST = Path("datasets/fashion-mnist/processed")
N_CLASSES = 10
METRICS = ("accuracy", "ece", "nll")
# source files whose content decides a run's numbers (part of every cached run's config)
CODE = (
    "projects/kd/common.py",
    "core/losses/divergences.py",
    "core/losses/_registry.py",
    "core/models/cnn.py",
    "core/models/resnet.py",
    "core/calibration/metrics.py",
)
REPO_ROOT = Path(__file__).resolve().parents[2]


def load_params(path: str | Path = DEFAULT_PARAMS) -> dict[str, Any]:
    """The params dict from a YAML file."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def file_digest(paths: Iterable[str | Path]) -> str:
    """SHA-256 (hex, 16 chars) over the bytes of ``paths`` (relative to the repo root if so)."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        h.update((p if p.is_absolute() else REPO_ROOT / p).read_bytes())
    return h.hexdigest()[:16]


# --- data and networks ----------------------------------------------------------------------


def _images(x: Tensor) -> Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return x.float().div(255).unsqueeze(1)


def load_data(cfg: dict[str, Any], root: str | Path = DEFAULT_FMNIST) -> dict[str, Tensor]:
    """A fixed random ``train_size`` subset of the 60k training images and the first
    ``test_size`` test images: {x_train (N, 1, 28, 28), y_train (N,), x_test, y_test}."""
    data = load_fashion_mnist(root)
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(cfg["seed"]))
    idx = perm[: cfg["train_size"]]
    n_test = cfg["test_size"]
    return {
        "x_train": _images(data.x_train[idx]),
        "y_train": data.y_train[idx],
        "x_test": _images(data.x_test[:n_test]),
        "y_test": data.y_test[:n_test],
    }


def build_net(spec: dict[str, Any]) -> nn.Module:
    """``{arch: smallcnn, channels, hidden}`` -> SmallCNN; ``{arch: resnet, width, ...}`` -> ResNet."""
    kw = {k: v for k, v in spec.items() if k != "arch"}
    if spec["arch"] == "smallcnn":
        return SmallCNN(tuple(kw["channels"]), kw["hidden"], N_CLASSES)
    if spec["arch"] == "resnet":
        return ResNet(N_CLASSES, **kw)
    raise ValueError(f"unknown arch {spec['arch']!r} (smallcnn or resnet)")


class DualHead(nn.Module):
    """A network plus an auxiliary linear head on its penultimate features (Dual-Head KD).

    ``forward`` is the main head only (test time); ``both(x)`` gives (main, aux) logits (N, C).
    The penultimate features are the input of the network's last ``nn.Linear``.
    Yang et al. 2024, "Dual-Head Knowledge Distillation", arXiv:2411.08937.
    """

    def __init__(self, net: nn.Module, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.net = net
        self.last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        self.aux = nn.Linear(self.last.in_features, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats: list[Tensor] = []
        hook = self.last.register_forward_hook(lambda _m, inputs, _out: feats.append(inputs[0]))
        try:
            main = self.net(x)
        finally:
            hook.remove()
        return main, self.aux(feats[0])


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- losses -------------------------------------------------------------------------------


def divergence_term(
    term: dict[str, Any], student: Tensor, teacher: Tensor, targets: Tensor, progress: float
) -> Tensor:
    """``weight * warm * D(student, teacher)`` for one params term.

    term: {divergence, weight, temperature, hparams?, warmup?}; logits (N, C), targets (N,)
    (DKD needs them; for the others every row is kept). ``warmup`` is a fraction of training:
    the term ramps linearly from 0 to full weight over it (DKD's min(epoch / 20, 1) over 240
    epochs is warmup 1/12). ``progress`` in (0, 1] is the fraction of training steps done.
    """
    warmup = term.get("warmup", 0.0)
    warm = min(progress / warmup, 1.0) if warmup > 0 else 1.0
    div = get_divergence(term["divergence"])
    value = div(
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
    """``ce_weight * CE(main) + sum of terms``; a term with ``head: aux`` reads the aux head.

    logits, aux_logits, teacher_logits (N, C) (teacher constant); targets (N,).
    """
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
    """(student loss, teacher loss) of one online-KD step; each network learns from the other.

    Student: CE(s) + D_s(s, t.detach()); teacher: CE(t) + D_t(s.detach(), t). Divergences keep
    the registry's (student, teacher) argument order, so ``reverse_kl`` as the teacher's term is
    KL(p_s || p_t) with gradient to the teacher: DML's peer loss (Zhang et al. 2018).
    """
    loss_s = F.cross_entropy(s, targets)
    loss_t = F.cross_entropy(t, targets)
    for term in method["student"]:
        loss_s = loss_s + divergence_term(term, s, t.detach(), targets, progress)
    for term in method["teacher"]:
        loss_t = loss_t + divergence_term(term, s.detach(), t, targets, progress)
    return loss_s, loss_t


def resolve_terms(terms: Sequence[dict[str, Any]], temperature: float) -> list[dict[str, Any]]:
    """Fill the default temperature and weight 1 into each term (a copy)."""
    return [{"temperature": temperature, "weight": 1.0, **t} for t in terms]


# --- training -----------------------------------------------------------------------------


def make_optimizer(
    params: Iterable[nn.Parameter], optim: dict[str, Any], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam (lr, weight_decay) with a per-step cosine decay to 0 or a constant rate."""
    opt = torch.optim.Adam(params, lr=optim["lr"], weight_decay=optim.get("weight_decay", 0.0))
    if optim.get("schedule", "cosine") == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total_steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def batches(n: int, optim: dict[str, Any], seed: int) -> list[Tensor]:
    """Index batches (B,) of every epoch, in a seeded shuffled order (same seed, same order)."""
    g = torch.Generator().manual_seed(seed)
    return [
        idx
        for _ in range(optim["epochs"])
        for idx in torch.randperm(n, generator=g).split(optim["batch_size"])
    ]


def fit_offline(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    method: dict[str, Any],
    optim: dict[str, Any],
    seed: int,
    teacher_logits: Tensor | None = None,
) -> nn.Module:
    """Train ``model`` (a ``DualHead`` when a term reads the aux head) on images x (N, 1, 28, 28),
    labels y (N,) with ``offline_loss``; teacher_logits (N, C) are precomputed (no augmentation,
    so a frozen teacher gives the same logits every epoch). Returns the model in eval mode."""
    steps = batches(len(x), optim, seed)
    opt, sched = make_optimizer(model.parameters(), optim, len(steps))
    dual = isinstance(model, DualHead)
    model.train()
    for i, idx in enumerate(steps):
        logits, aux = model.both(x[idx]) if dual else (model(x[idx]), None)
        t = teacher_logits[idx] if teacher_logits is not None else None
        loss = offline_loss(method, logits, aux, t, y[idx], (i + 1) / len(steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# --- metrics ------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """Logits (N, C) of ``model`` in eval mode, in batches."""
    model.eval()
    return torch.cat([model(xb) for xb in x.split(batch_size)])


def classification_metrics(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Top-1 accuracy, top-label ECE (``n_bins`` equal-width bins) and NLL of logits (N, C)."""
    logits = logits.double()
    probs = logits.softmax(-1)
    return {
        "accuracy": float(logits.argmax(-1).eq(labels).double().mean()),
        "ece": float(expected_calibration_error(probs, labels, n_bins)),
        "nll": float(F.cross_entropy(logits, labels)),
    }


def summarise(runs: Iterable[dict[str, Any]], key: str = "method") -> dict[str, dict[str, Any]]:
    """Per ``run[key]``: n, and mean / sample std (ddof 1; 0 for one run) of each metric."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run[key], []).append(run)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in groups.items():
        row: dict[str, Any] = {"n": len(rs)}
        for m in rs[0]["metrics"]:
            values = [r["metrics"][m] for r in rs]
            row[f"{m}_mean"] = statistics.fmean(values)
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[name] = row
    return out
