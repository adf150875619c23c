"""Stage robust_losses-report: README results table and curves from the train stage's output.

Reads ``<results>/metrics.json`` and ``<results>/curves.csv``; writes ``<results>/report.json``
(mean and std over seeds per noise type and loss), ``<results>/curves.png`` and the
``<!-- results:start/end -->`` section of the README.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from core.utils.io import atomic_open, atomic_write_json, replace_marked_section
from projects.robust_losses.common import arg_parser, load_params

METRICS = ("test_acc", "best_test_acc", "fit_noisy_train_acc", "dse", "dsmi_y")


def aggregate(runs: list[dict]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{noise: {loss: {metric: [mean, std, n_seeds]}}}`` over seeds."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["noise"], r["loss"])].append(r)
    out: dict = defaultdict(dict)
    for (noise, loss), rs in groups.items():
        out[noise][loss] = {
            m: [float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs])), len(rs)]
            for m in METRICS
        }
    return dict(out)


def table(agg: dict, runs: list[dict]) -> str:
    """Markdown: one row per loss, clean test accuracy and DSE/DSMI per noise type."""
    noises = list(agg)
    rates = {r["noise"]: (r["rate"], r["actual_noise"]) for r in runs}
    head = (
        "| loss | "
        + " | ".join(
            f"{n} {rates[n][0]:.0%}: test acc (final / best) | fit noisy train | DSE | DSMI(Z;Y)"
            for n in noises
        )
        + " |"
    )
    lines = [head, "|---|" + "---:|---:|---:|---:|" * len(noises)]
    for loss in agg[noises[0]]:
        cells = []
        for n in noises:
            a = agg[n][loss]
            cells += [
                f"{a['test_acc'][0]:.4f} ± {a['test_acc'][1]:.4f} / {a['best_test_acc'][0]:.4f}",
                f"{a['fit_noisy_train_acc'][0]:.3f}",
                f"{a['dse'][0]:.2f} ± {a['dse'][1]:.2f}",
                f"{a['dsmi_y'][0]:.2f} ± {a['dsmi_y'][1]:.2f}",
            ]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    seeds = agg[noises[0]][next(iter(agg[noises[0]]))]["test_acc"][2]
    lines.append("")
    lines.append(
        f"Mean ± std over {seeds} seeds, final epoch, clean Fashion-MNIST test set (10k). "
        "Fraction of training labels actually flipped: "
        + ", ".join(f"{n} {rates[n][1]:.3f}" for n in noises)
        + ". 'fit noisy train' = accuracy on the *noisy* training labels (memorisation). "
        "DSE / DSMI in nats on the L2-normalised penultimate features of 500 clean test images."
    )
    return "\n".join(lines)


def plot(curves: list[dict], out: Path) -> None:
    """Test accuracy and DSE per epoch (mean over seeds), one column per noise type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, int], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in curves:
        for m in ("test_acc", "dse"):
            series[(r["noise"], r["loss"], int(r["epoch"]))][m].append(float(r[m]))
    noises = sorted({k[0] for k in series})
    losses = list(dict.fromkeys(k[1] for k in series))
    fig, axes = plt.subplots(2, len(noises), figsize=(5.5 * len(noises), 7), squeeze=False)
    for j, noise in enumerate(noises):
        for loss in losses:
            epochs = sorted(e for (n, lo, e) in series if n == noise and lo == loss)
            for i, m in enumerate(("test_acc", "dse")):
                ys = [np.mean(series[(noise, loss, e)][m]) for e in epochs]
                axes[i, j].plot(epochs, ys, marker="o", ms=3, label=loss)
        axes[0, j].set_title(f"{noise} noise")
        axes[0, j].set_ylabel("clean test accuracy")
        axes[1, j].set_ylabel("DSE of penultimate features (nats)")
        axes[1, j].set_xlabel("epoch")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend()
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    p = load_params(args.params)
    results = Path(p["paths"]["results"])
    runs = json.loads((results / "metrics.json").read_text(encoding="utf-8"))["runs"]
    with open(results / "curves.csv", encoding="utf-8") as f:
        curves = list(csv.DictReader(f))
    agg = aggregate(runs)
    atomic_write_json(results / "report.json", agg)
    plot(curves, results / "curves.png")
    body = table(agg, runs) + "\n\n![accuracy and DSE per epoch](results/curves.png)"
    replace_marked_section(p["report"]["readme"], p["report"]["readme_section"], body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
