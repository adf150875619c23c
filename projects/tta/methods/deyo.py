"""DeYO: destroy your object, entropy + PLPD (Lee et al., 2024, arXiv:2403.07366)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.entropy import shannon_entropy
from core.losses.consistency import plpd
from projects.tta.methods.base import METHODS, TTAMethod, check_number, reliable

__all__ = ["DeYO", "deyo_weights", "patch_shuffle"]


def patch_shuffle(x: torch.Tensor, grid: int, generator: torch.Generator | None = None):
    """Cut each image into ``grid x grid`` patches and shuffle them (DeYO's object-destroying view).

    (N, C, H, W) -> (N, C, H, W); sizes not divisible by ``grid`` are resized there and back.
    The permutation is drawn on the CPU (``generator``), so every device shuffles alike.
    """
    if not torch.is_tensor(x) or x.dim() != 4:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"patch_shuffle: x must be images (N, C, H, W), got {shape}")
    n, c, h, w = x.shape
    check_number("patch_shuffle", "grid", grid, 1, min(h, w), integer=True)
    hh, ww = (h // grid) * grid, (w // grid) * grid
    y = x if (hh, ww) == (h, w) else F.interpolate(x, size=(hh, ww), mode="bilinear")
    ph, pw = hh // grid, ww // grid
    p = y.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, -1)
    perm = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1)  # (N, P)
    p = p[torch.arange(n, device=x.device)[:, None], perm.to(x.device)]
    y = p.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hh, ww)
    return y if (hh, ww) == (h, w) else F.interpolate(y, size=(h, w), mode="bilinear")


def deyo_weights(entropy: torch.Tensor, plpd_: torch.Tensor, e0: float) -> torch.Tensor:
    """DeYO sample weights exp(e0 - H) + exp(PLPD), no gradient: (N,), (N,) -> (N,).

    Lee et al., 2024, eq. 7.
    """
    return torch.exp(e0 - entropy.detach()) + torch.exp(plpd_.detach())


@METHODS.register(name="deyo", paper="Lee et al. 2024, arXiv:2403.07366")
class DeYO(TTAMethod):
    """Entropy filter (H < 0.5 ln K), PLPD filter (> tau) and weights exp(e0 - H) + exp(PLPD).

    PLPD compares the prediction on x with the one on its patch-shuffled view (the model in
    train mode on the kept samples only, as in the authors' code). Paper defaults: 4x4 patch
    shuffle, tau_PLPD 0.2 (wild settings), e0 = 0.4 ln K, SGD lr 0.00025 momentum 0.9.
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
        inf = math.inf
        check_number("DeYO", "deyo_margin", deyo_margin, 0, inf, open_low=True, open_high=True)
        check_number("DeYO", "e_margin", e_margin, 0, inf, open_high=True)
        check_number(
            "DeYO", "plpd_threshold", plpd_threshold, -inf, 1, open_low=True, open_high=True
        )
        check_number("DeYO", "patch_grid", patch_grid, 1, integer=True)
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
            loss = (ent * w).mean()
            loss.backward()
            self.optimizer.step()
            self.last_loss = loss.detach()
        return logits.detach()
