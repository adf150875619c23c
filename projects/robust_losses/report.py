"""Stage robust_losses-report: README tables, plots and claim checks from the train stage's output.

Reads ``<results>/metrics.json`` and ``<results>/curves.csv``; writes ``<results>/report.json``
(mean and std over seeds per condition and loss, and the claim verdicts),
``<results>/accuracy.png`` (test accuracy vs noise rate), ``<results>/dse.png`` (DSE of CE's
penultimate features per epoch, clean vs noisy labels) and the README results section.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from core.utils.io import atomic_open, atomic_write_json, replace_marked_section
from projects.robust_losses.common import CLEAN, arg_parser, load_params

METRICS = ("test_acc", "best_test_acc", "fit_noisy_train_acc", "dse", "dsmi_y")
VERDICTS = ("holds", "does not hold", "not supported")


def aggregate(runs: list[dict]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{condition: {loss: {metric: [mean, std, n_seeds]}}}`` over seeds."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["condition"], r["loss"])].append(r)
    out: dict = defaultdict(dict)
    for (cond, loss), rs in groups.items():
        out[cond][loss] = {
            m: [float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs])), len(rs)]
            for m in METRICS
        }
    return dict(out)


def per_seed(runs: list[dict], condition: str, loss: str, metric: str = "test_acc") -> np.ndarray:
    """(S,) values of ``metric`` for one (condition, loss), ordered by seed."""
    rs = sorted((r for r in runs if r["condition"] == condition and r["loss"] == loss), key=seed_of)
    return np.array([r[metric] for r in rs], dtype=float)


def seed_of(r: dict) -> int:
    return int(r["seed"])


def verdict(gap: np.ndarray, min_gap: float) -> str:
    """Paired per-seed ``gap`` (S,), > 0 where the claim's direction holds: ``holds`` when its
    mean exceeds both the seeds' spread (std) of the gap and ``min_gap``; ``does not hold``
    when the reverse does; else ``not supported`` (the house rule of projects/tta)."""
    mean, spread = float(np.mean(gap)), float(np.std(gap))
    if abs(mean) < min_gap or abs(mean) <= spread:
        return "not supported"
    return "holds" if mean > 0 else "does not hold"


def overall(verdicts: list[str]) -> str:
    """One verdict over conditions: ``holds`` if it holds in at least half and is reversed in
    none; ``does not hold`` if reversed somewhere and holds nowhere; else ``not supported``."""
    n_hold, n_rev = verdicts.count("holds"), verdicts.count("does not hold")
    if n_rev == 0 and n_hold and 2 * n_hold >= len(verdicts):
        return "holds"
    if n_rev and not n_hold:
        return "does not hold"
    return "not supported"


def accuracy_claim(runs: list[dict], a: str, b: str, noisy: list[str], min_gap: float) -> dict:
    """ "``a`` is more robust than ``b``": paired test-accuracy gap (points) per noisy condition."""
    per = {}
    for cond in noisy:
        gap = 100 * (per_seed(runs, cond, a) - per_seed(runs, cond, b))  # (S,)
        per[cond] = {
            "gap": float(gap.mean()),
            "std": float(gap.std()),
            "verdict": verdict(gap, min_gap),
        }
    return {"overall": overall([v["verdict"] for v in per.values()]), "conditions": per}


def dse_epochs(curves: list[dict], condition: str, loss: str) -> dict[int, np.ndarray]:
    """``{epoch: (S,) DSE ordered by seed}`` for one (condition, loss)."""
    by: dict[int, dict[int, float]] = defaultdict(dict)
    for r in curves:
        if r["condition"] == condition and r["loss"] == loss:
            by[int(r["epoch"])][int(r["seed"])] = float(r["dse"])
    return {e: np.array([s[k] for k in sorted(s)]) for e, s in sorted(by.items())}


def dse_claim(curves: list[dict], conditions: list[str], loss: str, min_gap: float) -> dict:
    """ "DSE grows during training": paired DSE gap final - epoch 0 (initialisation) and
    final - epoch 1, per condition."""
    out = {}
    for cond in conditions:
        d = dse_epochs(curves, cond, loss)
        last = max(d)
        out[cond] = {
            "dse": {str(e): float(v.mean()) for e, v in d.items()},
            "from_init": verdict(d[last] - d[0], min_gap),
            "from_epoch1": verdict(d[last] - d[1], min_gap),
        }
    return out


def ordered_conditions(runs: list[dict]) -> list[str]:
    """clean first, then each noise type by rate (the order of the runs)."""
    return list(dict.fromkeys(r["condition"] for r in runs))


def accuracy_table(agg: dict, conditions: list[str]) -> str:
    """Markdown: one row per loss, final clean test accuracy (%) per condition."""
    losses = list(agg[conditions[0]])
    lines = [
        "| loss | " + " | ".join(conditions) + " |",
        "|---|" + "---:|" * len(conditions),
    ]
    for loss in losses:
        cells = []
        for c in conditions:
            m, s, _ = agg[c][loss]["test_acc"]
            best = max(agg[c][lo]["test_acc"][0] for lo in losses)
            cell = f"{100 * m:.1f} ± {100 * s:.1f}"
            cells.append(f"**{cell}**" if m == best else cell)
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dse_table(agg: dict, dse: dict, conditions: list[str], loss: str) -> str:
    """Markdown: for ``loss``, DSE at init / epoch 1 / final, DSMI and noisy-label fit."""
    lines = [
        "| condition | DSE init | DSE epoch 1 | DSE final | DSMI(Z;Y) final | fit noisy train |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in conditions:
        d, a = dse[c]["dse"], agg[c][loss]
        lines.append(
            f"| {c} | {d['0']:.2f} | {d['1']:.2f} | {a['dse'][0]:.2f} ± {a['dse'][1]:.2f} "
            f"| {a['dsmi_y'][0]:.2f} | {100 * a['fit_noisy_train_acc'][0]:.1f} % |"
        )
    return "\n".join(lines)


def claims_text(claims: dict, p_min: float, d_min: float) -> str:
    """The claims paragraph (markdown bullets) from the computed verdicts."""
    out = []
    for name, c in claims["accuracy"].items():
        per = "; ".join(
            f"{cond} {v['gap']:+.1f} ± {v['std']:.1f} ({v['verdict']})"
            for cond, v in c["conditions"].items()
        )
        out.append(
            f"- {name}: **{c['overall']}**. Paired gap in points per noisy condition: {per}."
        )
    for loss, per_cond in claims["dse"].items():
        for key, when in (("from_init", "initialisation"), ("from_epoch1", "epoch 1")):
            vs = {c: v[key] for c, v in per_cond.items()}
            clean = vs.pop(CLEAN, None)
            noisy = overall(list(vs.values()))
            detail = ", ".join(f"{c}: {v}" for c, v in vs.items())
            out.append(
                f"- DSE of the penultimate features grows during training (Liao et al.), {loss}, "
                f"final epoch vs {when}: clean labels **{clean}**; noisy labels **{noisy}** "
                f"({detail})."
            )
    out.append(
        f"\nRule: a verdict needs the mean paired gap over seeds to exceed the gap's seed "
        f"spread (std) and {p_min} accuracy points ({d_min} nats for DSE); 'holds' overall = "
        "holds in at least half of the noisy conditions and reversed in none, 'does not hold' = "
        "reversed somewhere and holds nowhere, else 'not supported'."
    )
    return "\n".join(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    _plt().close(fig)


def plot_accuracy(runs: list[dict], agg: dict, out: Path) -> None:
    """Test accuracy vs noise rate, one line per loss (± std), symmetric / asymmetric panels;
    the clean condition is the 0 % point of both."""
    plt = _plt()
    kinds = [k for k in dict.fromkeys(r["noise"] for r in runs) if k != CLEAN]
    losses = list(dict.fromkeys(r["loss"] for r in runs))
    rate_of = {r["condition"]: (r["noise"], r["rate"]) for r in runs}
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        conds = [c for c, (k, _) in rate_of.items() if k in (CLEAN, kind)]
        conds.sort(key=lambda c: rate_of[c][1])
        xs = [100 * rate_of[c][1] for c in conds]
        for loss in losses:
            m = [100 * agg[c][loss]["test_acc"][0] for c in conds]
            s = [100 * agg[c][loss]["test_acc"][1] for c in conds]
            ax.errorbar(xs, m, yerr=s, marker="o", ms=4, capsize=3, label=loss)
        ax.set_title(f"{kind} label noise")
        ax.set_xlabel("noise rate (%)")
        ax.set_ylabel("clean test accuracy (%)")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0, 0].legend()
    _save(fig, out)


def plot_dse(curves: list[dict], runs: list[dict], loss: str, out: Path) -> None:
    """DSE (top) and test accuracy (bottom) per epoch for ``loss``, mean ± std over seeds; one
    column per noise type, one line per rate (clean in both)."""
    plt = _plt()
    kinds = [k for k in dict.fromkeys(r["noise"] for r in runs) if k != CLEAN]
    rate_of = {r["condition"]: (r["noise"], r["rate"]) for r in runs}
    series: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in curves:
        if r["loss"] == loss:
            for m in ("dse", "test_acc"):
                series[(r["condition"], int(r["epoch"]))][m].append(float(r[m]))
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 7), squeeze=False)
    for j, kind in enumerate(kinds):
        conds = sorted(
            (c for c, (k, _) in rate_of.items() if k in (CLEAN, kind)), key=lambda c: rate_of[c][1]
        )
        for c in conds:
            epochs = sorted(e for (cc, e) in series if cc == c)
            for i, m in enumerate(("dse", "test_acc")):
                v = np.array([series[(c, e)][m] for e in epochs])  # (E, S)
                scale = 100 if m == "test_acc" else 1
                axes[i, j].errorbar(
                    epochs, scale * v.mean(1), yerr=scale * v.std(1), marker="o", ms=3, label=c
                )
        axes[0, j].set_title(f"{loss}: {kind} noise vs clean")
        axes[0, j].set_ylabel("DSE of penultimate features (nats)")
        axes[1, j].set_ylabel("clean test accuracy (%)")
        axes[1, j].set_xlabel("epoch (0 = initialisation)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    p = load_params(args.params)
    rep = p["report"]
    p_min, d_min = rep["min_gap_points"], rep["min_gap_dse"]
    results = Path(p["paths"]["results"])
    runs = json.loads((results / "metrics.json").read_text(encoding="utf-8"))["runs"]
    with open(results / "curves.csv", encoding="utf-8") as f:
        curves = list(csv.DictReader(f))
    agg = aggregate(runs)
    conds = ordered_conditions(runs)
    noisy = [c for c in conds if c != CLEAN]
    claims = {
        "accuracy": {
            "ALDR-KL is more robust to label noise than CE (Zhu et al.)": accuracy_claim(
                runs, "aldr_kl", "ce", noisy, p_min
            ),
            "ALDR-KL is more robust to label noise than LDR-KL (Zhu et al.)": accuracy_claim(
                runs, "aldr_kl", "ldr_kl", noisy, p_min
            ),
        },
        "dse": {"ce": dse_claim(curves, conds, "ce", d_min)},
    }
    atomic_write_json(results / "report.json", {"aggregate": agg, "claims": claims})
    plot_accuracy(runs, agg, results / "accuracy.png")
    plot_dse(curves, runs, "ce", results / "dse.png")
    flipped = {r["condition"]: [] for r in runs}
    for r in runs:
        flipped[r["condition"]].append(r["actual_noise"])
    n_seeds = agg[conds[0]][runs[0]["loss"]]["test_acc"][2]
    body = "\n\n".join(
        [
            "Clean Fashion-MNIST test accuracy (%, 10k images) after the last epoch, "
            f"mean ± std over {n_seeds} seeds; best loss per condition in bold.",
            accuracy_table(agg, conds),
            "Fraction of training labels actually flipped: "
            + ", ".join(f"{c} {np.mean(v):.3f}" for c, v in flipped.items())
            + ".",
            "![test accuracy vs noise rate](results/accuracy.png)",
            "**Claims, computed from the runs above:**\n\n" + claims_text(claims, p_min, d_min),
            "DSE / DSMI (nats) of the L2-normalised penultimate features of "
            f"{p['probe']['n']} clean test images for `ce`; 'fit noisy train' = final accuracy "
            "on the (noisy) training labels it was trained on.",
            dse_table(agg, claims["dse"]["ce"], conds, "ce"),
            "![DSE and accuracy per epoch for CE](results/dse.png)",
        ]
    )
    replace_marked_section(rep["readme"], rep["readme_section"], body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
