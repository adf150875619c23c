"""Stage cce-report: README results table, loss-curve plot, torch-vs-CCE agreement check.

Reads ``<results>/{torch,cce}/metrics.json`` and the loss CSVs written by the train stages and
the kernel benchmark's ``results.md``; writes ``<results>/loss_curves.png``,
``<results>/report.json`` and the ``<!-- results:start/end -->`` section of the README.
Paper numbers (Wijmans et al. 2024, arXiv:2411.09009, Table 1) are quoted as theirs.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from core.utils.io import atomic_open, atomic_write_json, replace_marked_section
from projects.cce.common import LOSS_IMPLS, arg_parser, load_params

AGREEMENT_TOL = 0.01  # final val loss / perplexity of the two runs must agree within 1% relative
# Issue targets for the CPU path at the main benchmark size (N 4096, V 65536, D 512, fp32):
MEMORY_TARGET = 1.25  # peak above the inputs / gradient buffers ((N + V) x D floats)
BOUND_TARGET = 1.3  # time / (6 N V D flops at the measured sgemm rate)
PEER_TARGET = 1.0  # time / the fastest peer's time (median over interleaved rounds)

# Paper Table 1: A100-SXM4-80GB, N=8192, V=256000, D=2304 (Gemma 2 2B), bf16; loss+grad.
PAPER_TABLE1 = [
    ("Lower bound (gradient buffers)", "1161", "-"),
    ("CCE (theirs)", "1164", "135"),
    ("Liger Kernels", "1474", "303"),
    ("torchtune (8 chunks)", "9631", "170"),
    ("torch.compile", "16000", "143"),
    ("Baseline (PyTorch)", "28000", "207"),
    ("CCE without gradient filtering", "-", "362"),
]


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """``(steps, losses)`` from a ``step,loss`` CSV."""
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def relative_diff(a: float, b: float) -> float:
    """``|a - b| / |b|``."""
    return abs(a - b) / abs(b)


def plot_curves(results: Path, out: Path) -> None:
    """Train (per step) and validation loss of both runs on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"torch": ("tab:blue", "-"), "cce": ("tab:orange", "--")}
    for impl in LOSS_IMPLS:
        color, ls = styles[impl]
        steps, loss = read_curve(results / impl / "train_loss.csv")
        ax.plot(steps, loss, color=color, ls=ls, lw=1.2, label=f"{impl} train")
        vsteps, vloss = read_curve(results / impl / "val_loss.csv")
        ax.plot(vsteps, vloss, color=color, ls=ls, marker="o", ms=5, lw=0, label=f"{impl} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("GPT on CPython stdlib: torch CE vs CCE (same seed, same batches)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def runs_table(m: dict[str, dict], agree: dict) -> str:
    """Markdown table of the two training runs plus the agreement line."""
    mem_kind = m["torch"]["peak_memory_kind"]
    lines = [
        f"| loss | final val loss | val perplexity | train tokens/s | peak memory ({mem_kind}, MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for impl in LOSS_IMPLS:
        r = m[impl]
        lines.append(
            f"| {impl} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['peak_memory_mb']:.0f} |"
        )
    verdict = "agree" if agree["within_tolerance"] else "DO NOT agree"
    lines.append(
        f"\nRelative difference CCE vs torch: val loss {100 * agree['val_loss_rel_diff']:.3f}%, "
        f"perplexity {100 * agree['val_ppl_rel_diff']:.3f}% -> the runs {verdict} "
        f"within {100 * AGREEMENT_TOL:.0f}%."
    )
    return "\n".join(lines)


def bench_targets(bench: dict) -> dict:
    """The issue's targets for each chunked variant at the main V, from results.json.

    Per variant: memory ratio, 6NVD-bound ratios, and the per-round ratio to the fastest peer
    (``kernels.cce.benchmark.versus_fastest_peer``) with wall and CPU-time medians; ``met`` is
    each target's verdict (the peer target needs both medians <= PEER_TARGET).
    """
    from kernels.cce.benchmark import versus_fastest_peer

    v = bench["meta"]["v"]
    out = {}
    for r in bench["rows"]:
        if r["v"] != v or not r["method"].startswith("cce_") or "fwd_bwd_s" not in r:
            continue
        vs = versus_fastest_peer(bench["rows"], v, ours=r["method"])
        t = {
            "mem_vs_grad_buffers": r["mem_vs_grad_buffers"],
            "time_vs_bound": r["time_vs_bound"],
            "cpu_time_vs_bound": r["cpu_time_vs_bound"],
            "vs_fastest_peer": vs,
        }
        t["met"] = {
            "memory": r["mem_vs_grad_buffers"] <= MEMORY_TARGET,
            "bound": max(r["time_vs_bound"], r["cpu_time_vs_bound"]) <= BOUND_TARGET,
            "peer": vs is not None and max(vs["wall_median"], vs["cpu_median"]) <= PEER_TARGET,
        }
        out[r["method"]] = t
    return out


def targets_text(targets: dict, v: int) -> str:
    """One bullet per chunked variant: each target's figure and verdict."""
    yes = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    lines = [f"Targets at V={v} (computed from the table above):"]
    for method, t in targets.items():
        parts = [
            f"memory {t['mem_vs_grad_buffers']:.2f} x the gradient buffers "
            f"(target <= {MEMORY_TARGET}: {yes(t['met']['memory'])})",
            f"{t['time_vs_bound']:.2f} x the 6NVD bound, {t['cpu_time_vs_bound']:.2f} x in CPU "
            f"time (target <= {BOUND_TARGET}: {yes(t['met']['bound'])})",
        ]
        vs = t["vs_fastest_peer"]
        if vs is None:
            parts.append("no peer timings")
        else:
            rounds = ", ".join(f"{x:.3f}" for x in vs["wall"])
            faster = sum(x <= 1.0 for x in vs["wall"])
            parts.append(
                f"vs the fastest peer ({', '.join(sorted(set(vs['peer'])))}): median "
                f"{vs['wall_median']:.3f} x wall time (rounds {rounds}; ours faster in {faster} "
                f"of {len(vs['wall'])}), {vs['cpu_median']:.3f} x CPU time "
                f"(target <= {PEER_TARGET:.1f}: {yes(t['met']['peer'])})"
            )
        lines.append(f"- `{method}`: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def paper_table() -> str:
    lines = [
        "| method (paper, A100-80GB) | loss+grad memory (MB) | loss+grad time (ms) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {mem} | {ms} |" for name, mem, ms in PAPER_TABLE1]
    return "\n".join(lines)


def build_report(params: dict, readme: str | Path) -> dict:
    """Write the plot, report.json and the README section; return the agreement summary."""
    results = Path(params["paths"]["results"])
    m = {impl: json.loads((results / impl / "metrics.json").read_text()) for impl in LOSS_IMPLS}
    agree = {
        "val_loss_rel_diff": relative_diff(
            m["cce"]["final_val_loss"], m["torch"]["final_val_loss"]
        ),
        "val_ppl_rel_diff": relative_diff(m["cce"]["final_val_ppl"], m["torch"]["final_val_ppl"]),
    }
    agree["within_tolerance"] = max(agree.values()) < AGREEMENT_TOL
    plot_curves(results, results / "loss_curves.png")

    bench_dir = Path(params["bench"]["out"])
    bench_md = (bench_dir / "results.md").read_text(encoding="utf-8").strip()
    bench = json.loads((bench_dir / "results.json").read_text(encoding="utf-8"))
    targets = bench_targets(bench)
    atomic_write_json(
        results / "report.json", {"agreement": agree, "runs": m, "bench_targets": targets}
    )
    readme_dir = Path(readme).resolve().parent
    plot_link = Path(os.path.relpath((results / "loss_curves.png").resolve(), readme_dir))
    bench_plot = Path(os.path.relpath((bench_dir / "memory_time_vs_v.png").resolve(), readme_dir))
    r0 = m["torch"]
    body = "\n\n".join(
        [
            f"### Training runs ({r0['steps']} steps x {r0['tokens_per_step']} tokens, "
            f"{r0['n_params'] / 1e6:.1f} M params, device {r0['device']})",
            runs_table(m, agree),
            f"![loss curves]({plot_link.as_posix()})",
            "### Loss + gradient benchmark (ours, this machine)",
            bench_md,
            targets_text(targets, bench["meta"]["v"]),
            f"![memory and time vs V]({bench_plot.as_posix()})",
            "### Paper Table 1 (theirs: Wijmans et al. 2024, A100-SXM4-80GB, N=8192, "
            "V=256000, D=2304, Gemma 2 2B; not measured here)",
            paper_table(),
        ]
    )
    replace_marked_section(readme, params["report"]["readme_section"], body)
    return agree


def main(argv: list[str] | None = None) -> None:
    args = arg_parser(__doc__).parse_args(argv)
    params = load_params(args.params)
    agree = build_report(params, params["report"]["readme"])
    print(f"report: {agree}")


if __name__ == "__main__":
    main()
