"""Stage tta-report: error tables, the papers' qualitative claims checked, and a plot.

Reads ``paths.results/{errors,source_metrics}.json`` and writes the tables between the
``<!-- results:start/end -->`` markers of projects/tta/README.md and ``paths.results/errors.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.utils.io import atomic_write_bytes, replace_marked_section
from projects.tta.common import arg_parser, load_params

README = Path("projects/tta/README.md")


def _load(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def per_seed_mean(cell: dict[str, list[float]]) -> np.ndarray:
    """Mean error over corruptions for each seed: (S,) in percent."""
    return 100 * np.mean(np.array(list(cell.values())), axis=0)


def fmt(values: np.ndarray) -> str:
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def summary_table(errors: dict, norm: str, methods: list[str]) -> str:
    settings = list(errors[norm])
    lines = [
        "| method | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for m in methods:
        cells = [fmt(per_seed_mean(errors[norm][s][m])) for s in settings]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def corruption_table(errors: dict, norm: str, setting: str, methods: list[str]) -> str:
    cell = errors[norm][setting]
    corruptions = list(cell[methods[0]])
    short = [
        c.replace("_noise", "").replace("_blur", "").replace("_transform", "") for c in corruptions
    ]
    lines = [
        "| method | " + " | ".join(short) + " | mean |",
        "|---|" + "---|" * (len(corruptions) + 1),
    ]
    for m in methods:
        cells = [
            f"{100 * np.mean(cell[m][c]):.1f}±{100 * np.std(cell[m][c]):.1f}" for c in corruptions
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(per_seed_mean(cell[m]))} |")
    return "\n".join(lines)


MIN_EFFECT = 0.5  # error-rate points: a smaller gap is not a difference a paper would claim


def verdict(a: np.ndarray, b: np.ndarray) -> str:
    """Does ``a`` have lower error than ``b``? Paired over seeds: the mean gap must exceed the
    seeds' spread of the gap and ``MIN_EFFECT`` points, else it is not supported."""
    gap = b - a  # (S,), > 0 where a is better
    noise = float(np.std(gap))
    if abs(gap.mean()) < MIN_EFFECT:
        return f"**not supported** (gap {gap.mean():+.2f} points, below {MIN_EFFECT})"
    if gap.mean() > noise:
        return "**holds**"
    if gap.mean() < -noise:
        return "**does not hold** (the reverse)"
    return "**not supported** (within seed noise)"


def claims(errors: dict) -> list[str]:
    """The papers' qualitative claims, each checked against our numbers (where we ran them)."""
    out = []

    def check(text, norm, setting, a, b, better=True):
        try:
            ea = per_seed_mean(errors[norm][setting][a])
            eb = per_seed_mean(errors[norm][setting][b])
        except KeyError:
            out.append(f"- {text}: not run in this params set.")
            return
        v = verdict(ea, eb) if better else verdict(eb, ea)
        stats = f"{a} {ea.mean():.1f}% vs {b} {eb.mean():.1f}%, {norm}, {setting}"
        out.append(f"- {text}: {v} ({stats}).")

    def named(prefix):  # settings whose name starts with prefix (label_shift_sorted, ...)
        found = sorted({s for n in errors.values() for s in n if s.startswith(prefix)})
        return found or [prefix]

    check("Tent beats source with BatchNorm at batch 200 (Tent)", "bn", "reset", "tent", "source")
    check("Test-batch BN statistics beat source (Schneider et al.)", "bn", "reset", "bn", "source")
    check(
        "Tent degrades at batch size 1 with BatchNorm (SAR)", "bn", "bs1", "tent", "source", False
    )
    for setting in named("label_shift"):
        text = "Tent degrades under online label shift with BatchNorm (SAR)"
        check(text, "bn", setting, "tent", "source", False)
    for norm in ("bn", "gn"):
        for setting in named("bs1") + named("label_shift") + named("mixed"):
            check(f"SAR is more stable than Tent ({setting}, {norm})", norm, setting, "sar", "tent")
            check(
                f"DeYO is more stable than Tent ({setting}, {norm})", norm, setting, "deyo", "tent"
            )
    for norm in ("bn", "gn"):
        cell = errors.get(norm, {}).get("continual")
        if cell:
            means = {m: float(np.mean(per_seed_mean(v))) for m, v in cell.items()}
            best = min((m for m in means if m != "rmt"), key=means.get)
            v = verdict(per_seed_mean(cell["rmt"]), per_seed_mean(cell[best]))
            ranked = ", ".join(
                f"{m} {e:.1f}%" for m, e in sorted(means.items(), key=lambda t: t[1])
            )
            out.append(f"- RMT leads in the continual setting ({norm}): {v} ({ranked}).")
    return out


def plot(errors: dict, methods: list[str]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = list(errors)
    fig, axes = plt.subplots(
        1, len(norms), figsize=(6 * len(norms), 3.6), sharey=True, squeeze=False
    )
    for ax, norm in zip(axes[0], norms):
        settings = list(errors[norm])
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            vals = [per_seed_mean(errors[norm][s][m]) for s in settings]
            ax.bar(
                np.arange(len(settings)) + i * width,
                [v.mean() for v in vals],
                width,
                yerr=[v.std() for v in vals],
                label=m,
            )
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings)
        ax.set_title(f"ResNet-{norm.upper()}: error at severity 5 (mean over corruptions)")
        ax.set_ylabel("error (%)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def render(errors_json: dict, source_metrics: dict, methods: list[str]) -> str:
    errors = errors_json["errors"]
    seeds = len(errors_json["seeds"])
    parts = [
        "Generated by `python -m projects.tta.report` from `results/errors.json`; "
        f"error rates (%) at severity {errors_json['severity']}, mean ± std over {seeds} seeds.",
        "",
        "Source models, clean test accuracy: "
        + ", ".join(
            f"{n.upper()} {100 * m['clean_test_accuracy']:.2f}%" for n, m in source_metrics.items()
        )
        + ".",
        "",
        "![errors](results/errors.png)",
    ]
    for norm in errors:
        parts += [
            "",
            f"### ResNet-{norm.upper()}: mean error over corruptions",
            "",
            summary_table(errors, norm, methods),
        ]
    parts += ["", "### Claims from the papers, checked here", "", *claims(errors)]
    for norm in errors:
        for setting in errors[norm]:
            parts += [
                "",
                f"#### {norm.upper()}, {setting}: per corruption",
                "",
                corruption_table(errors, norm, setting, methods),
            ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    params = load_params(args.params)
    results = Path(params["paths"]["results"])
    errors_json = _load(results / "errors.json")
    methods = params["adapt"]["methods"]
    order = list(params["adapt"]["settings"])  # tables follow params.yaml, not JSON key order
    rank = {s: i for i, s in enumerate(order)}
    errors_json["errors"] = {
        norm: {s: cells[s] for s in sorted(cells, key=lambda s: rank.get(s, len(rank)))}
        for norm, cells in errors_json["errors"].items()
    }
    body = render(errors_json, _load(results / "source_metrics.json"), methods)
    replace_marked_section(README, "results", body)
    atomic_write_bytes(results / "errors.png", plot(errors_json["errors"], methods))
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
