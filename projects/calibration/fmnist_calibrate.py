"""Stage calibration-fmnist-calibrate: every post-hoc calibrator on every saved Fashion-MNIST run.

Reads the logits of stage calibration-fmnist-train (no retraining), fits each calibrator of
``core.calibration.CALIBRATORS`` (and the CA columns, Liu et al. 2024, on the view logits) on the
held-out calibration split, and scores accuracy, ECE (equal-width bins), adaptive ECE
(equal-mass bins), NLL and Brier on the clean test set and on Fashion-MNIST-C at each severity;
the label-noise runs get temperature scaling only (Chidambaram & Ge 2024), and the noise
study's losses also temperature scaling fitted as the authors' code fits it (``crosscheck.py``). Writes under
``<paths.results>/fmnist``: ``runs.json`` (run -> calibrator -> set -> metrics, plus the train
fit and the fitted temperatures), ``metrics.csv`` (the same, one row per run, calibrator and set), ``curves.csv`` (per-epoch
training loss and validation ECE / NLL / accuracy of the first seed) and reliability diagrams
``reliability/<loss>_<calibrator>_<set>.png`` (first seed).
"""

from __future__ import annotations

import csv
import io
import json
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
from core.engine.config import entry_parser, parse_entry
from core.engine.progress import RunProgress
from core.report.figures import save_figure
from core.utils.io import atomic_write_json, atomic_write_text
from projects.calibration.crosscheck import authors_temperature
from projects.calibration.runs import fmnist_dir, jobs, run_name

DEFAULT_PARAMS = "projects/calibration/params.yaml"
METRICS = ("accuracy", "ece", "adaptive_ece", "nll", "brier")
AUTHORS_TS = "temperature_authors"
CURVES = ("train_loss", "val_ece", "val_nll", "val_acc")


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
) -> tuple[dict[str, dict[str, Tensor]], dict[str, float]]:
    """({calibrator: {set: probs (N, C)}}, {temperature calibrator: T}) with "none" the raw
    softmax; each calibrator is fitted on
    the "cal" set's logits and applied to every other set. A name in ``ca_options`` is a
    ``CACalibrator`` with those options, fitted on the (V, N, C) view logits; ``AUTHORS_TS`` is
    temperature scaling fitted as in Chidambaram & Ge's code (``crosscheck.py``)."""
    cal = sets["cal"]
    n_classes = cal["views"].shape[-1]
    targets = {k: v for k, v in sets.items() if k != "cal"}
    out = {"none": {k: v["views"][0].double().softmax(1) for k, v in targets.items()}}
    temps: dict[str, float] = {}
    for name in names:
        if name == AUTHORS_TS:  # the cross-check: Chidambaram & Ge's temperature fit
            t = temps[name] = authors_temperature(cal["views"][0], cal["labels"])
            out[name] = {k: (v["views"][0].double() / t).softmax(1) for k, v in targets.items()}
            continue
        if name in ca_options:
            calib = CACalibrator(n_classes, views=views, epochs=ca_epochs, **ca_options[name])
            calib.fit(cal["views"], cal["labels"])
            inputs = {k: v["views"] for k, v in targets.items()}
        else:
            calib = CALIBRATORS.build(name).fit(cal["views"][0], cal["labels"])
            inputs = {k: v["views"][0] for k, v in targets.items()}
        with torch.no_grad():
            out[name] = {k: calib(x).double().softmax(1) for k, x in inputs.items()}
        if name == "temperature":
            temps[name] = float(calib.temperature)
    return out, temps


def curves_csv(records: dict[str, dict[str, Any]]) -> str:
    """Per-epoch curves of the given runs: columns epoch, <run>_<quantity> (empty when a run has
    no value at that epoch)."""
    epochs = max((len(r["history"]) for r in records.values()), default=0)
    header = ["epoch"] + [f"{name}_{q}" for name in records for q in CURVES]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for e in range(epochs):
        row: list[Any] = [e + 1]
        for r in records.values():
            h = r["history"][e] if e < len(r["history"]) else {}
            row += [f"{h[q]:.6g}" if q in h else "" for q in CURVES]
        writer.writerow(row)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    args, params, mach = parse_entry(parser, argv)
    torch.set_num_threads(mach.threads)
    cfg = params["fmnist"]
    runs_dir, results = fmnist_dir(params), Path(params["paths"]["results"]) / "fmnist"
    n_bins, first_seed = cfg["n_bins"], cfg["seeds"][0]
    per_run: dict[str, Any] = {}  # run -> calibrator -> set -> metrics
    firsts: dict[str, dict[str, Any]] = {}  # first-seed run -> its training record
    rows = []
    todo = sorted(jobs(cfg))
    progress = RunProgress(len(todo), "fmnist-calibrate")
    for loss, seed, noise in todo:
        name = run_name(loss, seed, noise)
        saved = torch.load(runs_dir / name / "logits.pt", weights_only=True)
        record = json.loads((runs_dir / name / "result.json").read_text(encoding="utf-8"))
        sets = saved["sets"]
        names = cfg["calibrators"] if noise == 0 else ["temperature"]
        if loss in cfg["label_noise"]["losses"]:
            names = [*names, AUTHORS_TS]
        probs, temps = calibrated_probs(
            sets, names, list(saved["views"]), cfg["ca_epochs"], cfg["ca"]
        )
        per_run[name] = {
            c: {k: score(p, sets[k]["labels"], n_bins) for k, p in by_set.items()}
            for c, by_set in probs.items()
        }
        per_run[name]["fit"] = {k: record[k] for k in ("train_acc", "train_nll")}
        per_run[name]["T"] = temps
        for c, by_set in per_run[name].items():
            if c not in ("fit", "T"):
                for k, m in by_set.items():
                    rows.append({"run": name, "calibrator": c, "set": k, **m})
        if seed == first_seed:
            firsts[f"{loss}_n{noise:g}".replace(".", "_")] = record
        if noise == 0 and seed == first_seed and loss in cfg["reliability"]:
            for c in ("none", "temperature"):
                for k in ("test", f"c{max(cfg['ood']['severities'])}"):
                    title = f"{loss} + {c}, {k}, seed {seed}"
                    fig = reliability_diagram(probs[c][k], sets[k]["labels"], n_bins, title)
                    save_figure(fig, results / "reliability" / f"{loss}_{c}_{k}.png", dpi=80)
        ece = per_run[name]["none"]["test"]["ece"]
        progress.update(name, f"test ECE {100 * ece:.2f} %")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(
        {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows
    )
    atomic_write_text(results / "metrics.csv", buf.getvalue())
    atomic_write_json(results / "runs.json", per_run)
    atomic_write_text(results / "curves.csv", curves_csv(firsts))


if __name__ == "__main__":
    main()
