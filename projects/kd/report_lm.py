"""The language-model part of the kd report: table, validation curves (CSV + figure), paired data.

Reads ``<lm results>/summary.json`` (stage kd-lm-train): per (run, seed) the final val loss and
the val curve. Writes ``val_curves.csv`` (step, the mean val loss over seeds per run: a DVC
plot) and ``val_ppl.png``; returns the Markdown. The claims on these runs are checked with the
image claims in projects/kd/report.py.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from core.report.figures import plt, save_figure
from core.report.stats import mean_std
from core.report.tables import fmt, fmt_mean_std, markdown_table
from core.utils.io import atomic_open

CE_RUN = "ce"
CURVES, PLOT = "val_curves.csv", "val_ppl.png"


def by_seed(summary: dict[str, Any], key: str = "val_loss") -> dict[str, dict[int, float]]:
    """{run: {seed: ``key``}} from the stage's summary."""
    out: dict[str, dict[int, float]] = {}
    for r in summary["runs"]:
        out.setdefault(r["run"], {})[r["seed"]] = r[key]
    return out


def _hparams(r: dict[str, Any]) -> str:
    if r.get("loss") == "ce":
        return "CE only"
    parts = [f"T={r['temperature']:g}"]
    if r.get("hard_weight"):
        parts.append(f"h={r['hard_weight']:g}")
    parts += [f"{k}={v:g}" for k, v in sorted(r.get("hparams", {}).items())]
    return ", ".join(parts)


def table(summary: dict[str, Any]) -> str:
    """Teacher, the CE-only student and each KD student: val loss and ppl (mean ± sample std
    over seeds) and the mean paired val-loss difference to the student alone."""
    t = summary["teacher"]
    losses = by_seed(summary)
    first = {}
    for r in summary["runs"]:
        first.setdefault(r["run"], r)
    rows = [
        [f"teacher ({t['n_layer']} x {t['n_embd']})", "cce pipeline", fmt(t["val_loss"], 4),
         fmt(t["val_ppl"], 1), "", f"{t['n_params'] / 1e6:.1f}M"],
    ]  # fmt: skip
    order = sorted(losses, key=lambda n: (n != CE_RUN, n != "forward_kl"))  # stable otherwise
    for name in order:
        seeds = losses[name]
        loss = mean_std(seeds.values())
        ppl = mean_std(math.exp(v) for v in seeds.values())
        delta = ""
        if name != CE_RUN and CE_RUN in losses:
            common = sorted(set(seeds) & set(losses[CE_RUN]))
            delta = f"{np.mean([seeds[s] - losses[CE_RUN][s] for s in common]):+.4f}"
        label = "student alone" if name == CE_RUN else f"student, {name}"
        rows.append(
            [label, _hparams(first[name]), fmt_mean_std(loss, 4), fmt_mean_std(ppl, 1), delta,
             f"{first[name]['n_params'] / 1e6:.1f}M"]
        )  # fmt: skip
    header = ["model", "loss", "val loss", "val ppl", "Δ val loss vs alone", "params"]
    return markdown_table(header, rows, align="llrrrr")


def curves(summary: dict[str, Any]) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {run: mean val loss over seeds at each step})."""
    per_run: dict[str, list[list[float]]] = {}
    steps: list[int] = []
    for r in summary["runs"]:
        steps = [int(s) for s, _ in r["curve"]]
        per_run.setdefault(r["run"], []).append([v for _, v in r["curve"]])
    return steps, {k: list(np.mean(v, axis=0)) for k, v in per_run.items()}


def write_curves(summary: dict[str, Any], path: Path) -> None:
    """``step,<run>,...`` rows of mean val loss: the DVC plot of the LM runs."""
    steps, mean = curves(summary)
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", *mean])
        for i, s in enumerate(steps):
            w.writerow([s, *(f"{v[i]:.6f}" for v in mean.values())])


def plot(summary: dict[str, Any], path: Path) -> None:
    """Validation perplexity vs step (mean over seeds) per run, the teacher as a dashed line."""
    steps, mean = curves(summary)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, losses in mean.items():
        style = dict(color="black", lw=2) if name == CE_RUN else {}
        label = "CE only" if name == CE_RUN else name
        ax.plot(steps, np.exp(losses), marker="o", ms=3, label=label, **style)
    ax.axhline(summary["teacher"]["val_ppl"], color="grey", ls="--", label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("training step (1 step = batch x block tokens)")
    ax.set_ylabel("validation perplexity (mean over seeds)")
    ax.set_title("GPT student: token-level KD from the cce teacher")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def lm_section(summary: dict[str, Any], lm_dir: Path, readme_dir: Path) -> str:
    """Markdown of the LM part (setup, table, figure link); writes the curves CSV and figure."""
    lm_dir = Path(lm_dir)
    write_curves(summary, lm_dir / CURVES)
    plot(summary, lm_dir / PLOT)
    r0, s = summary["runs"][0], summary["student"]
    seeds = sorted({r["seed"] for r in summary["runs"]})
    n_params = r0["n_params"] / 1e6
    setup = (
        f"Student GPT {s['n_layer']} x {s['n_embd']} ({n_params:.1f}M parameters) trained for "
        f"{r0['steps']} steps of {r0['tokens_per_step']} tokens, seeds {seeds} (each seed: its "
        "own initialisation and batches, shared by every run of that seed); KD through the "
        "fused `core.losses.linear_kd_loss` (no N x V logits). Validation on "
        f"{summary['val_tokens']} held-out tokens, the same for every run and the teacher. "
        "Mean ± sample std over seeds; Δ: mean paired difference to the student alone (nats)."
    )
    link = Path(lm_dir / PLOT).resolve().relative_to(Path(readme_dir).resolve())
    return "\n\n".join(
        [
            "### Language model: token-level KD from the cce GPT",
            setup,
            table(summary),
            f"![validation perplexity]({link.as_posix()})",
        ]
    )
