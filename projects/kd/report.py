"""Stage kd-report: the README results block, the figures and the headline metrics of projects/kd.

Reads the stages' results (``<image results>/{teacher,offline,online}.json``,
``<lm results>/summary.json``, ``<bench out>/results.json``) and writes: the
``<!-- results:start/end -->`` section of the README (tables, the claim verdicts of
``core.report.claims.paired_claim`` with the minimum effect and MDE beside each, costs), the
figures, ``<report.results>/claims.json`` (every verdict with its evidence) and the flat DVC
metrics ``<report.results>/metrics.json`` (``top1.<method>``, ``ece.<method>``,
``val_ppl.<run>``, ...). Nothing here is typed by hand: every number comes from those files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from core.engine.config import entry_parser, parse_entry
from core.report.claims import paired_claim
from core.report.figures import plt, save_figure
from core.report.metrics import write_metrics
from core.report.stats import mean_std
from core.report.tables import fmt, fmt_mean_std, markdown_table
from core.utils.io import atomic_write_json, replace_marked_section
from projects.kd import DEFAULT_PARAMS
from projects.kd.report_lm import by_seed as lm_by_seed
from projects.kd.report_lm import lm_section

PLOT = "image_accuracy_ece.png"
LABELS = {
    "ce": "student alone (CE)",
    "forward_kl": "KD, forward KL (Hinton et al. 2015)",
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
}
ONLINE_LABELS = {
    "alone": "each trained alone (CE)",
    "ce": "student alone (offline CE: the same run)",
    "dml": "DML (forward KL both ways)",
    "bdkd": "BD-KD, student's term balanced (Amara et al., v1 reading)",
    "bdkd_both": "BD-KD, both terms balanced (v2 reading)",
}
# metric -> (column title, scale, digits, higher is better)
METRICS = {
    "accuracy": ("top-1 %", 100, 2, True),
    "ece": ("ECE %", 100, 2, False),
    "nll": ("NLL", 1, 3, False),
    "val_loss": ("val loss (nats)", 1, 4, False),
}
# (paper, claim, (source, method) a, (source, method) b, metric): "a beats b"; fixed in advance
CLAIMS = (
    ("Hinton et al. 2015", "KD beats the student alone", ("offline", "forward_kl"),
     ("offline", "ce"), "accuracy"),
    ("Hinton et al. 2015", "KD's student is better calibrated than the student alone",
     ("offline", "forward_kl"), ("offline", "ce"), "ece"),
    ("Zhao et al. 2022", "DKD beats KD", ("offline", "dkd"), ("offline", "forward_kl"),
     "accuracy"),
    ("Cui et al. 2024", "adding the Sinkhorn distance beats KD", ("offline", "sinkhorn"),
     ("offline", "forward_kl"), "accuracy"),
    ("Yang et al. 2024", "binary KL on an auxiliary head beats binary KL on the one head",
     ("offline", "dual_head_binary_kl"), ("offline", "binary_kl"), "accuracy"),
    ("Yang et al. 2024", "Dual-Head KD beats KD", ("offline", "dual_head_binary_kl"),
     ("offline", "forward_kl"), "accuracy"),
    ("Ko et al. 2024 (LLMs)", "skew KL beats forward KL (images)", ("offline", "skew_kl"),
     ("offline", "forward_kl"), "accuracy"),
    ("Wu et al. 2024 (LLMs)", "AKL beats forward KL (images)", ("offline", "akl"),
     ("offline", "forward_kl"), "accuracy"),
    ("Wu et al. 2024 (LLMs)", "AKL beats reverse KL (images)", ("offline", "akl"),
     ("offline", "reverse_kl"), "accuracy"),
    ("Zhang et al. 2018", "online DML's student beats the student trained alone",
     ("online", "dml"), ("offline", "ce"), "accuracy"),
    ("Amara et al.", "online BD-KD beats online DML (student top-1)", ("online", "bdkd"),
     ("online", "dml"), "accuracy"),
    ("Amara et al.", "online BD-KD's student is better calibrated than DML's", ("online", "bdkd"),
     ("online", "dml"), "ece"),
    ("Amara et al.", "online BD-KD's student beats the student trained alone", ("online", "bdkd"),
     ("offline", "ce"), "accuracy"),
    ("Hinton et al. 2015", "token-level KD (forward KL) beats the LM student alone",
     ("lm", "forward_kl"), ("lm", "ce"), "val_loss"),
    ("Gu et al. 2024 (MiniLLM)", "reverse KL beats forward KL (LM)", ("lm", "reverse_kl"),
     ("lm", "forward_kl"), "val_loss"),
    ("Ko et al. 2024 (DistiLLM)", "skew KL beats forward KL (LM)", ("lm", "skew_kl"),
     ("lm", "forward_kl"), "val_loss"),
    ("Wu et al. 2024 (AKL)", "AKL beats forward KL (LM)", ("lm", "akl"), ("lm", "forward_kl"),
     "val_loss"),
)  # fmt: skip


def label(method: str, online: bool = False) -> str:
    return (ONLINE_LABELS if online else LABELS).get(method, method)


def per_seed(runs: Iterable[dict[str, Any]], key: str = "metrics") -> dict[str, dict[int, dict]]:
    """{method: {seed: run[key]}} from a list of run records."""
    out: dict[str, dict[int, dict]] = {}
    for r in runs:
        out.setdefault(r["method"], {})[r["seed"]] = r[key]
    return out


def summary(seeds: dict[int, dict[str, float]], metric: str):
    """:class:`core.report.stats.MeanStd` of ``metric`` over a method's seeds."""
    return mean_std(m[metric] for m in seeds.values())


def cell(seeds: dict[int, dict[str, float]], metric: str) -> str:
    _, scale, digits, _ = METRICS.get(metric, ("", 100, 1, True))
    return fmt_mean_std(summary(seeds, metric), digits, scale)


def offline_table(teacher: dict[str, Any], offline: dict[str, dict[int, dict]]) -> str:
    """One row per offline method (mean ± sample std over seeds) with the teacher on top."""
    cols = ("accuracy", "ece", "nll")
    header = ["method", *(METRICS[m][0] for m in cols), "agreement %", "Δ top-1 vs alone (pts)"]
    t = teacher["metrics"]
    rows = [
        ["teacher (1 run)", *(fmt(t[m], METRICS[m][2], METRICS[m][1]) for m in cols), "100", ""]
    ]
    base = offline.get("ce")
    for method, seeds in offline.items():
        delta = ""
        if base is not None and method != "ce":
            diffs = [seeds[s]["accuracy"] - base[s]["accuracy"] for s in seeds if s in base]
            delta = f"{100 * np.mean(diffs):+.2f}"
        cells = [cell(seeds, m) for m in cols] + [cell(seeds, "agreement"), delta]
        rows.append([label(method), *cells])
    return markdown_table(header, rows)


def online_table(online: list[dict[str, Any]], alone: dict[int, dict] | None) -> str:
    """Student and teacher metrics per online method (mean ± sample std over seeds), after the
    student alone (offline ``ce``: the same initialisation, batches and loss)."""
    cols = ("accuracy", "ece", "nll")
    students, teachers = per_seed(online), per_seed(online, "teacher_metrics")
    header = ["method", *(f"student {METRICS[m][0]}" for m in cols)]
    header += [f"teacher {METRICS[m][0]}" for m in cols]
    rows = []
    if alone is not None:
        rows.append([label("ce", online=True), *(cell(alone, c) for c in cols), "", "", ""])
    rows += [
        [label(m, online=True), *(cell(students[m], c) for c in cols),
         *(cell(teachers[m], c) for c in cols)]
        for m in students
    ]  # fmt: skip
    return markdown_table(header, rows)


def check_claims(
    paired: dict[str, dict[str, dict[int, float | dict]]], min_effect: dict[str, float]
) -> list[dict[str, Any]]:
    """Every claim of ``CLAIMS`` whose two methods were run: the claim rule's verdict on the
    paired per-seed differences, oriented so that positive favours the claim."""
    out = []
    for paper, text, (sa, ma), (sb, mb), metric in CLAIMS:
        a, b = paired.get(sa, {}).get(ma), paired.get(sb, {}).get(mb)
        if a is None or b is None:
            continue
        seeds = sorted(set(a) & set(b))
        value = (lambda r: r) if sa == "lm" else (lambda r, m=metric: r[m])
        sign = 1.0 if METRICS[metric][3] else -1.0
        diffs = [sign * (value(a[s]) - value(b[s])) for s in seeds]
        claim = paired_claim(diffs, min_effect=min_effect[metric])
        out.append(
            {"paper": paper, "claim": text, "metric": metric, "a": f"{sa}/{ma}",
             "b": f"{sb}/{mb}", **claim.as_dict()}
        )  # fmt: skip
    return out


def claims_table(claims: list[dict[str, Any]]) -> str:
    header = ["paper", "claim", "metric", "difference", "95 % CI", "seeds", "min effect", "MDE",
              "verdict"]  # fmt: skip
    rows = []
    for c in claims:
        scale = METRICS[c["metric"]][1]
        digits = 2 if scale == 100 else 3
        unit = " pts" if scale == 100 else " nats"
        rows.append(
            [c["paper"], c["claim"], c["metric"],
             f"{fmt(c['mean'], digits, scale)} ± {fmt(c['se'], digits, scale)}{unit}",
             f"{fmt(c['ci_low'], digits, scale)} to {fmt(c['ci_high'], digits, scale)}",
             str(c["n"]), fmt(c["min_effect"], digits, scale), fmt(c["mde"], digits, scale),
             f"**{c['verdict']}**"]
        )  # fmt: skip
    return markdown_table(header, rows, align="lllrrrrrl")


def plot(
    offline: dict[str, dict[int, dict]],
    online: dict[str, dict[int, dict]],
    teacher: dict[str, Any],
    path: Path,
) -> None:
    """Bar chart of student top-1 and ECE per method (offline, then online), ± sample std."""
    rows = [(m, s) for m, s in offline.items()] + [(f"online {m}", s) for m, s in online.items()]
    names = [n for n, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(rows) + 1.5), sharey=True)
    for ax, metric in zip(axes, ("accuracy", "ece"), strict=True):
        stats = [summary(s, metric) for _, s in rows]
        means, stds = [100 * x.mean for x in stats], [100 * x.std for x in stats]
        colors = [
            "tab:gray" if n == "ce" else
            "tab:orange" if n.startswith("online") else "tab:blue"
            for n in names
        ]  # fmt: skip
        ax.barh(range(len(rows)), means, xerr=stds, color=colors, capsize=2)
        ax.axvline(100 * summary(offline["ce"], metric).mean, color="k", ls="--", lw=1,
                   label="student alone")  # fmt: skip
        ax.axvline(100 * teacher["metrics"][metric], color="tab:red", ls=":", lw=1, label="teacher")
        ax.set_xlabel(f"student {METRICS[metric][0]} (mean ± sample std over seeds)")
        if metric == "accuracy":
            lo = min(m - s for m, s in zip(means, stds, strict=True))
            ax.set_xlim(lo - 1, max(100 * teacher["metrics"][metric], max(means)) + 0.5)
    axes[0].set_yticks(range(len(rows)), names)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def headline_metrics(
    teacher: dict[str, Any],
    offline: dict[str, dict[int, dict]],
    online: dict[str, dict[int, dict]],
    lm: dict[str, Any] | None,
) -> dict[str, Any]:
    """Flat DVC metrics: means over seeds, top-1 and ECE in %, LM val ppl per run."""
    top1 = {m: 100 * summary(s, "accuracy").mean for m, s in offline.items()}
    ece = {m: 100 * summary(s, "ece").mean for m, s in offline.items()}
    top1 |= {f"online_{m}": 100 * summary(s, "accuracy").mean for m, s in online.items()}
    ece |= {f"online_{m}": 100 * summary(s, "ece").mean for m, s in online.items()}
    out: dict[str, Any] = {
        "top1": top1,
        "ece": ece,
        "teacher": {"top1": 100 * teacher["metrics"]["accuracy"],
                    "ece": 100 * teacher["metrics"]["ece"]},
    }  # fmt: skip
    if lm is not None:
        losses = lm_by_seed(lm)
        out["val_ppl"] = {r: float(np.mean(np.exp(list(s.values())))) for r, s in losses.items()}
        out["teacher"]["val_ppl"] = lm["teacher"]["val_ppl"]
    return out


def bench_section(params: dict[str, Any]) -> str:
    """The fused-loss benchmark table (stage kd-bench) and, per divergence, the targets' verdict."""
    time_target, memory_target = 1.2, 1.25  # fused KD: x materialised time, x gradient buffers
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
        ok = t <= time_target and m <= memory_target
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


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def report(params: dict[str, Any]) -> str:
    """Write figures, claims.json, metrics.json and the README section; return the section."""
    cfg, rep = params["image"], params["report"]
    readme, out = Path(rep["readme"]), Path(rep["results"])
    res = Path(cfg["paths"]["results"])
    teacher, offline_res, online_res = (_load(res / f"{n}.json") for n in ("teacher", "offline",
                                                                          "online"))  # fmt: skip
    if teacher is None or offline_res is None or online_res is None:
        raise FileNotFoundError(f"{res}: run the kd-image-* stages first")
    lm = _load(Path(params["lm"]["paths"]["results"]) / "summary.json")
    offline, online = per_seed(offline_res["runs"]), per_seed(online_res["runs"])
    paired: dict[str, Any] = {"offline": offline, "online": online}
    if lm is not None:
        paired["lm"] = lm_by_seed(lm)
    claims = check_claims(paired, params["claims"]["min_effect"])
    atomic_write_json(out / "claims.json", claims)
    write_metrics(out / "metrics.json", headline_metrics(teacher, offline, online, lm))
    plot(offline, online, teacher, out / PLOT)

    d, o, to = cfg["data"], cfg["optim"], cfg["teacher_optim"]
    seeds = sorted({r["seed"] for r in offline_res["runs"]})
    student_params = offline_res["runs"][0]["n_params"]
    setup = (
        f"Fashion-MNIST. Teacher {net_desc(cfg['teacher'])} ({teacher['n_params']:,} "
        f"parameters, 1 run) trained on {d['teacher_size']} images for {to['epochs']} epochs; "
        f"students {net_desc(cfg['student'])} ({student_params:,} parameters) on a "
        f"{d['train_size']}-image subset of them for {o['epochs']} epochs (Adam lr {o['lr']}, "
        f"batch {o['batch_size']}, {o.get('schedule', 'cosine')} schedule); test: the "
        f"{d['test_size']} test images. Seeds {seeds}: mean ± sample std; every method of a seed "
        f"starts from the same initialisation and batch order. ECE: {cfg['n_bins']} equal-width "
        "bins, top label. Agreement: test top-1 agreement with the teacher. Δ: mean paired "
        "top-1 difference to the student alone."
    )
    rule = (
        "Claims fixed before the runs, checked with `core.report.claims.paired_claim`: the "
        "paired per-seed difference (oriented so that positive favours the claim), its "
        "standard error and 95 % t interval; **holds** = interval above 0 and mean >= the "
        "minimum effect (params `claims.min_effect`); **does not hold** = interval below the "
        "minimum effect; else **inconclusive**. MDE: the true effect this many seeds would "
        "detect with 80 % power at their observed spread."
    )
    online_seeds = sorted({r["seed"] for r in online_res["runs"]})
    cpu = {k: sum(r.get("cpu_s", 0) for r in v["runs"]) for k, v in
           (("offline", offline_res), ("online", online_res))}  # fmt: skip
    cost = (
        f"Cost of the last computation of each run (shared 2-core CPU): teacher "
        f"{teacher['cpu_s']:.0f} s CPU in its last invocation; offline "
        f"{len(offline_res['runs'])} runs, {cpu['offline']:.0f} s CPU; online "
        f"{len(online_res['runs'])} runs ({len(online_seeds)} seeds), {cpu['online']:.0f} s CPU"
    )
    if lm is not None:
        cost += f"; LM {len(lm['runs'])} runs, {sum(r['cpu_s'] for r in lm['runs']):.0f} s CPU"
    plot_link = os.path.relpath(out / PLOT, readme.parent)
    parts = [
        "## Results (generated by `dvc repro projects/kd/dvc.yaml`; do not edit by hand)",
        "### Images: offline KD, one row per divergence",
        setup,
        offline_table(teacher, offline),
        "### Images: online KD (teacher and student trained together on the student's subset)",
        online_table(online_res["runs"], offline.get("ce")),
        f"![student top-1 and ECE per method]({plot_link})",
    ]
    if lm is not None:
        parts.append(lm_section(lm, Path(params["lm"]["paths"]["results"]), readme.parent))
    else:
        parts.append("### Language model\n\nLM part not run.")
    parts += ["### Which claims hold here", rule, claims_table(claims), cost + ".",
              bench_section(params)]  # fmt: skip
    body = "\n\n".join(p.strip() for p in parts)
    replace_marked_section(readme, "results", body)
    return body


def main(argv: list[str] | None = None) -> str:
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    _, params, _ = parse_entry(parser, argv)
    body = report(params)
    print(f"kd-report: wrote {params['report']['readme']}", flush=True)
    return body


if __name__ == "__main__":
    main()
