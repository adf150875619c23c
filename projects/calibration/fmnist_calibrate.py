"""Stage calibration-fmnist-calibrate: every post-hoc calibrator on every saved Fashion-MNIST run.

Reads the logits of stage calibration-fmnist-train (no retraining), fits each calibrator of
``core.calibration.CALIBRATORS`` on the held-out calibration split, and scores accuracy, ECE
(equal-width bins), adaptive ECE (equal-mass bins), NLL and Brier on the clean test set and on
Fashion-MNIST-C at each severity. The label-noise runs get the Chidambaram & Ge 2024 comparison
(ERM, ERM + TS, mixup, mixup + TS). Writes under ``<results>``: ``runs.json`` (per run),
``metrics.json`` (mean / std over seeds), ``metrics.csv``, ``noise.json`` and reliability
diagrams ``reliability/<loss>_<calibrator>_<set>.png`` (seed of the first run).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.calibration import (
    CALIBRATORS,
    CACalibrator,
    adaptive_calibration_error,
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
)
from core.calibration.plots import reliability_diagram
from core.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from projects.calibration.fmnist_train import N_CLASSES, jobs, one_thread, run_name
from projects.calibration.train import load_params

METRICS = ("accuracy", "ece", "adaptive_ece", "nll", "brier")


def score(probs: Tensor, labels: Tensor, n_bins: int) -> dict[str, float]:
    """The five metrics of probabilities (N, C) against labels (N,), in float64."""
    probs = probs.double()
    return {
        "accuracy": float(probs.argmax(1).eq(labels).double().mean()),
        "ece": float(expected_calibration_error(probs, labels, n_bins)),
        "adaptive_ece": float(adaptive_calibration_error(probs, labels, n_bins)),
        "nll": float(negative_log_likelihood(probs, labels)),
        "brier": float(brier_score(probs, labels)),
    }


def calibrated_probs(
    sets: dict[str, dict[str, Tensor]],
    names: list[str],
    views: list[str],
    ca_epochs: int,
    ca_options: dict[str, dict[str, Any]],
) -> dict[str, dict[str, Tensor]]:
    """{calibrator: {set: probs (N, C)}} with "none" the raw softmax; each calibrator is fitted on
    the "cal" set's logits and applied to every other set. A name in ``ca_options`` is a
    ``CACalibrator`` with those options, fitted on the (V, N, C) view logits."""
    cal = sets["cal"]
    targets = {k: v for k, v in sets.items() if k != "cal"}
    out = {"none": {k: v["views"][0].double().softmax(1) for k, v in targets.items()}}
    for name in names:
        if name in ca_options:
            calib = CACalibrator(N_CLASSES, views=views, epochs=ca_epochs, **ca_options[name])
            calib.fit(cal["views"], cal["labels"])
            inputs = {k: v["views"] for k, v in targets.items()}
        else:
            calib = CALIBRATORS.build(name).fit(cal["views"][0], cal["labels"])
            inputs = {k: v["views"][0] for k, v in targets.items()}
        with torch.no_grad():
            out[name] = {k: calib(x).double().softmax(1) for k, x in inputs.items()}
    return out


def mean_std(runs: list[dict[str, float]]) -> dict[str, float]:
    """{metric_mean, metric_std} over runs (std 0 for one run)."""
    out = {}
    for metric in runs[0]:
        values = [r[metric] for r in runs]
        out[f"{metric}_mean"] = statistics.fmean(values)
        out[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    with one_thread():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="projects/calibration/params.yaml")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cfg = params["fmnist"]
    runs_dir, results = Path(cfg["paths"]["runs"]), Path(cfg["paths"]["results"])
    n_bins, first_seed = cfg["n_bins"], cfg["seeds"][0]
    per_run: dict[str, Any] = {}  # run -> calibrator -> set -> metrics
    for loss, seed, noise in sorted(jobs(params)):
        saved = torch.load(runs_dir / run_name(loss, seed, noise) / "logits.pt", weights_only=True)
        sets = saved["sets"]
        names = cfg["calibrators"] if noise == 0 else ["temperature"]
        probs = calibrated_probs(sets, names, list(saved["views"]), cfg["ca_epochs"], cfg["ca"])
        per_run[run_name(loss, seed, noise)] = {
            c: {k: score(p, sets[k]["labels"], n_bins) for k, p in by_set.items()}
            for c, by_set in probs.items()
        }
        if noise == 0 and seed == first_seed and loss in cfg["reliability"]:
            for c in ("none", "temperature"):
                for k, p in probs[c].items():
                    title = f"{loss} + {c}, {k}, seed {seed}"
                    fig = reliability_diagram(p, sets[k]["labels"], n_bins, title)
                    atomic_write_bytes(results / "reliability" / f"{loss}_{c}_{k}.png", _png(fig))
        print(run_name(loss, seed, noise), "done", flush=True)

    metrics: dict[str, Any] = {}  # loss -> calibrator -> set -> {metric_mean, metric_std}
    rows = []
    for loss in cfg["losses"]:
        runs = [per_run[run_name(loss, s)] for s in cfg["seeds"]]
        metrics[loss] = {
            c: {k: mean_std([r[c][k] for r in runs]) for k in by_set}
            for c, by_set in runs[0].items()
        }
        for c, by_set in metrics[loss].items():
            for k, m in by_set.items():
                rows.append({"loss": loss, "calibrator": c, "set": k, **m})
    noise_metrics: dict[str, Any] = {}  # rate -> "loss" / "loss+ts" -> {metric_mean, std}
    for rate in cfg["label_noise"]["rates"]:
        noise_metrics[f"{float(rate):g}"] = {
            f"{loss}{suffix}": mean_std(
                [per_run[run_name(loss, s, float(rate))][c]["test"] for s in cfg["seeds"]]
            )
            for loss in cfg["label_noise"]["losses"]
            for suffix, c in (("", "none"), ("+ts", "temperature"))
        }
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(results / "metrics.csv", buf.getvalue())
    atomic_write_json(results / "runs.json", per_run)
    atomic_write_json(results / "noise.json", noise_metrics)
    atomic_write_json(results / "metrics.json", metrics)


if __name__ == "__main__":
    main()
