"""Stage calibration-train: ERM (+ temperature scaling) vs mixup on two overlapping Gaussians.

Chidambaram & Ge 2024, "On the Limitations of Temperature Scaling for Distributions with
Overlaps" (ICLR, arXiv 2306.00740), synthetic experiment: class 0 ~ N(0, I), class 1 ~
N(mean * 1, I) in R^dim; the smaller the mean, the larger the overlap. For every mean and run we
train an MLP by ERM and by mixup, fit temperature scaling on a held-out part of the training
split, and report test NLL, ECE and ACE (top-label, equal-mass bins) for each model with and
without TS. Writes ``<results>/metrics.json`` (mean and std over runs) and ``<results>/runs.json``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from core.calibration import (
    TemperatureScaling,
    adaptive_calibration_error,
    expected_calibration_error,
)
from core.losses.calibration_losses import mixup_batch, mixup_cross_entropy
from core.training import seed_everything
from core.utils.io import atomic_write_json

METHODS = ("erm", "mixup")
METRICS = ("accuracy", "nll", "ece", "ace")


def load_params(path: str | Path = "projects/calibration/params.yaml") -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def make_data(mean: float, dim: int, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n points, half per class: x ~ N(y * mean * 1, I) in R^dim. Returns x (n, dim), y (n,)."""
    y = torch.arange(n) % 2
    x = torch.randn(n, dim, generator=generator) + mean * y[:, None].float()
    perm = torch.randperm(n, generator=generator)
    return x[perm], y[perm]


def split(n: int, test_fraction: float, ts_fraction: float, generator: torch.Generator):
    """Index sets (train, ts, test): test_fraction of all for test, ts_fraction of the rest for TS."""
    perm = torch.randperm(n, generator=generator)
    n_test = round(n * test_fraction)
    test, rest = perm[:n_test], perm[n_test:]
    n_ts = round(len(rest) * ts_fraction)
    return rest[n_ts:], rest[:n_ts], test


def mlp(dim: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(dim, width), nn.ReLU()]
        dim = width
    return nn.Sequential(*layers, nn.Linear(dim, 2))


def train(
    x: Tensor, y: Tensor, method: str, params: dict[str, Any], generator: torch.Generator
) -> nn.Module:
    """Adam on CE (ERM) or on mixup's soft-target CE, full epochs of shuffled mini-batches."""
    model = mlp(x.shape[1], params["model"]["hidden"])
    opt = torch.optim.Adam(model.parameters(), lr=params["optim"]["lr"])
    bs = params["optim"]["batch_size"]
    for _ in range(params["optim"]["epochs"]):
        for idx in torch.randperm(len(x), generator=generator).split(bs):
            xb, yb = x[idx], y[idx]
            if method == "mixup":
                xb, soft, _ = mixup_batch(
                    xb, yb, 2, alpha=params["mixup"]["alpha"], generator=generator
                )
                loss = mixup_cross_entropy(model(xb), soft)
            else:
                loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def evaluate(logits: Tensor, labels: Tensor, n_bins: int) -> dict[str, float]:
    """Test accuracy, NLL (from logits, float64), ECE and ACE (equal-mass bins), both 15 bins."""
    logits = logits.double()
    probs = logits.softmax(dim=1)
    return {
        "accuracy": float(logits.argmax(1).eq(labels).double().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": float(expected_calibration_error(probs, labels, n_bins)),
        "ace": float(adaptive_calibration_error(probs, labels, n_bins)),
    }


def run_one(mean: float, seed: int, params: dict[str, Any]) -> dict[str, dict[str, float]]:
    """One dataset draw, both training methods, each with and without TS: {variant: metrics}."""
    seed_everything(seed)
    g = torch.Generator().manual_seed(seed)
    d = params["data"]
    x, y = make_data(mean, d["dim"], d["n"], g)
    tr, ts, te = split(d["n"], d["test_fraction"], d["ts_fraction"], g)
    out = {}
    for method in METHODS:
        model = train(x[tr], y[tr], method, params, g)
        with torch.no_grad():
            ts_logits, test_logits = model(x[ts]), model(x[te])
        scaler = TemperatureScaling().fit(ts_logits, y[ts])
        n_bins = params["metrics"]["n_bins"]
        out[method] = evaluate(test_logits, y[te], n_bins)
        with torch.no_grad():
            out[f"{method}+ts"] = evaluate(scaler(test_logits), y[te], n_bins)
        out[f"{method}+ts"]["temperature"] = float(scaler.temperature)
    return out


def summarise(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{variant: {metric_mean, metric_std}} over runs (std 0 for a single run)."""
    summary = {}
    for variant, first in runs[0].items():
        summary[variant] = {}
        for metric in first:
            values = [r[variant][metric] for r in runs]
            summary[variant][f"{metric}_mean"] = statistics.fmean(values)
            summary[variant][f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="projects/calibration/params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    results = Path(params["paths"]["results"])
    metrics, per_run = {}, {}
    for i, mean in enumerate(params["data"]["means"]):
        key = f"mean_{mean}"
        runs = [run_one(mean, params["seed"] + 1000 * i + r, params) for r in range(params["runs"])]
        per_run[key], metrics[key] = runs, summarise(runs)
        print(key, {v: round(m["ece_mean"], 4) for v, m in metrics[key].items()}, flush=True)
    atomic_write_json(results / "runs.json", per_run)
    atomic_write_json(results / "metrics.json", metrics)


if __name__ == "__main__":
    # tiny matmuls: extra intra-op threads only add sync cost (34x slower on a busy 2-core box)
    torch.set_num_threads(1)
    main()
