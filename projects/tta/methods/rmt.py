"""RMT: robust mean teacher (Doebler et al., 2023, arXiv:2211.13081)."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from core.losses.consistency import supcon_loss, symmetric_soft_cross_entropy
from projects.tta.methods.base import (
    METHODS,
    TTAMethod,
    check_batch,
    check_number,
    drop_running_stats,
    norm_layers,
)

__all__ = ["RMT", "ema_update"]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, ema: float) -> None:
    """Mean-teacher step on every parameter: t <- ema t + (1 - ema) s (Tarvainen & Valpola,
    2017, arXiv:1703.01780; RMT's teacher, Doebler et al., 2023). Not timm's ModelEmaV3: its
    lerp rounds differently, which in float32 changed 7 of 1200 RMT predictions here."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(ema).add_(s, alpha=1 - ema)


class _FeatureHook:
    """Captures the input of a module (the features a classifier head sees)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        module.register_forward_pre_hook(self)

    def __call__(self, module, args) -> None:
        self.value = args[0]


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("rmt needs a model whose classifier head is an nn.Linear")
    return linears[-1]


@METHODS.register(name="rmt", paper="Doebler et al. 2023, arXiv:2211.13081")
class RMT(TTAMethod):
    """Robust mean teacher: symmetric CE to an EMA teacher on x and an augmented x, a
    contrastive pull to the nearest source prototype, source replay, and a short warm-up.

    Per batch: step on ``lambda_ce_trg SCE + lambda_cont SupCon``, teacher EMA, then a step on
    ``lambda_ce_src CE`` of a source batch. Defaults (the paper's CIFAR-10-C setting): Adam lr
    1e-3, teacher EMA 0.999, temperature 0.1, projector width 128, lambda_ce_trg = lambda_cont =
    lambda_ce_src = 1, 50 warm-up steps. ``source_data = (images, labels)``: clean labelled
    source samples (required); source replay and warm-up draw ``source_batch_size`` of them
    (default: the test batch size, 64 during warm-up). Prototypes are class means of source
    features under the source BN statistics; afterwards BN uses batch statistics in train and
    eval mode. Predictions are student + teacher logits. All parameters are trained.
    """

    needs_norm = False

    def __init__(
        self,
        model: nn.Module,
        *,
        source_data: tuple[torch.Tensor, torch.Tensor] | None = None,
        ema: float = 0.999,
        temperature: float = 0.1,
        projection_dim: int = 128,
        lambda_ce_trg: float = 1.0,
        lambda_cont: float = 1.0,
        lambda_ce_src: float = 1.0,
        warmup_steps: int = 50,
        source_batch_size: int | None = None,
        **kw,
    ) -> None:
        if source_data is None:
            raise ValueError("rmt needs source_data=(images, labels) for prototypes and warm-up")
        if not isinstance(source_data, (tuple, list)) or len(source_data) != 2:
            raise ValueError("RMT: source_data must be a pair (images (M, ...), labels (M,))")
        self.src_x, self.src_y = source_data
        check_batch(self.src_x, "RMT: source_data images")
        if (
            not torch.is_tensor(self.src_y)
            or self.src_y.is_floating_point()
            or self.src_y.shape != self.src_x.shape[:1]
        ):
            raise ValueError(
                f"RMT: source_data labels must be integer ({len(self.src_x)},), got "
                f"{getattr(self.src_y, 'shape', type(self.src_y).__name__)}"
            )
        check_number("RMT", "ema", ema, 0, 1)
        check_number("RMT", "temperature", temperature, 0, math.inf, open_low=True, open_high=True)
        check_number("RMT", "projection_dim", projection_dim, 1, integer=True)
        for name, lam in zip(
            ("lambda_ce_trg", "lambda_cont", "lambda_ce_src"),
            (lambda_ce_trg, lambda_cont, lambda_ce_src),
        ):
            check_number("RMT", name, lam, 0, math.inf, open_high=True)
        check_number("RMT", "warmup_steps", warmup_steps, 0, integer=True)
        if source_batch_size is not None:
            check_number("RMT", "source_batch_size", source_batch_size, 1, integer=True)
        self.ema, self.temperature, self.projection_dim = ema, temperature, projection_dim
        self.lambdas = (lambda_ce_trg, lambda_cont, lambda_ce_src)
        self.warmup_steps, self.source_batch_size = warmup_steps, source_batch_size
        super().__init__(model, **kw)

    @property
    def head(self) -> nn.Linear:
        return _last_linear(self.model)

    def configure_model(self) -> None:
        dim, width = self.head.in_features, self.projection_dim
        self.projector = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width))
        self.projector.to(self.head.weight)  # the model's device and dtype
        self.model.train()
        self.model.requires_grad_(True)
        for _, m in norm_layers(self.model):
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.track_running_stats = False  # running buffers kept for the prototypes
        self.hook = _FeatureHook(self.head)

    def collect_params(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.projector.parameters()]

    def _source_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.source_batch_size or size
        idx = torch.randint(len(self.src_x), (size,), generator=self.generator)
        return self.to_model(self.src_x[idx]), self.to_model(self.src_y[idx])

    def _update_teacher(self) -> None:
        ema_update(self.teacher, self.model, self.ema)

    def setup(self) -> None:
        """Source prototypes (class means of source features), teacher, warm-up."""
        with torch.no_grad():
            self.model.eval()
            feats = torch.cat(
                [self._features(self.to_model(xb)) for xb in self.src_x.split(500)]
            )  # (M, D)
            self.model.train()
        k = self.head.out_features
        src_y = self.src_y.to(feats.device)
        protos = torch.stack([feats[src_y == c].mean(0) for c in range(k)])  # (K, D)
        if not torch.isfinite(protos).all():
            raise ValueError("rmt: source_data must contain every class (empty prototype)")
        self.register_buffer("prototypes", protos)
        drop_running_stats(self.model)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        base_lr = [g["lr"] for g in self.optimizer.param_groups]
        for i in range(self.warmup_steps):
            for g, lr in zip(self.optimizer.param_groups, base_lr):
                g["lr"] = lr * (i + 1) / self.warmup_steps
            xs, _ = self._source_batch(64)
            with torch.enable_grad():
                loss = symmetric_soft_cross_entropy(self.model(xs), self.teacher(xs))
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
            self._update_teacher()
        for g, lr in zip(self.optimizer.param_groups, base_lr):
            g["lr"] = lr

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        self.model(x)
        return self.hook.value

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """RMT's test-time augmentation, grayscale: affine, flip, contrast, noise. (N,C,H,W)."""
        n, g = x.shape[0], self.generator
        u = torch.rand(n, 6, generator=g)  # drawn on the CPU: same numbers on every device
        ang = (u[:, 0] - 0.5) * math.radians(16)  # +-8 degrees
        scale = 0.9 + 0.2 * u[:, 1]
        flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.cos(ang) / scale * flip
        theta[:, 0, 1] = -torch.sin(ang) / scale
        theta[:, 1, 0] = torch.sin(ang) / scale * flip
        theta[:, 1, 1] = torch.cos(ang) / scale
        theta[:, :, 2] = (u[:, 3:5] - 0.5) / 8  # +-1/16 of the image
        grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
        y = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (y - mean) * (0.8 + 0.4 * u[:, 5]).to(y).view(n, 1, 1, 1) + mean
        return (y + 0.005 * torch.randn(y.shape, generator=g).to(y)).clamp(0, 1)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        lam_trg, lam_cont, lam_src = self.lambdas
        feats = self._features(x)  # (N, D)
        logits = self.head(feats)
        feats_aug = self._features(self.augment(x))
        logits_aug = self.head(feats_aug)
        with torch.no_grad():
            logits_t = self.teacher(x)
            sim = F.cosine_similarity(feats.detach()[:, None], self.prototypes[None], dim=2)
            nearest = self.prototypes[sim.argmax(1)]  # (N, D)
        views = torch.stack([nearest, feats, feats_aug], dim=1)  # (N, 3, D)
        cont = supcon_loss(self.projector(views), self.temperature)
        sce = 0.5 * symmetric_soft_cross_entropy(logits, logits_t, reduction="none")
        sce = sce + 0.5 * symmetric_soft_cross_entropy(logits_aug, logits_t, reduction="none")
        loss = lam_trg * sce.mean() + lam_cont * cont
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.last_loss = loss.detach()
        self._update_teacher()
        if lam_src > 0:
            xs, ys = self._source_batch(len(x))
            self.optimizer.zero_grad()
            (lam_src * F.cross_entropy(self.model(xs), ys)).backward()
            self.optimizer.step()
        self.optimizer.zero_grad()
        return (logits + logits_t).detach()
