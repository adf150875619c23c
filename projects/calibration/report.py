"""Stage calibration-report: the README results table from ``<results>/metrics.json``.

Writes the ``<!-- results:start/end -->`` section of projects/calibration/README.md; the prose
around it is hand-written.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="projects/calibration/params.yaml")
    parser.add_argument("--readme", default="projects/calibration/README.md")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    metrics = json.loads((Path(params["paths"]["results"]) / "metrics.json").read_text())
    runs, d = params["runs"], params["data"]
    body = (
        f"Ours: {runs} runs per row (mean ± std), n = {d['n']}, dim = {d['dim']}, "
        f"MLP hidden {params['model']['hidden']}, {params['optim']['epochs']} epochs, "
        f"{params['metrics']['n_bins']} bins; test split {d['test_fraction']:.0%}.\n\n"
        + table(metrics)
    )
    replace_marked_section(args.readme, "results", body)


if __name__ == "__main__":
    main()
