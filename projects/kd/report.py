"""Stage kd-report: the README results block of projects/kd from the metrics files.

Writes the ``<!-- results:start/end -->`` section of projects/kd/README.md: the image tables
(mean ± std over seeds) from ``<image results>/{teacher,offline,online}.json``, a bar chart
``<report.results>/image_accuracy_ece.png``, claims checked against the numbers, and the
language-model section from ``projects.kd.report_lm.lm_section`` when that part has run.
Nothing here is typed by hand: every number and verdict is computed from the JSON files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

import yaml

from core.utils.io import atomic_open, replace_marked_section

DEFAULT_PARAMS = Path("projects/kd/params.yaml")
PLOT = "image_accuracy_ece.png"
LABELS = {
    "ce": "student alone (CE)",
    "forward_kl": "KD, forward KL (Hinton et al. 2015)",
    "forward_kl_t2": "KD, forward KL, T 2, 0.5 CE + 0.5 KD",
    "forward_kl_t1": "KD, forward KL, T 1, 0.5 CE + 0.5 KD",
    "reverse_kl": "reverse KL",
    "symmetric_kl": "symmetric KL (Jeffreys)",
    "js": "Jensen-Shannon (beta 0.5)",
    "total_variation": "total variation",
    "skew_kl": "skew KL (DistiLLM)",
    "skew_reverse_kl": "skew reverse KL (DistiLLM)",
    "akl": "AKL (Wu et al. 2024)",
    "bdkd": "BD-KD balanced divergence (offline)",
    "dkd": "DKD (Zhao et al. 2022)",
    "sinkhorn": "KD + Sinkhorn (SinKD)",
    "binary_kl": "KD + binary KL, one head",
    "dual_head_binary_kl": "Dual-Head KD (KD + BinaryKL-Norm on an aux head)",
    "dml": "DML (forward KL both ways)",
    "bdkd_both": "BD-KD, both terms balanced (v2 reading)",
}
COLUMNS = (("accuracy", "top-1 %", 100, 2), ("ece", "ECE %", 100, 2), ("nll", "NLL", 1, 3))


def label(method: str, online: bool = False) -> str:
    if online and method == "bdkd":
        return "BD-KD, student's term balanced (Amara et al., v1 reading)"
    return LABELS.get(method, method)


def cell(row: dict[str, Any], metric: str, scale: float, digits: int) -> str:
    mean, std = scale * row[f"{metric}_mean"], scale * row[f"{metric}_std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def by_seed(runs: list[dict[str, Any]], key: str = "metrics") -> dict[str, dict[int, dict]]:
    """{method: {seed: metrics}} from a list of run records."""
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        out.setdefault(r["method"], {})[r["seed"]] = r[key]
    return out


def compare(a: dict[int, dict], b: dict[int, dict], metric: str) -> tuple[float, float, int]:
    """Mean and standard error of the per-seed paired difference a - b over the shared seeds."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s][metric] - b[s][metric] for s in seeds]
    if not diffs:
        raise ValueError("no shared seeds to compare")
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return statistics.fmean(diffs), se, len(diffs)


def verdict(diff: float, se: float, higher_is_better: bool) -> str:
    """'holds' / 'reversed' when the paired mean difference is beyond 2 standard errors in the
    claimed / opposite direction, else 'not resolved'. A screen, not a significance test."""
    better = diff > 0 if higher_is_better else diff < 0
    if abs(diff) <= 2 * se:
        return "not resolved (within 2 SE)"
    return "holds" if better else "reversed"


def in_run_order(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with its summaries ordered like its runs (params order; JSON sorts keys)."""
    order = list(dict.fromkeys(r["method"] for r in result["runs"]))
    out = dict(result)
    for key in ("summary", "teacher_summary"):
        if key in result:
            out[key] = {m: result[key][m] for m in order}
    return out


def offline_table(teacher: dict[str, Any], offline: dict[str, Any]) -> str:
    summary = offline["summary"]
    base = summary["ce"]["accuracy_mean"]
    head = "| method | " + " | ".join(c[1] for c in COLUMNS) + " | agreement % | Δ top-1 vs alone |"
    lines = [head, "|---|" + "---|" * (len(COLUMNS) + 2)]
    t = teacher["metrics"]
    tcells = [f"{s * t[m]:.{d}f}" for m, _, s, d in COLUMNS]
    lines.append("| teacher (1 run) | " + " | ".join(tcells) + " | 100 | |")
    for method, row in summary.items():
        cells = [cell(row, m, s, d) for m, _, s, d in COLUMNS]
        delta = "" if method == "ce" else f"{100 * (row['accuracy_mean'] - base):+.2f}"
        cells += [cell(row, "agreement", 100, 1), delta]
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def online_table(teacher: dict[str, Any], offline: dict[str, Any], online: dict[str, Any]) -> str:
    head = (
        "| method | student " + " | student ".join(c[1] for c in COLUMNS) + " | teacher "
        + " | teacher ".join(c[1] for c in COLUMNS) + " |"
    )  # fmt: skip
    lines = [head, "|---|" + "---|" * (2 * len(COLUMNS))]
    t = teacher["metrics"]
    alone = [cell(offline["summary"]["ce"], m, s, d) for m, _, s, d in COLUMNS]
    alone += [f"{s * t[m]:.{d}f} (1 run)" for m, _, s, d in COLUMNS]
    lines.append("| each trained alone (CE) | " + " | ".join(alone) + " |")
    for method, row in online["summary"].items():
        trow = online["teacher_summary"][method]
        cells = [cell(row, m, s, d) for m, _, s, d in COLUMNS]
        cells += [cell(trow, m, s, d) for m, _, s, d in COLUMNS]
        lines.append(f"| {label(method, online=True)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# (paper, claim, (source, method) a, (source, method) b, metric, higher is better)
CLAIMS = (
    ("Hinton et al. 2015", "KD beats the student alone", ("offline", "forward_kl"),
     ("offline", "ce"), "accuracy", True),
    ("Hinton et al. 2015", "KD beats the student alone (T 2, 0.5 CE + 0.5 KD)",
     ("offline", "forward_kl_t2"), ("offline", "ce"), "accuracy", True),
    ("Hinton et al. 2015", "KD beats the student alone (T 1, 0.5 CE + 0.5 KD)",
     ("offline", "forward_kl_t1"), ("offline", "ce"), "accuracy", True),
    ("Zhao et al. 2022", "DKD beats KD", ("offline", "dkd"), ("offline", "forward_kl"),
     "accuracy", True),
    ("Amara et al.", "online BD-KD beats online DML (student top-1)", ("online", "bdkd"),
     ("online", "dml"), "accuracy", True),
    ("Amara et al.", "online BD-KD is better calibrated than online DML (student ECE)",
     ("online", "bdkd"), ("online", "dml"), "ece", False),
    ("Amara et al.", "online BD-KD beats the student alone", ("online", "bdkd"),
     ("offline", "ce"), "accuracy", True),
    ("Amara et al.", "online BD-KD is better calibrated than the student alone",
     ("online", "bdkd"), ("offline", "ce"), "ece", False),
    ("Cui et al. 2024", "adding the Sinkhorn distance beats KD", ("offline", "sinkhorn"),
     ("offline", "forward_kl"), "accuracy", True),
    ("Yang et al. 2024", "binary KL on an auxiliary head beats binary KL on the one head",
     ("offline", "dual_head_binary_kl"), ("offline", "binary_kl"), "accuracy", True),
    ("Yang et al. 2024", "Dual-Head KD beats KD", ("offline", "dual_head_binary_kl"),
     ("offline", "forward_kl"), "accuracy", True),
    ("Ko et al. 2024 (LLMs)", "skew KL beats forward KL", ("offline", "skew_kl"),
     ("offline", "forward_kl"), "accuracy", True),
    ("Wu et al. 2024 (LLMs)", "AKL beats forward KL", ("offline", "akl"),
     ("offline", "forward_kl"), "accuracy", True),
    ("Wu et al. 2024 (LLMs)", "AKL beats reverse KL", ("offline", "akl"),
     ("offline", "reverse_kl"), "accuracy", True),
)  # fmt: skip


def claims(runs: dict[str, dict[str, dict[int, dict]]]) -> str:
    """One table row per claim whose two methods were run: paired difference, SE, verdict."""
    lines = [
        "| paper | claim | metric | mean paired difference (pts) | SE | seeds | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for paper, text, (sa, ma), (sb, mb), metric, higher in CLAIMS:
        if ma not in runs.get(sa, {}) or mb not in runs.get(sb, {}):
            continue
        diff, se, n = compare(runs[sa][ma], runs[sb][mb], metric)
        lines.append(
            f"| {paper} | {text} | {metric} | {100 * diff:+.2f} | {100 * se:.2f} | {n} | "
            f"{verdict(diff, se, higher)} |"
        )
    return "\n".join(lines)


def ranking(offline: dict[str, Any]) -> str:
    """A sentence: the offline methods ordered by mean top-1, and the best by ECE."""
    summary = offline["summary"]
    order = sorted(summary, key=lambda m: -summary[m]["accuracy_mean"])
    best_ece = min(summary, key=lambda m: summary[m]["ece_mean"])
    beat = [
        m
        for m in order
        if m != "ce" and summary[m]["accuracy_mean"] > summary["ce"]["accuracy_mean"]
    ]
    return (
        f"Offline methods by mean top-1: {', '.join(order)}. "
        f"{len(beat)} of {len(summary) - 1} KD variants have a higher mean top-1 than the "
        f"student alone; the lowest mean ECE is {best_ece}'s."
    )


def plot(
    offline: dict[str, Any], online: dict[str, Any], teacher: dict[str, Any], path: Path
) -> None:
    """Bar chart of student top-1 and ECE per method (offline, then online), ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, r) for m, r in offline["summary"].items()]
    rows += [(f"online {m}", r) for m, r in online["summary"].items()]
    names = [n for n, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(rows) + 1.5), sharey=True)
    for ax, (metric, title) in zip(
        axes, (("accuracy", "student top-1 %"), ("ece", "student ECE %"))
    ):
        means = [100 * r[f"{metric}_mean"] for _, r in rows]
        stds = [100 * r[f"{metric}_std"] for _, r in rows]
        colors = [
            "tab:gray" if n == "ce" else "tab:orange" if n.startswith("online") else "tab:blue"
            for n in names
        ]
        ax.barh(range(len(rows)), means, xerr=stds, color=colors, capsize=2)
        ax.axvline(
            100 * offline["summary"]["ce"][f"{metric}_mean"],
            color="k",
            ls="--",
            lw=1,
            label="student alone",
        )
        ax.axvline(100 * teacher["metrics"][metric], color="tab:red", ls=":", lw=1, label="teacher")
        ax.set_xlabel(title)
        if metric == "accuracy":
            lo = min(m - s for m, s in zip(means, stds))
            ax.set_xlim(lo - 1, max(100 * teacher["metrics"][metric], max(means)) + 0.5)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def lm_part(results: Path) -> str:
    """The LM section (with its heading) from projects/kd/report_lm.py when that part has run."""
    not_run = "### Language model\n\nLM part not run"
    if not (results / "lm" / "metrics.json").exists():
        return not_run + "."
    try:
        from projects.kd.report_lm import lm_section
    except ModuleNotFoundError as err:
        if err.name != "projects.kd.report_lm":
            raise
        return not_run + " (projects/kd/report_lm.py is missing)."
    return lm_section(results)


TIME_TARGET, MEMORY_TARGET = 1.2, 1.25  # fused KD: x materialised time, x gradient buffers


def bench_section(params: dict[str, Any]) -> str:
    """The fused-loss benchmark table (stage kd-bench) and, per divergence, the targets' verdict."""
    path = Path(params["bench"]["out"]) / "results.json"
    head = "### Fused linear KD loss: time and memory (stage kd-bench, this machine)"
    if not path.exists():
        return f"{head}\n\nBenchmark not run (`make bench PROJECT=kd`)."
    res = json.loads(path.read_text(encoding="utf-8"))
    table = (path.parent / "results.md").read_text(encoding="utf-8").strip()
    verdicts = []
    for r in res["rows"]:
        if r.get("method") != "chunked" or "error" in r:
            continue
        t, m = r["time_vs_materialised"], r["peak_vs_grad_buffers"]
        ok = t <= TIME_TARGET and m <= MEMORY_TARGET
        verdicts.append(
            f"- {r['divergence']}: {t:.2f} x the materialised time, {m:.2f} x the gradient "
            f"buffers -> {'both targets met' if ok else 'target missed'}"
        )
    liger = any(r.get("method") == "liger" for r in res["rows"])
    note = (
        "Liger's fused linear JSD is in the table (CUDA)."
        if liger
        else "Liger's fused linear JSD needs CUDA; no GPU here, so it is not measured."
    )
    return "\n\n".join([head, table, "\n".join(verdicts), note])


def net_desc(spec: dict[str, Any]) -> str:
    """``{arch: smallcnn, channels: [8, 16], hidden: 32}`` -> ``SmallCNN (8, 16) / 32``."""
    if spec["arch"] == "smallcnn":
        return f"SmallCNN ({', '.join(map(str, spec['channels']))}) / {spec['hidden']}"
    return f"{spec['arch']} " + ", ".join(f"{k} {v}" for k, v in spec.items() if k != "arch")


def image_section(params: dict[str, Any], readme: Path, results: Path) -> str:
    cfg = params["image"]
    res = Path(cfg["paths"]["results"])
    teacher, offline, online = (
        json.loads((res / f"{name}.json").read_text(encoding="utf-8"))
        for name in ("teacher", "offline", "online")
    )
    offline, online = in_run_order(offline), in_run_order(online)
    plot(offline, online, teacher, results / PLOT)
    runs = {"offline": by_seed(offline["runs"]), "online": by_seed(online["runs"])}
    student_params = offline["runs"][0]["n_params"] if offline["runs"] else 0
    o = cfg["optim"]
    setup = (
        f"Fashion-MNIST, {cfg['data']['train_size']} training images, the full "
        f"{cfg['data']['test_size']}-image test set; teacher {net_desc(cfg['teacher'])} "
        f"({teacher['n_params']:,} parameters, 1 run), student {net_desc(cfg['student'])} "
        f"({student_params:,} parameters); Adam lr {o['lr']}, batch {o['batch_size']}, "
        f"{o['epochs']} epochs, {o.get('schedule', 'cosine')} schedule for every network; "
        f"seeds {cfg['seeds']} (mean ± sample std; every method of a seed starts from the same "
        f"initialisation and batch order). ECE: {cfg['n_bins']} equal-width bins, top label."
    )

    def cost(result: dict[str, Any]) -> str:
        cpu = sum(r["cpu_s"] for r in result["runs"])
        return (
            f"{len(result['runs'])} runs, {cpu:.0f} s training CPU, {result['wall_s']:.0f} s wall"
        )

    timing = (
        f"Cost (shared, loaded 2-core CPU): teacher {teacher.get('cpu_s', 0):.0f} s CPU, "
        f"{teacher['wall_s']:.0f} s wall; offline {cost(offline)}; online {cost(online)}. "
        "Wall is this invocation's (runs reused from the per-run cache cost ~0 s); CPU is each "
        "run's own, from when it was trained."
    )
    plot_link = os.path.relpath(results / PLOT, readme.parent)
    return "\n\n".join(
        [
            "### Images: offline KD, one row per divergence",
            setup,
            offline_table(teacher, offline),
            "Agreement: test top-1 agreement with the teacher. Δ: mean top-1 minus the "
            "student alone's, in points.",
            "### Images: online KD (teacher and student trained together)",
            online_table(teacher, offline, online),
            f"![student top-1 and ECE per method]({plot_link})",
            "### Which claims hold here",
            "Paired per-seed differences (method minus comparison; for ECE lower is better). "
            "'holds' / 'reversed' = beyond 2 standard errors of the paired difference in the "
            "claimed / opposite direction: a screen over few seeds, not a significance test.",
            claims(runs),
            ranking(offline),
            timing,
        ]
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS))
    args = parser.parse_args(argv)
    with open(args.params, encoding="utf-8") as f:
        params = yaml.safe_load(f)
    readme, results = Path(params["report"]["readme"]), Path(params["report"]["results"])
    body = "\n\n".join(
        part.strip()
        for part in [
            "## Results (generated by `dvc repro projects/kd/dvc.yaml`; do not edit by hand)",
            image_section(params, readme, results),
            lm_part(results),
            bench_section(params),
        ]
    )
    replace_marked_section(readme, "results", body)
    print(f"kd-report: wrote {readme} and {results / PLOT}", flush=True)
    return body


if __name__ == "__main__":
    main()
