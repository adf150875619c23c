"""EATA: efficient anti-forgetting test-time adaptation (Niu et al., 2022, arXiv:2204.02610)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.entropy import shannon_entropy
from projects.tta.methods.base import METHODS, TTAMethod, check_batch, check_number, reliable

__all__ = ["EATA", "eata_select", "eata_weights"]


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


def eata_weights(entropy: torch.Tensor, e0: float) -> torch.Tensor:
    """EATA's sample weights 1 / exp(H - e0), no gradient: (N,) -> (N,). Niu et al., 2022, eq. 9."""
    return torch.exp(-(entropy.detach() - e0))


@METHODS.register(name="eata", paper="Niu et al. 2022, arXiv:2204.02610")
class EATA(TTAMethod):
    """Tent on reliable, non-redundant samples, weighted 1/exp(H - e0), plus a Fisher anchor.

    Loss on the kept samples S: ``mean_S w H + fisher_alpha sum_i F_i (theta_i - theta0_i)^2``
    with F the diagonal Fisher of the adapted params on clean samples with pseudo-labels and
    theta0 their values at build time. Paper defaults (ImageNet): e0 = 0.4 ln K, d_margin 0.05,
    fisher_alpha 2000 from 2000 clean samples; the CIFAR-10-C benchmark (Doebler et al.'s repo)
    uses d_margin 0.4, alpha 1, Adam 1e-3. ``fisher_data`` (M, C, H, W) clean images; None
    disables the anchor (ETA).
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
        check_number("EATA", "e_margin", e_margin, 0, math.inf, open_low=True, open_high=True)
        check_number("EATA", "d_margin", d_margin, 0, math.inf, open_low=True)
        check_number("EATA", "fisher_alpha", fisher_alpha, 0, math.inf, open_high=True)
        check_number("EATA", "fisher_batch_size", fisher_batch_size, 1, integer=True)
        if fisher_data is not None:
            check_batch(fisher_data, "EATA: fisher_data")
        self.e_margin, self.d_margin, self.fisher_alpha = e_margin, d_margin, fisher_alpha
        self.fisher_data, self.fisher_batch_size = fisher_data, fisher_batch_size
        self.fisher_names: list[str] = []
        super().__init__(model, **kw)
        self.register_buffer("mean_probs", None, persistent=False)  # (K,) EMA, None at start
        self.fisher_data = None  # not kept alive after setup

    def setup(self) -> None:
        """Diagonal Fisher of the adapted params from clean samples with pseudo-labels; stored
        with the anchor values as buffers ``fisher_<i>``, ``anchor_<i>`` (moved by ``.to``)."""
        if self.fisher_data is None:
            return
        params = dict(self.model.named_parameters())
        names = [n for n, p in params.items() if p.requires_grad]
        acc = {n: torch.zeros_like(params[n]) for n in names}
        batches = self.fisher_data.split(self.fisher_batch_size)
        for xb in batches:
            self.model.zero_grad()
            logits = self.model(self.to_model(xb))
            F.cross_entropy(logits, logits.argmax(1)).backward()
            for n in names:
                acc[n] += params[n].grad.detach() ** 2
        self.model.zero_grad()
        self.fisher_names = names
        for i, n in enumerate(names):
            self.register_buffer(f"fisher_{i}", acc[n] / len(batches))
            self.register_buffer(f"anchor_{i}", params[n].detach().clone())

    @property
    def fishers(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Parameter name -> (diagonal Fisher, anchor value), both shaped like the parameter."""
        return {
            n: (getattr(self, f"fisher_{i}"), getattr(self, f"anchor_{i}"))
            for i, n in enumerate(self.fisher_names)
        }

    def reset_state(self) -> None:
        self.mean_probs = None

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        e0 = self.e_margin * math.log(logits.shape[1])
        keep, self.mean_probs = eata_select(logits, e0, self.d_margin, self.mean_probs)
        self.optimizer.zero_grad()
        if keep.any():
            ent = shannon_entropy(logits[keep])
            loss = (ent * eata_weights(ent, e0)).mean()
            params = dict(self.model.named_parameters())
            for n, (fisher, anchor) in self.fishers.items():
                loss = loss + self.fisher_alpha * (fisher * (params[n] - anchor) ** 2).sum()
            loss.backward()
            self.optimizer.step()
            self.last_loss = loss.detach()
        return logits.detach()
