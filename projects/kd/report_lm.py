"""The language-model part of the kd report: table, claims and validation curves.

``lm_section(results_dir)`` reads ``<results_dir>/lm/metrics.json`` and the per-run curves
``<results_dir>/lm/runs/<run>_val.csv`` written by stage kd-lm-train, writes
``<results_dir>/lm/val_ppl.png`` and returns the markdown; projects/kd/report.py calls it.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from core.utils.io import atomic_open

CE_RUN = "ce"
# table order; runs not listed here follow in metrics order
ORDER = ("forward_kl", "reverse_kl", "js", "skew_kl", "skew_reverse_kl", "akl")
# divergences the papers put ahead of forward KL for LLM distillation
CLAIMS = {
    "reverse_kl": "MiniLLM (Gu et al. 2024) prefers reverse KL",
    "skew_kl": "DistiLLM (Ko et al. 2024) reports skew KL ahead",
    "akl": "AKL (Wu et al. 2024) reports AKL ahead",
}


def ordered_runs(runs: dict) -> list[str]:
    """CE-only first, then the divergences in ``ORDER``, then any others."""
    names = [n for n in (CE_RUN, *ORDER) if n in runs]
    return names + [n for n in runs if n not in names]


def _hparams(m: dict) -> str:
    if m.get("loss") == "ce":
        return "CE only"
    parts = [f"T={m['temperature']:g}"]
    if m.get("hard_weight"):
        parts.append(f"h={m['hard_weight']:g}")
    parts += [f"{k}={v:g}" for k, v in sorted(m.get("hparams", {}).items())]
    return ", ".join(parts)


def table(metrics: dict) -> str:
    """Markdown table: teacher, the CE-only student and each KD student's val loss / ppl."""
    runs, t = metrics["runs"], metrics["teacher"]
    ce = runs.get(CE_RUN)
    rows = [
        "| model | loss | val loss | val ppl | ppl vs CE-only | params | train CPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| teacher ({t['n_layer']} x {t['n_embd']}) | cce pipeline | {t['val_loss']:.4f} | "
        f"{t['val_ppl']:.1f} | | {t['n_params'] / 1e6:.1f}M | |",
    ]
    for name in ordered_runs(runs):
        m = runs[name]
        rel = f"{100 * (m['val_ppl'] / ce['val_ppl'] - 1):+.1f}%" if ce and name != CE_RUN else ""
        label = "student alone" if name == CE_RUN else f"student, {name}"
        rows.append(
            f"| {label} | {_hparams(m)} | {m['val_loss']:.4f} | {m['val_ppl']:.1f} | {rel} | "
            f"{m['n_params'] / 1e6:.1f}M | {m.get('cpu_s', m['wall_s']):.0f} |"
        )
    return "\n".join(rows)


def claims(metrics: dict) -> list[str]:
    """Computed claim lines: does KD beat CE-only, and do the papers' divergences beat FKL."""
    runs = metrics["runs"]
    kd = {n: m for n, m in runs.items() if n != CE_RUN}
    out = []
    if CE_RUN in runs and kd:
        ce = runs[CE_RUN]["val_ppl"]
        better = sorted((m["val_ppl"], n) for n, m in kd.items() if m["val_ppl"] < ce)
        best_ppl, best = min((m["val_ppl"], n) for n, m in kd.items())
        out.append(
            f"KD beats the student alone (val ppl {ce:.1f}) with {len(better)} of {len(kd)} "
            f"divergences; best {best} ({best_ppl:.1f}, {100 * (best_ppl / ce - 1):+.1f}%)."
        )
    if "forward_kl" in runs:
        fkl = runs["forward_kl"]["val_ppl"]
        for name, claim in CLAIMS.items():
            if name in runs:
                ppl = runs[name]["val_ppl"]
                verdict = "here it is ahead" if ppl < fkl else "here it is not"
                out.append(
                    f"{name} vs forward KL: {claim}; {verdict} "
                    f"(val ppl {ppl:.1f} vs {fkl:.1f}, {100 * (ppl / fkl - 1):+.1f}%)."
                )
    t = metrics["teacher"]["val_ppl"]
    n_under = sum(m["val_ppl"] < t for m in runs.values())
    out.append(f"Students below the teacher's val ppl ({t:.1f}): {n_under} of {len(runs)}.")
    return out


def read_curve(path: Path) -> list[tuple[int, float]]:
    """(step, val ppl) rows of a run's ``<run>_val.csv``."""
    with open(path, newline="") as f:
        return [(int(r["step"]), math.exp(float(r["val_loss"]))) for r in csv.DictReader(f)]


def plot(metrics: dict, lm_dir: Path, out: Path) -> None:
    """Validation perplexity vs step for every run, the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name in ordered_runs(metrics["runs"]):
        steps, ppl = zip(*read_curve(lm_dir / "runs" / f"{name}_val.csv"), strict=True)
        style = dict(color="black", lw=2) if name == CE_RUN else {}
        ax.plot(steps, ppl, marker="o", ms=3, label="CE only" if name == CE_RUN else name, **style)
    ax.axhline(metrics["teacher"]["val_ppl"], color="grey", ls="--", label="teacher")
    ax.set_yscale("log")
    ax.set_xlabel("training step (1 step = batch x block tokens)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("GPT student: token-level KD from the cce teacher")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def lm_section(results_dir: Path) -> str:
    """Markdown of the LM part (table, claims, plot link); writes ``lm/val_ppl.png``."""
    lm_dir = Path(results_dir) / "lm"
    metrics = json.loads((lm_dir / "metrics.json").read_text())
    plot(metrics, lm_dir, lm_dir / "val_ppl.png")
    runs = metrics["runs"]
    any_run = next(iter(runs.values()))
    curves = [read_curve(lm_dir / "runs" / f"{n}_val.csv") for n in runs]
    bump = max(
        (math.log(b[1] / a[1]) for c in curves for a, b in zip(c, c[1:])), default=0.0
    )  # largest rise of a val loss between two evaluations (nats)
    s = metrics["student"]
    lines = [
        "### Language model: token-level KD from the cce GPT",
        "",
        f"Student GPT {s['n_layer']} x {s['n_embd']} ({s['n_params'] / 1e6:.1f}M parameters) "
        f"trained for {any_run['steps']} steps of {any_run['tokens_per_step']} tokens, the same "
        "initialisation and batches for every run; KD through the fused "
        "`core.losses.linear_kd_loss` (no N x V logits). Validation on "
        f"{metrics['val_tokens']} held-out tokens, the teacher on the same.",
        "",
        table(metrics),
        "",
        *(f"- {c}" for c in claims(metrics)),
        f"- One seed per run: a validation loss rose by up to {bump:.2f} nats between two "
        "evaluations, so gaps of a few percent in perplexity are not resolved here.",
        "- The papers score generated text (ROUGE-L); validation perplexity is a likelihood, "
        "which the mass-covering forward KL optimises most directly.",
        "",
        "![validation perplexity](results/lm/val_ppl.png)",
    ]
    return "\n".join(lines) + "\n"
