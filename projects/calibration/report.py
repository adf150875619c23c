"""Stage calibration-report: the README results tables from the metrics of the other stages.

Writes the ``<!-- results:start/end -->`` section of projects/calibration/README.md: the
synthetic study (``<results>/metrics.json``), then the Fashion-MNIST study
(``<fmnist results>/metrics.json``, ``noise.json``, reliability diagrams). The prose around it
is hand-written.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from core.utils.io import replace_marked_section
from projects.calibration.train import load_params

VARIANTS = (("erm", "ERM"), ("erm+ts", "ERM + TS"), ("mixup", "Mixup"), ("mixup+ts", "Mixup + TS"))
COLUMNS = (
    ("accuracy", "Acc %", 100),
    ("nll", "NLL", 1),
    ("ece", "ECE %", 100),
    ("ace", "ACE %", 100),
)


def table(metrics: dict) -> str:
    """Markdown table: one row per (mean, variant), mean +- std over runs."""
    head = "| mean (overlap) | method | " + " | ".join(c[1] for c in COLUMNS) + " | T (TS) |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for key, variants in metrics.items():
        mean = key.removeprefix("mean_")
        for variant, label in VARIANTS:
            m = variants[variant]
            cells = [f"{s * m[f'{c}_mean']:.2f} ± {s * m[f'{c}_std']:.2f}" for c, _, s in COLUMNS]
            temp = f"{m['temperature_mean']:.2f}" if "temperature_mean" in m else ""
            lines.append(f"| {mean} | {label} | " + " | ".join(cells) + f" | {temp} |")
    return "\n".join(lines)


FMNIST_SETS = (("test", "clean test"), ("c3", "FMNIST-C severity 3"), ("c5", "FMNIST-C severity 5"))
FMNIST_METRICS = (
    ("ece", "ECE % (15 equal-width bins)", 100),
    ("adaptive_ece", "adaptive ECE % (15 equal-mass bins)", 100),
    ("nll", "NLL", 1),
    ("brier", "Brier", 1),
)


def _cell(m: dict, metric: str, scale: float) -> str:
    return f"{scale * m[f'{metric}_mean']:.2f} ± {scale * m[f'{metric}_std']:.2f}"


def fmnist_tables(metrics: dict, calibrators: list[str]) -> str:
    """Accuracy per (loss, set) uncalibrated, then per set and metric a loss x calibrator table."""
    columns = ["none", *calibrators]
    parts = [
        "Accuracy % (uncalibrated; temperature scaling and CA keep the argmax, the other "
        "calibrators may move it: see metrics.csv)\n",
        "| loss | " + " | ".join(label for _, label in FMNIST_SETS) + " |",
        "|---|" + "---|" * len(FMNIST_SETS),
    ]
    for loss, by_cal in metrics.items():
        cells = [_cell(by_cal["none"][k], "accuracy", 100) for k, _ in FMNIST_SETS]
        parts.append(f"| {loss} | " + " | ".join(cells) + " |")
    for key, set_label in FMNIST_SETS:
        for metric, label, scale in FMNIST_METRICS:
            parts += [
                f"\n{label}, {set_label}\n",
                "| loss | " + " | ".join(columns) + " |",
                "|---|" + "---|" * len(columns),
            ]
            for loss, by_cal in metrics.items():
                cells = [_cell(by_cal[c][key], metric, scale) for c in columns]
                parts.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(parts)


def noise_table(noise: dict) -> str:
    """Label-noise variant: one row per (noise rate, method), test metrics mean ± std."""
    cols = (("accuracy", "Acc %", 100), ("nll", "NLL", 1), ("ece", "ECE %", 100))
    cols += (("adaptive_ece", "adaptive ECE %", 100), ("brier", "Brier", 1))
    lines = [
        "| noise | method | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for rate, methods in noise.items():
        for method, m in methods.items():
            cells = [_cell(m, c, s) for c, _, s in cols]
            lines.append(f"| {rate} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def claim_check(noise: dict) -> str:
    """The paper's claim read off the noise table: does ERM + TS's ECE grow with the noise rate,
    and does mixup (without TS) beat ERM + TS at each rate? Computed, never hand-written."""
    rates = list(noise)
    ts = [noise[r]["erm+ts"]["ece_mean"] for r in rates]
    grows = all(b > a for a, b in zip(ts, ts[1:]))
    beats = [r for r in rates if noise[r]["mixup"]["ece_mean"] < noise[r]["erm+ts"]["ece_mean"]]
    return (
        f"Check (means over seeds): ERM + TS test ECE at noise {', '.join(rates)} = "
        f"{', '.join(f'{100 * v:.2f}%' for v in ts)}: "
        f"{'grows' if grows else 'does not grow'} monotonically with the noise. "
        f"Mixup without TS has a lower ECE than ERM + TS at noise "
        f"{', '.join(beats) if beats else 'none of the rates'}."
    )


def reliability_grid(params: dict, readme: Path) -> str:
    """Markdown table of the first seed's reliability diagrams (clean test and severity 5),
    linked relative to the README."""
    base = os.path.relpath(Path(params["fmnist"]["paths"]["results"]), readme.parent)
    heads = [(c, k) for k in ("test", "c5") for c in ("none", "temperature")]
    lines = [
        "| loss | " + " | ".join(f"{c}, {k}" for c, k in heads) + " |",
        "|---|" + "---|" * len(heads),
    ]
    for loss in params["fmnist"]["reliability"]:
        imgs = [f'<img src="{base}/reliability/{loss}_{c}_{k}.png" width="170">' for c, k in heads]
        lines.append(f"| {loss} | " + " | ".join(imgs) + " |")
    return "\n".join(lines)


def fmnist_section(params: dict, readme: Path) -> str:
    """The Fashion-MNIST part of the README results section."""
    cfg = params["fmnist"]
    results = Path(cfg["paths"]["results"])
    metrics = json.loads((results / "metrics.json").read_text())
    noise = json.loads((results / "noise.json").read_text())
    setup = (
        f"Fashion-MNIST: SmallCNN {cfg['model']['channels']} / {cfg['model']['hidden']}, "
        f"{cfg['train_size']} training images, {cfg['optim']['epochs']} epochs, "
        f"{len(cfg['seeds'])} seeds (mean ± std); calibrators fitted on {cfg['cal_size']} "
        f"held-out training images; FMNIST-C: {cfg['ood']['per_corruption']} test images per "
        f"corruption x 19 corruptions, pooled per severity."
    )
    return "\n\n".join(
        [
            "### Fashion-MNIST: training losses x post-hoc calibrators",
            setup,
            fmnist_tables(metrics, cfg["calibrators"]),
            "### Fashion-MNIST label-noise variant (ERM + TS vs mixup)",
            "Symmetric label noise on training, calibration and test labels (the noisy "
            "distribution is the one with class overlap); noise 0 reuses the main runs.",
            noise_table(noise),
            claim_check(noise),
            "### Reliability diagrams (seed " + str(cfg["seeds"][0]) + ")",
            reliability_grid(params, readme),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="projects/calibration/params.yaml")
    parser.add_argument("--readme", default="projects/calibration/README.md")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    metrics = json.loads((Path(params["paths"]["results"]) / "metrics.json").read_text())
    runs, d = params["runs"], params["data"]
    body = (
        "### Synthetic study (two overlapping Gaussians)\n\n"
        f"Ours: {runs} runs per row (mean ± std), n = {d['n']}, dim = {d['dim']}, "
        f"MLP hidden {params['model']['hidden']}, {params['optim']['epochs']} epochs, "
        f"{params['metrics']['n_bins']} bins; test split {d['test_fraction']:.0%}.\n\n"
        + table(metrics)
        + "\n\n"
        + fmnist_section(params, Path(args.readme))
    )
    replace_marked_section(args.readme, "results", body)


if __name__ == "__main__":
    main()
