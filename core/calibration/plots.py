"""Reliability diagram with its confidence histogram (top-label, equal-width bins)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from core.calibration.metrics import _top_label, bin_statistics, expected_calibration_error

__all__ = ["reliability_diagram"]


def reliability_diagram(probs: Tensor, labels: Tensor, n_bins: int = 15, title: str = "") -> Figure:
    """Two panels: per-bin accuracy vs confidence (gap to the diagonal shaded, ECE in the legend)
    above the histogram of top-label confidences. probs (N, C), labels (N,).
    Guo et al. 2017, "On Calibration of Modern Neural Networks" (Fig. 1). Bins follow
    ``expected_calibration_error`` (confidence exactly 1.0 is drawn in the last bin).
    """
    confidences, hits = _top_label(probs, labels)
    acc, _, count = (t.double().cpu() for t in bin_statistics(confidences, hits, n_bins))
    # fold the extra conf == 1.0 bin into the last drawn bin
    acc[-2] = (acc[-2] * count[-2] + acc[-1] * count[-1]) / (count[-2] + count[-1]).clamp_min(1)
    count[-2] += count[-1]
    acc, count = acc[:-1].numpy(), count[:-1].numpy()
    ece = float(expected_calibration_error(probs, labels, n_bins))
    width = 1.0 / n_bins
    centres = (np.arange(n_bins) + 0.5) * width
    filled = count > 0

    fig = Figure(figsize=(4.5, 6))  # no pyplot: no global state, any backend
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    top.bar(centres[filled], acc[filled], width, edgecolor="k", label="accuracy")
    top.bar(
        centres[filled], (centres - acc)[filled], width, bottom=acc[filled],
        color="red", alpha=0.3, label="gap to bin centre",
    )  # fmt: skip
    top.set(ylabel="accuracy", ylim=(0, 1), title=title or f"ECE = {100 * ece:.2f}%")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, count / count.sum(), width, edgecolor="k")
    mean_conf = float(confidences.double().mean())
    mean_acc = float(hits.double().mean())
    bottom.axvline(mean_conf, color="C1", ls="--", label=f"mean confidence {mean_conf:.3f}")
    bottom.axvline(mean_acc, color="C2", ls=":", label=f"accuracy {mean_acc:.3f}")
    bottom.set(xlabel="confidence", ylabel="fraction", xlim=(0, 1))
    bottom.legend(fontsize=7)
    fig.tight_layout()
    return fig
