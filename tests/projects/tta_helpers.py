"""A tiny float64 classifier and its hand-written forward, for pinning TTA update rules.

``tiny_model()`` is Flatten -> Linear(16, 6) -> BatchNorm1d(6) -> ReLU -> Linear(6, K) on
(N, 1, 4, 4) images; ``forward(params, x)`` recomputes it from a parameter dict with the
batch-statistics BatchNorm written out, so a method's step can be checked against the paper's
rule with gradients from autograd on this independent expression.
"""

import torch
import torch.nn.functional as F
from torch import nn

K = 4
BN_EPS = 1e-5
BN = ("2.weight", "2.bias")  # the norm layer's affine params


def tiny_model(seed: int = 0) -> nn.Sequential:
    """Random float64 weights large enough that entropies spread; running stats far from the
    test batches' statistics, so using them by mistake shows."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, K)
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        model[2].weight.mul_(0.5).add_(1.5)
        model[4].weight.mul_(2.0)
        model[2].running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64) + 2)
        model[2].running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) * 4 + 0.5)
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    """(n, 1, 4, 4) float64 in [0, 1]."""
    return torch.rand(
        n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def params(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def leaves(p: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """``p`` with the tensors named in ``names`` made autograd leaves."""
    return {n: (v.clone().requires_grad_() if n in names else v) for n, v in p.items()}


def forward(p: dict[str, torch.Tensor], x: torch.Tensor, running=None):
    """Features (N, 6) and logits (N, K) of the tiny model; BatchNorm with the batch's mean and
    biased variance, or with ``running = (mean, var)``."""
    h = x.flatten(1) @ p["1.weight"].T + p["1.bias"]
    mean, var = (h.mean(0), h.var(0, unbiased=False)) if running is None else running
    feats = F.relu((h - mean) / torch.sqrt(var + BN_EPS) * p["2.weight"] + p["2.bias"])
    return feats, feats @ p["4.weight"].T + p["4.bias"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row Shannon entropy -sum p log p: (N, K) -> (N,)."""
    p = logits.softmax(1)
    return -(p * p.log()).sum(1)


def between(values: torch.Tensor, k: int) -> float:
    """A threshold between the k-th and (k+1)-th smallest of ``values`` (k from 1)."""
    s = values.detach().sort().values
    return float((s[k - 1] + s[k]) / 2)


def sgd_step(p: dict[str, torch.Tensor], loss: torch.Tensor, names, lr: float) -> dict:
    """Plain gradient descent on the leaves ``names`` of ``p``: a new parameter dict."""
    grads = torch.autograd.grad(loss, [p[n] for n in names])
    out = {n: v.detach().clone() for n, v in p.items()}
    for n, g in zip(names, grads):
        out[n] = out[n] - lr * g
    return out


def assert_params(module: nn.Module, expected: dict[str, torch.Tensor], names=None) -> None:
    """Every parameter of ``module`` (or those in ``names``) equals ``expected`` in float64."""
    actual = dict(module.named_parameters())
    for n in names or actual:
        torch.testing.assert_close(actual[n].detach(), expected[n], rtol=1e-10, atol=1e-12, msg=n)
