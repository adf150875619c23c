"""Test-time adaptation methods: one base class, a registry, and ``build(name, model, **hp)``.

Every method wraps any torch classifier (a copy of it unless ``inplace=True``); calling the
wrapper on a batch ``(N, C, H, W)`` returns logits ``(N, K)`` and adapts as the method says.
``reset()`` restores the state the wrapper had right after it was built, bit for bit.

Methods (defaults are the papers'; see params.yaml for the values used here):
  source  no adaptation (eval mode).
  bn      test-batch normalisation statistics (Schneider et al., 2020, arXiv:2006.16971).
  tent    entropy minimisation of norm affine params (Wang et al., 2021, arXiv:2006.10726).
  eata    reliable + non-redundant samples, Fisher anchor (Niu et al., 2022, arXiv:2204.02610).
  sar     reliable samples, sharpness-aware step, model recovery (Niu et al., 2023,
          arXiv:2302.12400).
  deyo    entropy + PLPD filter and weighting (Lee et al., 2024, arXiv:2403.07366).
  rmt     symmetric-CE mean teacher + source prototypes (Doebler et al., 2023,
          arXiv:2211.13081).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.entropy import shannon_entropy
from core.registry import Registry

__all__ = [
    "METHODS",
    "TTAMethod",
    "build",
    "check_batch",
    "deyo_weights",
    "eata_select",
    "norm_layers",
    "patch_shuffle",
    "plpd",
    "prototype_contrastive_loss",
    "reliable",
    "symmetric_cross_entropy",
]

METHODS: Registry[type[TTAMethod]] = Registry("tta method")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build(name: str, model: nn.Module, **hparams) -> TTAMethod:
    """The TTA method registered as ``name`` wrapped around ``model`` (copied unless inplace)."""
    return METHODS.build(name, model, **hparams)


# ----------------------------------------------------------------------------- functional


def check_batch(x: torch.Tensor) -> None:
    """Raise ValueError for what no method can adapt on: non-float, empty or non-finite input."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(f"expected a floating image tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("the batch contains NaN or inf values")


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every BatchNorm / GroupNorm / LayerNorm layer in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def reliable(logits: torch.Tensor, e0: float) -> torch.Tensor:
    """Mask of samples whose prediction entropy is below ``e0`` (EATA / SAR / DeYO): (N,)."""
    return shannon_entropy(logits.detach()) < e0


def eata_select(
    logits: torch.Tensor, e0: float, d_margin: float, mean_probs: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """EATA's filters: reliable (H < e0) and non-redundant (|cos(p, m)| < d_margin) samples.

    ``mean_probs`` (K,) is the EMA(0.9) of the mean probabilities of kept samples (None at
    the start). Returns the keep mask (N,) and the updated EMA. Niu et al., 2022, eq. 6-8.
    """
    probs = logits.detach().softmax(1)  # (N, K)
    keep = reliable(logits, e0)
    if mean_probs is not None:
        cos = F.cosine_similarity(mean_probs[None], probs, dim=1)  # (N,)
        keep = keep & (cos.abs() < d_margin)
    new = probs[keep]
    if new.shape[0] == 0:
        return keep, mean_probs
    m = new.mean(0)
    return keep, m if mean_probs is None else 0.9 * mean_probs + 0.1 * m


def patch_shuffle(x: torch.Tensor, grid: int, generator: torch.Generator | None = None):
    """Cut each image into ``grid x grid`` patches and shuffle them (DeYO's object-destroying view).

    (N, C, H, W) -> (N, C, H, W); sizes not divisible by ``grid`` are resized there and back.
    """
    n, c, h, w = x.shape
    hh, ww = (h // grid) * grid, (w // grid) * grid
    y = x if (hh, ww) == (h, w) else F.interpolate(x, size=(hh, ww), mode="bilinear")
    ph, pw = hh // grid, ww // grid
    p = y.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, -1)
    perm = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1)  # (N, P)
    p = p[torch.arange(n)[:, None], perm]
    y = p.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hh, ww)
    return y if (hh, ww) == (h, w) else F.interpolate(y, size=(h, w), mode="bilinear")


def plpd(logits: torch.Tensor, logits_shuffled: torch.Tensor) -> torch.Tensor:
    """Pseudo-label probability difference p_yhat(x) - p_yhat(x'), yhat = argmax p(x): (N,).

    Lee et al., 2024 (DeYO), eq. 4.
    """
    p, q = logits.detach().softmax(1), logits_shuffled.detach().softmax(1)
    yhat = p.argmax(1, keepdim=True)
    return (p.gather(1, yhat) - q.gather(1, yhat)).squeeze(1)


def deyo_weights(entropy: torch.Tensor, plpd_: torch.Tensor, e0: float) -> torch.Tensor:
    """DeYO sample weights exp(e0 - H) + exp(PLPD) (Lee et al., 2024, eq. 7): (N,)."""
    return torch.exp(e0 - entropy.detach()) + torch.exp(plpd_.detach())


def symmetric_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 [CE(p_t, p_s) + CE(p_s, p_t)] between logits (N, K) -> (N,).

    Doebler et al., 2023 (RMT), eq. 3; gradients flow into both arguments as in the paper's code.
    """
    return -0.5 * (teacher.softmax(1) * student.log_softmax(1)).sum(1) - 0.5 * (
        student.softmax(1) * teacher.log_softmax(1)
    ).sum(1)


def prototype_contrastive_loss(views: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SupCon loss where the V views of each sample are positives of each other: (N, V, D) -> ().

    RMT pulls (source prototype, test features, augmented test features) together.
    Khosla et al., 2020 (arXiv:2004.11362) with base temperature = temperature.
    """
    n, v, _ = views.shape
    z = F.normalize(views.transpose(0, 1).reshape(n * v, -1), dim=1)  # (V*N, D), view-major
    sim = z @ z.T / temperature  # (V*N, V*N)
    self_mask = torch.eye(n * v, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    ids = torch.arange(n, device=z.device).repeat(v)
    pos = (ids[:, None] == ids[None, :]) & ~self_mask  # (V*N, V*N)
    return -(log_prob.masked_fill(~pos, 0).sum(1) / pos.sum(1)).mean()


def _optimizer(params: Iterable, name: str, lr: float, momentum: float, weight_decay: float):
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


# ----------------------------------------------------------------------------- base class


class TTAMethod(nn.Module):
    """Wraps a classifier; ``forward(x)`` returns logits and adapts (``steps`` times).

    Subclasses override ``configure_model`` (train/eval modes, which params get gradients),
    ``collect_params`` (what the optimizer updates), ``loss`` and ``forward_and_adapt``.
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
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.model = model if inplace else copy.deepcopy(model)
        if self.needs_norm and not norm_layers(self.model):
            raise ValueError(
                f"{type(self).__name__} adapts normalisation layers, but the model has no "
                "BatchNorm/GroupNorm/LayerNorm layer"
            )
        self.steps = steps
        self.generator = torch.Generator().manual_seed(seed)
        self.configure_model()
        self.optimizer = None
        if self.adapts:
            params = list(self.collect_params())
            if not params:
                raise ValueError(f"{type(self).__name__}: no parameters to adapt in this model")
            self.optimizer = _optimizer(params, optimizer, lr, momentum, weight_decay)
        self.setup()
        self._snapshot = copy.deepcopy(self.state_dict())
        self._opt_snapshot = copy.deepcopy(self.optimizer.state_dict()) if self.optimizer else None
        self._gen_snapshot = self.generator.get_state()

    # -- hooks --------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Tent's setup: train mode; only norm affine params learn; BN uses batch statistics."""
        self.model.train()
        self.model.requires_grad_(False)
        for _, m in norm_layers(self.model):
            m.requires_grad_(True)
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.track_running_stats = False  # batch stats; running buffers left untouched

    def collect_params(self) -> list[nn.Parameter]:
        """Affine weight and bias of every norm layer."""
        return [p for _, m in norm_layers(self.model) for p in m.parameters() if p.requires_grad]

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean prediction entropy (Tent)."""
        return shannon_entropy(logits).mean()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        self.optimizer.zero_grad()
        self.loss(logits).backward()
        self.optimizer.step()
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

    def reset(self) -> None:
        """Restore model, helper modules, optimizer and running state to their built state."""
        self.load_state_dict(self._snapshot)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(self._opt_snapshot)
        self.generator.set_state(self._gen_snapshot)
        self.reset_state()


# ----------------------------------------------------------------------------- methods


@METHODS.register("source")
class Source(TTAMethod):
    """The unadapted source model in eval mode."""

    adapts = False
    needs_norm = False

    def configure_model(self) -> None:
        self.model.eval()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@METHODS.register("bn")
class BatchNormAdapt(Source):
    """BatchNorm with test-batch statistics, nothing learnt (Schneider et al., 2020).

    GroupNorm/LayerNorm layers are batch-agnostic, so on a GN model this equals ``source``.
    """

    needs_norm = True

    def configure_model(self) -> None:
        self.model.eval()
        for _, m in norm_layers(self.model):
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.train()
                m.track_running_stats = False


@METHODS.register("tent")
class Tent(TTAMethod):
    """Entropy minimisation of norm affine params (Wang et al., 2021).

    Defaults: the paper's CIFAR setting, Adam lr 1e-3, one step per batch. As in SAR's code,
    GroupNorm/LayerNorm affine params are adapted too (the original adapts BN only).
    """


@METHODS.register("eata")
class EATA(TTAMethod):
    """Tent on reliable, non-redundant samples, weighted 1/exp(H - e0), plus a Fisher anchor.

    Paper defaults (ImageNet): e0 = 0.4 ln K, d_margin 0.05, fisher_alpha 2000 from 2000 clean
    samples; the CIFAR-10-C benchmark (Doebler et al.'s repo) uses d_margin 0.4, alpha 1,
    Adam 1e-3. ``fisher_data`` (M, C, H, W) clean images; None disables the anchor (ETA).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float = 0.4,
        d_margin: float = 0.05,
        fisher_alpha: float = 2000.0,
        fisher_data: torch.Tensor | None = None,
        fisher_batch_size: int = 64,
        **kw,
    ) -> None:
        self.e_margin, self.d_margin, self.fisher_alpha = e_margin, d_margin, fisher_alpha
        self.fisher_data, self.fisher_batch_size = fisher_data, fisher_batch_size
        self.mean_probs: torch.Tensor | None = None
        self.fishers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(model, **kw)
        self.fisher_data = None  # not kept alive after setup

    def setup(self) -> None:
        """Diagonal Fisher of the adapted params from clean samples with pseudo-labels."""
        if self.fisher_data is None:
            return
        params = dict(self.model.named_parameters())
        names = [n for n, p in params.items() if p.requires_grad]
        acc = {n: torch.zeros_like(params[n]) for n in names}
        batches = self.fisher_data.split(self.fisher_batch_size)
        for xb in batches:
            check_batch(xb)
            self.model.zero_grad()
            logits = self.model(xb)
            F.cross_entropy(logits, logits.argmax(1)).backward()
            for n in names:
                acc[n] += params[n].grad.detach() ** 2
        self.model.zero_grad()
        self.fishers = {n: (acc[n] / len(batches), params[n].detach().clone()) for n in names}

    def reset_state(self) -> None:
        self.mean_probs = None

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        e0 = self.e_margin * math.log(logits.shape[1])
        keep, self.mean_probs = eata_select(logits, e0, self.d_margin, self.mean_probs)
        self.optimizer.zero_grad()
        if keep.any():
            ent = shannon_entropy(logits[keep])
            loss = (ent * torch.exp(-(ent.detach() - e0))).mean()
            params = dict(self.model.named_parameters())
            for n, (fisher, anchor) in self.fishers.items():
                loss = loss + self.fisher_alpha * (fisher * (params[n] - anchor) ** 2).sum()
            loss.backward()
            self.optimizer.step()
        return logits.detach()


@METHODS.register("sar")
class SAR(TTAMethod):
    """Reliable entropy (H < e0) minimised with a sharpness-aware two-step update; recovery.

    Paper defaults: e0 = 0.4 ln K, rho 0.05, SGD lr 0.00025 momentum 0.9, reset when the
    EMA(0.9) of the second-step loss falls below 0.2; norm layers whose names start with an
    ``exclude`` prefix are frozen (the paper's last block: ``layer4`` / ViT ``blocks.9-11``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        e_margin: float = 0.4,
        rho: float = 0.05,
        reset_constant: float = 0.2,
        exclude: Sequence[str] = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm."),
        optimizer: str = "sgd",
        lr: float = 0.00025,
        **kw,
    ) -> None:
        self.e_margin, self.rho, self.reset_constant = e_margin, rho, reset_constant
        self.exclude = tuple(exclude)
        self.ema: float | None = None
        self.recoveries = 0
        super().__init__(model, optimizer=optimizer, lr=lr, **kw)

    def collect_params(self) -> list[nn.Parameter]:
        return [
            p
            for n, m in norm_layers(self.model)
            if not n.startswith(self.exclude)
            for p in m.parameters()
        ]

    def reset_state(self) -> None:
        self.ema = None

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        logits = self.model(x)
        e0 = self.e_margin * math.log(logits.shape[1])
        keep = reliable(logits, e0)
        self.optimizer.zero_grad()
        if not keep.any():
            return logits.detach()
        shannon_entropy(logits[keep]).mean().backward()
        # first step: ascend to w + rho g / ||g||
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        scale = self.rho / (torch.stack([g.norm(2) for g in grads]).norm(2) + 1e-12)
        eps = [g * scale for g in grads]
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.add_(e)
        self.optimizer.zero_grad()
        ent2 = shannon_entropy(self.model(x))[keep]  # full batch: same BN statistics as step 1
        keep2 = ent2.detach() < e0
        if keep2.any():
            loss2 = ent2[keep2].mean()
            loss2.backward()
            value = loss2.item()
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
        # second step: back to w, then the base optimizer step with the gradient at w + eps
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
        if keep2.any():
            self.optimizer.step()
        self.optimizer.zero_grad()
        if self.ema is not None and self.ema < self.reset_constant:
            self.recoveries += 1
            self.reset()
        return logits.detach()


@METHODS.register("deyo")
class DeYO(TTAMethod):
    """Entropy filter (H < 0.5 ln K), PLPD filter (> tau) and weights exp(e0 - H) + exp(PLPD).

    Paper defaults: PLPD from a 4x4 patch-shuffled view, tau_PLPD 0.2 (wild settings),
    e0 = 0.4 ln K, SGD lr 0.00025 momentum 0.9.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        deyo_margin: float = 0.5,
        e_margin: float = 0.4,
        plpd_threshold: float = 0.2,
        patch_grid: int = 4,
        optimizer: str = "sgd",
        lr: float = 0.00025,
        **kw,
    ) -> None:
        self.deyo_margin, self.e_margin = deyo_margin, e_margin
        self.plpd_threshold, self.patch_grid = plpd_threshold, patch_grid
        super().__init__(model, optimizer=optimizer, lr=lr, **kw)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        log_k = math.log(logits.shape[1])
        keep = reliable(logits, self.deyo_margin * log_k)
        self.optimizer.zero_grad()
        if not keep.any():
            return logits.detach()
        with torch.no_grad():
            shuffled = self.model(patch_shuffle(x[keep], self.patch_grid, self.generator))
        score = plpd(logits[keep], shuffled)
        keep2 = score > self.plpd_threshold
        if keep2.any():
            ent = shannon_entropy(logits[keep][keep2])
            w = deyo_weights(ent, score[keep2], self.e_margin * log_k)
            (ent * w).mean().backward()
            self.optimizer.step()
        return logits.detach()


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


@METHODS.register("rmt")
class RMT(TTAMethod):
    """Robust mean teacher: symmetric CE to an EMA teacher on x and an augmented x, a
    contrastive pull to the nearest source prototype, source replay, and a short warm-up.

    Defaults (the paper's CIFAR-10-C setting): Adam lr 1e-3, teacher EMA 0.999, temperature
    0.1, projector width 128, lambda_ce_trg = lambda_cont = lambda_ce_src = 1, 50 warm-up
    steps. ``source_data = (images, labels)``: clean labelled source samples (required);
    source replay and warm-up draw ``source_batch_size`` of them (default: the test batch size,
    64 during warm-up).
    Predictions are student + teacher logits. All parameters are trained.
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
        self.src_x, self.src_y = source_data
        check_batch(self.src_x)
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
        self.model.train()
        self.model.requires_grad_(True)
        for _, m in norm_layers(self.model):
            if isinstance(m, nn.modules.batchnorm._NormBase):
                m.track_running_stats = False
        self.hook = _FeatureHook(self.head)

    def collect_params(self) -> list[nn.Parameter]:
        return [*self.model.parameters(), *self.projector.parameters()]

    def _source_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.source_batch_size or size
        idx = torch.randint(len(self.src_x), (size,), generator=self.generator)
        return self.src_x[idx], self.src_y[idx]

    @torch.no_grad()
    def _update_teacher(self) -> None:
        for t, s in zip(self.teacher.parameters(), self.model.parameters()):
            t.mul_(self.ema).add_(s, alpha=1 - self.ema)

    def setup(self) -> None:
        """Source prototypes (class means of source features), teacher, warm-up."""
        with torch.no_grad():
            self.model.eval()
            feats = torch.cat([self._features(xb) for xb in self.src_x.split(500)])  # (M, D)
            self.model.train()
        k = self.head.out_features
        protos = torch.stack([feats[self.src_y == c].mean(0) for c in range(k)])  # (K, D)
        if not torch.isfinite(protos).all():
            raise ValueError("rmt: source_data must contain every class (empty prototype)")
        self.register_buffer("prototypes", protos)
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        base_lr = [g["lr"] for g in self.optimizer.param_groups]
        for i in range(self.warmup_steps):
            for g, lr in zip(self.optimizer.param_groups, base_lr):
                g["lr"] = lr * (i + 1) / self.warmup_steps
            xs, _ = self._source_batch(64)
            with torch.enable_grad():
                loss = symmetric_cross_entropy(self.model(xs), self.teacher(xs)).mean()
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
        u = torch.rand(n, 6, generator=g)
        ang = (u[:, 0] - 0.5) * math.radians(16)  # +-8 degrees
        scale = 0.9 + 0.2 * u[:, 1]
        flip = torch.where(u[:, 2] < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = torch.cos(ang) / scale * flip
        theta[:, 0, 1] = -torch.sin(ang) / scale
        theta[:, 1, 0] = torch.sin(ang) / scale * flip
        theta[:, 1, 1] = torch.cos(ang) / scale
        theta[:, :, 2] = (u[:, 3:5] - 0.5) / 8  # +-1/16 of the image
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        y = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        mean = y.mean(dim=(1, 2, 3), keepdim=True)
        y = (y - mean) * (0.8 + 0.4 * u[:, 5]).view(n, 1, 1, 1) + mean
        return (y + 0.005 * torch.randn(y.shape, generator=g)).clamp(0, 1)

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
        cont = prototype_contrastive_loss(self.projector(views), self.temperature)
        sce = 0.5 * symmetric_cross_entropy(logits, logits_t)
        sce = sce + 0.5 * symmetric_cross_entropy(logits_aug, logits_t)
        self.optimizer.zero_grad()
        (lam_trg * sce.mean() + lam_cont * cont).backward()
        self.optimizer.step()
        self._update_teacher()
        if lam_src > 0:
            xs, ys = self._source_batch(len(x))
            self.optimizer.zero_grad()
            (lam_src * F.cross_entropy(self.model(xs), ys)).backward()
            self.optimizer.step()
        self.optimizer.zero_grad()
        return (logits + logits_t).detach()
