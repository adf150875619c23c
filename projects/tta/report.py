"""Stage tta-report: error tables, the papers' claims checked by the core claim rule, a figure.

Reads ``paths.results/{errors,source_metrics}.json``; writes the README section
``report.readme_section`` of ``report.readme``, ``paths.results/errors.png``,
``paths.results/claims.json`` (each claim's verdict, paired mean difference, SE, CI, MDE) and the
headline DVC metrics ``paths.results/metrics.json``: ``error.<norm>.<setting>.<method>`` (mean
error % over corruptions and seeds) and ``clean_acc.<norm>`` (source models, %).

A claim (``report.claims``) says "``a`` has a lower error than ``b`` by at least ``min_effect``
points" in one setting, ``a`` and ``b`` written ``<norm>/<method>``; the verdict is
``core.report.claims.paired_claim`` on the per-seed differences ``b - a`` of the mean error over
corruptions.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from core.engine.config import entry_parser, parse_entry
from core.report.claims import Claim, paired_claim
from core.report.figures import plt, save_figure
from core.report.metrics import write_metrics
from core.report.stats import mean_std
from core.report.tables import fmt_mean_std, markdown_table
from core.utils.io import atomic_write_json, replace_marked_section
from projects.tta import DEFAULT_PARAMS

CLAIM_KEYS = {"text", "paper", "setting", "a", "b", "min_effect"}
# methods whose update rule tests/projects/test_tta_authors.py pins to the authors' released code
CROSS_CHECKED = ("tent", "eata", "sar", "deyo")


def per_seed_mean(cell: dict[str, list[float]]) -> np.ndarray:
    """Mean error over corruptions for each seed: ``{corruption: [S errors]}`` -> (S,) in %."""
    return 100 * np.mean(np.array(list(cell.values()), dtype=np.float64), axis=0)


def short(corruption: str) -> str:
    return corruption.replace("_noise", "").replace("_blur", "").replace("_transform", "")


def summary_table(errors: dict, norm: str, methods: list[str]) -> str:
    """Methods x settings: mean error over corruptions, mean ± sample std over seeds."""
    settings = list(errors[norm])
    rows = [
        [m] + [fmt_mean_std(mean_std(per_seed_mean(errors[norm][s][m])), 1) for s in settings]
        for m in methods
    ]
    return markdown_table(["method", *settings], rows)


def corruption_table(errors: dict, norm: str, setting: str, methods: list[str]) -> str:
    """Methods x corruptions of one setting, mean ± sample std over seeds, and the mean."""
    cell = errors[norm][setting]
    corruptions = list(cell[methods[0]])
    rows = [
        [m]
        + [fmt_mean_std(mean_std(cell[m][c]), 1, 100).replace(" ", "") for c in corruptions]
        + [fmt_mean_std(mean_std(per_seed_mean(cell[m])), 1)]
        for m in methods
    ]
    return markdown_table(["method", *map(short, corruptions), "mean"], rows)


def check_claims(claims: list[dict]) -> None:
    """ValueError naming ``report.claims[i]`` for a malformed claim."""
    for i, c in enumerate(claims):
        where = f"report.claims[{i}]"
        if not isinstance(c, dict) or set(c) != CLAIM_KEYS:
            raise ValueError(f"{where} must have exactly the keys {sorted(CLAIM_KEYS)}, got {c!r}")
        for side in ("a", "b"):
            if not isinstance(c[side], str) or c[side].count("/") != 1:
                raise ValueError(f"{where}.{side} must be '<norm>/<method>', got {c[side]!r}")
        m = c["min_effect"]
        if isinstance(m, bool) or not isinstance(m, int | float) or not m >= 0:
            raise ValueError(f"{where}.min_effect must be a number >= 0, got {m!r}")


def evaluate_claims(errors: dict, claims: list[dict]) -> list[dict]:
    """Each claim with its errors and verdict (``None`` where its runs are not in ``errors``)."""
    check_claims(claims)
    out = []
    for c in claims:
        cells = []
        for side in ("a", "b"):
            norm, method = c[side].split("/")
            cells.append(errors.get(norm, {}).get(c["setting"], {}).get(method))
        if any(cell is None for cell in cells):
            out.append(c | {"verdict": None})
            continue
        a, b = (per_seed_mean(cell) for cell in cells)
        claim = paired_claim(b - a, min_effect=float(c["min_effect"]))
        out.append(c | {"error_a": a.tolist(), "error_b": b.tolist(), **claim.as_dict()})
    return out


def claim_line(c: dict) -> str:
    """One Markdown bullet: the claim, its verdict with the paired difference and the MDE."""
    head = f"- {c['text']} ({c['paper']}; `{c['a']}` vs `{c['b']}`, {c['setting']})"
    if c["verdict"] is None:
        return f"{head}: not run in this params set."
    fields = {k: c[k] for k in Claim.__dataclass_fields__}
    verdict, _, detail = Claim(**fields).text(unit="pts").partition(": ")
    ea, eb = np.mean(c["error_a"]), np.mean(c["error_b"])
    return f"{head}: **{verdict}**: {ea:.2f}% vs {eb:.2f}%, difference {detail}."


def plot(errors: dict, methods: list[str], path: Path) -> None:
    """Bars: mean error per setting and method, one panel per norm, sample std over seeds."""
    norms = list(errors)
    fig, axes = plt.subplots(1, len(norms), figsize=(6 * len(norms), 3.6), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        settings = list(errors[norm])
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            stats = [mean_std(per_seed_mean(errors[norm][s][m])) for s in settings]
            ax.bar(
                np.arange(len(settings)) + i * width,
                [st.mean for st in stats],
                width,
                yerr=[0.0 if st.n < 2 else st.std for st in stats],
                label=m,
            )
        ax.set_xticks(np.arange(len(settings)) + 0.4 - width / 2, settings)
        ax.set_title(f"ResNet-{norm.upper()}: error at the target severity (mean over corruptions)")
        ax.set_ylabel("error (%)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def headline_metrics(errors: dict, source: dict) -> dict:
    """Flat DVC metrics: ``error.<norm>.<setting>.<method>`` and ``clean_acc.<norm>`` in %."""
    err = {
        norm: {
            s: {m: round(float(per_seed_mean(cell).mean()), 4) for m, cell in cells.items()}
            for s, cells in settings.items()
        }
        for norm, settings in errors.items()
    }
    acc = {n: round(100 * m["clean_test_accuracy"], 4) for n, m in source.items()}
    return {"error": err, "clean_acc": acc}


def stream_lines(streams: dict) -> list[str]:
    """One bullet per setting: batches adapted on and test images per corruption."""
    return [
        f"- `{s}`: {v['batches']} batches of {v['batch_size']}, "
        f"{v['images']} images per corruption at the target severity, {v['corruptions']} "
        "corruptions"
        for s, v in streams.items()
    ]


def runtime_line(result: dict) -> str:
    """The adaptation runs' wall time as recorded (on whatever machine and load they ran)."""
    total = sum(result.get("seconds", {}).values())
    return (
        f"Adaptation runs: {total / 60:.1f} min of recorded wall time summed over all runs "
        "(`machine.workers` run at a time)."
    )


def crosscheck_line(claims: list[dict]) -> str:
    """Which failing claims' methods match the authors' code step for step (issue #16 item 8)."""
    failing = [c for c in claims if c["verdict"] not in (None, "holds")]
    if not failing:
        return "Every claim run here holds."
    methods = sorted({c[s].split("/")[1] for c in failing for s in ("a", "b")} - {"source", "bn"})
    checked = [m for m in methods if m in CROSS_CHECKED]
    unchecked = [m for m in methods if m not in CROSS_CHECKED]
    line = f"{len(failing)} of {len(claims)} claims are not found to hold here."
    if checked:
        line += (
            f" The update rules of the methods they compare ({', '.join(checked)}) match the "
            "authors' released code step for step (`tests/projects/test_tta_authors.py`, "
            "section Cross-check above)."
        )
    if unchecked:
        line += f" Not compared with the authors' code: {', '.join(unchecked)}."
    return line


def render(result: dict, source: dict, claims: list[dict], methods: list[str], figure: str) -> str:
    """The README section (Markdown)."""
    errors, seeds = result["errors"], len(result["seeds"])
    parts = [
        "Generated by `python -m projects.tta.report` from `errors.json`; error rates (%) at "
        f"severity {result['severity']}, mean ± sample std over {seeds} seeds.",
        "",
        "Source models, clean test accuracy: "
        + ", ".join(f"{n.upper()} {100 * m['clean_test_accuracy']:.2f}%" for n, m in source.items())
        + ".",
        "",
        *(["Streams:", "", *stream_lines(result["streams"]), ""] if "streams" in result else []),
        runtime_line(result),
        "",
        f"![errors]({figure})",
    ]
    for norm in errors:
        parts += [
            "",
            f"### ResNet-{norm.upper()}: mean error over corruptions",
            "",
            summary_table(errors, norm, methods),
        ]
    parts += [
        "",
        "### Claims from the papers, checked here",
        "",
        "Verdict by the core claim rule: paired difference over seeds of the mean error over "
        "corruptions (positive: the first method is better), its standard error, 95 % CI, the "
        "stated minimum effect and the minimal detectable effect (MDE, power 0.8).",
        "",
        *(claim_line(c) for c in claims),
        "",
        crosscheck_line(claims),
    ]
    for norm in errors:
        for setting in errors[norm]:
            parts += [
                "",
                f"#### {norm.upper()}, {setting}: per corruption",
                "",
                corruption_table(errors, norm, setting, methods),
            ]
    return "\n".join(parts)


def order_settings(result: dict, settings: list[str]) -> dict:
    """errors.json with settings in params order (not JSON key order)."""
    rank = {s: i for i, s in enumerate(settings)}
    if "streams" in result:
        result["streams"] = {s: result["streams"][s] for s in settings if s in result["streams"]}
    result["errors"] = {
        norm: {s: cells[s] for s in sorted(cells, key=lambda s: rank.get(s, len(rank)))}
        for norm, cells in result["errors"].items()
    }
    return result


def build_report(params: dict) -> list[dict]:
    """Write the figure, claims.json, metrics.json and the README section; return the claims."""
    results, rep = Path(params["paths"]["results"]), params["report"]
    result = json.loads((results / "errors.json").read_text(encoding="utf-8"))
    result = order_settings(result, list(params["adapt"]["settings"]))
    source = json.loads((results / "source_metrics.json").read_text(encoding="utf-8"))
    methods = params["adapt"]["methods"]
    claims = evaluate_claims(result["errors"], rep["claims"])
    plot(result["errors"], methods, results / "errors.png")
    atomic_write_json(results / "claims.json", claims)
    write_metrics(results / "metrics.json", headline_metrics(result["errors"], source))
    readme = Path(rep["readme"])
    figure = Path(os.path.relpath((results / "errors.png").resolve(), readme.resolve().parent))
    body = render(result, source, claims, methods, figure.as_posix())
    replace_marked_section(readme, rep["readme_section"], body)
    return claims


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (the engine's: ``--params``, ``--variant``, ``--set``, ...)."""
    return entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    _, params, _ = parse_entry(build_parser(), argv)
    claims = build_report(params)
    for c in claims:
        print(claim_line(c), flush=True)
    return claims


if __name__ == "__main__":
    main()
