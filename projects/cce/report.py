"""Stage cce-report: README results, loss-curve figure, DVC metrics, torch-vs-CCE agreement.

Reads ``<results>/{torch,cce}/run.json`` (the train stages' records) and the kernel benchmark's
``results.md`` / ``results.json`` (``bench.out``); writes ``<results>/loss_curves.png``,
``<results>/report.json`` (agreement, run figures, bench target verdicts), the flat DVC metrics
``<results>/metrics.json`` and the ``<!-- results:start/end -->`` section of the README.
Paper numbers (Wijmans et al. 2024, arXiv:2411.09009, Table 1) are quoted as theirs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from core.engine.config import entry_parser, parse_entry
from core.report.claims import Claim, paired_claim
from core.report.figures import plt, save_figure
from core.report.metrics import write_metrics
from core.report.tables import fmt, markdown_table
from core.utils.io import atomic_write_json, replace_marked_section
from projects.cce import DEFAULT_PARAMS, LOSS_IMPLS

# Issue targets for the CPU path at the main benchmark size (N 4096, V 65536, D 512, fp32):
MEMORY_TARGET = 1.25  # peak above the inputs / gradient buffers ((N + V) x D floats)
BOUND_TARGET = 1.3  # time / (6 N V D flops at the measured sgemm rate)
PEER_TARGET = 1.0  # time / the fastest peer's time (median over interleaved rounds)
# Issue 18's targets for bf16 e and c at the same size: time <= the fastest peer's (PEER_TARGET),
# peak above the inputs <= BF16_PEER_MEMORY x the peer's, time <= BOUND_TARGET x the 6NVD bound
# at the measured bf16 matmul rate.
BF16_PEER_MEMORY = 0.5
RUN_FIGURES = (  # the run.json fields report.json keeps (history and identity stay in run.json)
    "steps",
    "tokens_per_step",
    "final_train_loss",
    "final_val_loss",
    "final_val_ppl",
    "tokens_per_s",
    "tokens_per_s_steps",
    "peak_memory_mb",
    "peak_memory_kind",
    "wall_s",
    "n_params",
    "device",
    "torch_threads",
)

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


def relative_diff(a: float, b: float) -> float:
    """``|a - b| / |b|``."""
    return abs(a - b) / abs(b)


def agreement(runs: dict[str, dict], tol: float) -> dict:
    """CCE vs torch: relative differences of the final val loss and perplexity, and whether
    both are below ``tol``. One seed, identical batches: the two runs differ only by the loss
    implementation's rounding, so this is an equivalence check, not a comparison over seeds."""
    if not 0 < tol < 1:
        raise ValueError(f"report.agreement_tol must lie in (0, 1), got {tol!r}")
    cce, ref = runs["cce"], runs["torch"]
    out = {
        "val_loss_rel_diff": relative_diff(cce["final_val_loss"], ref["final_val_loss"]),
        "val_ppl_rel_diff": relative_diff(cce["final_val_ppl"], ref["final_val_ppl"]),
    }
    out["within_tolerance"] = max(out.values()) < tol
    return out


def plot_curves(runs: dict[str, dict], out: Path) -> None:
    """Train (per step) and validation loss of both runs on one axis."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"torch": ("tab:blue", "-"), "cce": ("tab:orange", "--")}
    for impl in LOSS_IMPLS:
        color, ls = styles[impl]
        steps, loss = zip(*runs[impl]["history"]["train"], strict=True)
        ax.plot(steps, loss, color=color, ls=ls, lw=1.2, label=f"{impl} train")
        vsteps, vloss = zip(*runs[impl]["history"]["val"], strict=True)
        ax.plot(vsteps, vloss, color=color, ls=ls, marker="o", ms=5, lw=0, label=f"{impl} val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("GPT on CPython stdlib: torch CE vs CCE (same seed, same batches)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out)


def runs_table(runs: dict[str, dict], agree: dict, tol: float) -> str:
    """Markdown table of the two training runs plus the agreement line."""
    r0 = runs["torch"]
    header = [
        "loss",
        "final val loss",
        "val perplexity",
        "train tokens/s",
        f"peak memory ({r0['peak_memory_kind']}, MB)",
        "run wall s",
    ]
    rows = [
        [
            impl,
            fmt(r["final_val_loss"], 4),
            fmt(r["final_val_ppl"], 2),
            fmt(r["tokens_per_s"], 0),
            fmt(r["peak_memory_mb"], 0),
            fmt(r["wall_s"], 0),
        ]
        for impl, r in ((i, runs[i]) for i in LOSS_IMPLS)
    ]
    verdict = "agree" if agree["within_tolerance"] else "DO NOT agree"
    steps = r0["tokens_per_s_steps"]
    where = f"over steps {steps[0]}-{steps[1]}" if steps else "not measured (too few steps)"
    return "\n".join(
        [
            markdown_table(header, rows),
            "",
            f"Relative difference CCE vs torch: val loss {100 * agree['val_loss_rel_diff']:.3f}%, "
            f"perplexity {100 * agree['val_ppl_rel_diff']:.3f}% -> the runs {verdict} "
            f"within {100 * tol:g}%. Train tokens/s: Lightning's ThroughputMonitor {where} "
            f"(validation excluded); run wall s: the whole run, validations included.",
        ]
    )


def headline_metrics(runs: dict[str, dict], agree: dict, targets: dict) -> dict:
    """The flat DVC metrics: per impl val loss, perplexity, tokens/s, peak MB; the agreement;
    per chunked bench variant its memory, 6NVD-bound and fastest-peer ratios."""
    per_impl = {
        "val_loss": "final_val_loss",
        "val_ppl": "final_val_ppl",
        "tokens_per_s": "tokens_per_s",
        "peak_mb": "peak_memory_mb",
    }
    out: dict = {k: {i: runs[i][f] for i in LOSS_IMPLS} for k, f in per_impl.items()}
    out["rel_diff"] = {"val_loss": agree["val_loss_rel_diff"], "val_ppl": agree["val_ppl_rel_diff"]}
    bench = {}
    for method, t in targets.items():
        vs = t["vs_fastest_peer"] or {}
        bench[method.replace(".", "_")] = {
            "mem": t["mem_vs_grad_buffers"],
            "bound": t["time_vs_bound"],
            "bound_cpu": t["cpu_time_vs_bound"],
            "peer": vs.get("wall_median"),
            "peer_cpu": vs.get("cpu_median"),
        }
    out["bench"] = bench
    return out


def bench_targets(bench: dict) -> dict:
    """The issue's targets for each chunked variant at the main V, from results.json.

    Per variant: memory ratio, 6NVD-bound ratios, and the per-round ratio to the fastest peer
    (a peer: a method that is not ours, ``cce_*``; ``kernels.bench.harness.median_ratio``) with
    wall and CPU-time medians; ``met`` is each target's verdict (the peer target needs both
    medians <= PEER_TARGET).
    """
    grad_bytes = bench["meta"]["grad_buffer_bytes"]

    def memory(r: dict) -> dict:
        return {"mem_vs_grad_buffers": r["peak_mem_bytes"] / grad_bytes}

    return _variant_targets(bench["rows"], bench["meta"]["v"], memory, MEMORY_TARGET)


def bf16_targets(bench: dict) -> dict:
    """Issue 18's targets for each of our bf16 variants at the main V, from results.json's
    "bf16" rows: as ``bench_targets``, with memory as the bench's own peak over the fastest
    peer's (``mem_vs_peer``, ``projects.cce.bench.bf16_rows``; <= BF16_PEER_MEMORY, that peer's
    peak beside it) and the bound at the bf16 matmul rate. {} without bf16 rows or peers."""
    rows = bench.get("bf16", [])
    peak = {(r["method"], r["v"]): r.get("peak_mem_bytes") for r in rows}

    def memory(r: dict) -> dict | None:
        if "mem_vs_peer" not in r:  # no peer timed at this V
            return None
        peer_mb = peak[(r["fastest_peer"], r["v"])] / 2**20
        return {"mem_vs_peer": r["mem_vs_peer"], "peer_peak_mb": peer_mb}

    return _variant_targets(rows, bench["meta"]["v"], memory, BF16_PEER_MEMORY)


def _variant_targets(
    rows: list[dict], v: int, memory: Callable[[dict], dict | None], memory_cap: float
) -> dict:
    """{our method: figures and ``met``} at V=v. ``memory(row)``: the row's memory figures, the
    first of them judged against ``memory_cap``; None skips the row."""
    from kernels.bench.harness import median_ratio

    at_v = [r for r in rows if r["v"] == v]
    out = {}
    for r in at_v:
        mem = memory(r) if r["method"].startswith("cce_") and "fwd_bwd_s" in r else None
        if mem is None:
            continue
        vs = median_ratio(at_v, r["method"], lambda m: not m.startswith("cce_"))
        if vs is not None:
            vs["speed_claim"] = speed_claim(vs["wall"]).as_dict()
        t = {
            **mem,
            "time_vs_bound": r["time_vs_bound"],
            "cpu_time_vs_bound": r["cpu_time_vs_bound"],
            "vs_fastest_peer": vs,
        }
        t["met"] = {
            "memory": next(iter(mem.values())) <= memory_cap,
            "bound": max(r["time_vs_bound"], r["cpu_time_vs_bound"]) <= BOUND_TARGET,
            "peer": vs is not None and max(vs["wall_median"], vs["cpu_median"]) <= PEER_TARGET,
        }
        out[r["method"]] = t
    return out


def yes(ok: bool) -> str:
    """A target's verdict word in the README."""
    return "met" if ok else "NOT met"


def speed_claim(ratios: list[float]) -> Claim:
    """The claim that ours is faster than the peer, paired over the interleaved rounds: per round
    100 ln(peer / ours) (about the percentage by which ours is faster), minimum effect 0. Its CI
    and MDE say what difference these rounds can resolve; the issue's target stays the median
    ratio."""
    return paired_claim([-100.0 * math.log(x) for x in ratios], min_effect=0.0)


def peer_text(vs: dict, met: bool) -> str:
    """The per-round comparison with the fastest peer (``harness.median_ratio``), its verdict and
    the paired claim over the rounds (``speed_claim``)."""
    rounds = ", ".join(f"{x:.3f}" for x in vs["wall"])
    faster = sum(x <= 1.0 for x in vs["wall"])
    claim = Claim(**vs["speed_claim"]).text("%", digits=1)
    return (
        f"vs the fastest peer ({', '.join(sorted(set(vs['peer'])))}): median "
        f"{vs['wall_median']:.3f} x wall time (rounds {rounds}; ours faster in {faster} "
        f"of {len(vs['wall'])}), {vs['cpu_median']:.3f} x CPU time "
        f"(target <= {PEER_TARGET:.1f}: {yes(met)}); ours faster, "
        f"100 ln(peer / ours) paired over the rounds: {claim}"
    )


def targets_text(targets: dict, v: int) -> str:
    """One bullet per chunked variant: each target's figure and verdict."""
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
            parts.append(peer_text(vs, t["met"]["peer"]))
        lines.append(f"- `{method}`: " + "; ".join(parts) + ".")
    return "\n".join(lines)


def bf16_targets_text(targets: dict, v: int) -> str:
    """One bullet per bf16 variant of ours: each of issue 18's targets and its verdict."""
    if not targets:
        return ""
    lines = [f"bf16 targets at V={v} (issue 18; computed from the bf16 table above):"]
    for method, t in targets.items():
        lines.append(
            f"- `{method}`: {peer_text(t['vs_fastest_peer'], t['met']['peer'])}; "
            f"peak memory {t['mem_vs_peer']:.2f} x the peer's "
            f"{t['peer_peak_mb']:.0f} MB "
            f"(target <= {BF16_PEER_MEMORY}: {yes(t['met']['memory'])}); "
            f"{t['time_vs_bound']:.2f} x the bf16 6NVD bound, {t['cpu_time_vs_bound']:.2f} x in "
            f"CPU time (target <= {BOUND_TARGET}: {yes(t['met']['bound'])})."
        )
    return "\n".join(lines)


def paper_table() -> str:
    """The paper's Table 1 (theirs), as Markdown."""
    return markdown_table(
        ["method (paper, A100-80GB)", "loss+grad memory (MB)", "loss+grad time (ms)"],
        PAPER_TABLE1,
    )


def load_runs(results: Path) -> dict[str, dict]:
    """``{impl: run record}`` from ``<results>/<impl>/run.json``."""
    return {
        impl: json.loads((results / impl / "run.json").read_text(encoding="utf-8"))
        for impl in LOSS_IMPLS
    }


def build_report(params: dict, readme: str | Path) -> dict:
    """Write the figure, report.json, metrics.json and the README section; return the
    agreement summary."""
    results = Path(params["paths"]["results"])
    tol = params["report"]["agreement_tol"]
    runs = load_runs(results)
    agree = agreement(runs, tol)
    plot_curves(runs, results / "loss_curves.png")

    bench_dir = Path(params["bench"]["out"])
    bench_md = (bench_dir / "results.md").read_text(encoding="utf-8").strip()
    bench = json.loads((bench_dir / "results.json").read_text(encoding="utf-8"))
    targets, targets16 = bench_targets(bench), bf16_targets(bench)
    figures = {i: {k: runs[i][k] for k in RUN_FIGURES} for i in LOSS_IMPLS}
    atomic_write_json(
        results / "report.json",
        {"agreement": agree, "runs": figures, "bench_targets": targets,
         "bf16_targets": targets16},
    )  # fmt: skip
    write_metrics(results / "metrics.json", headline_metrics(runs, agree, targets))
    readme_dir = Path(readme).resolve().parent
    plot_link = Path(os.path.relpath((results / "loss_curves.png").resolve(), readme_dir))
    bench_plot = Path(os.path.relpath((bench_dir / "memory_time_vs_v.png").resolve(), readme_dir))
    r0 = runs["torch"]
    body = "\n\n".join(
        [
            f"### Training runs ({r0['steps']} steps x {r0['tokens_per_step']} tokens, "
            f"{r0['n_params'] / 1e6:.1f} M params, device {r0['device']}, "
            f"{r0['torch_threads']} threads)",
            runs_table(runs, agree, tol),
            f"![loss curves]({plot_link.as_posix()})",
            "### Loss + gradient benchmark (ours, this machine)",
            bench_md,
            targets_text(targets, bench["meta"]["v"]),
            *[x for x in [bf16_targets_text(targets16, bench["meta"]["v"])] if x],
            f"![memory and time vs V]({bench_plot.as_posix()})",
            "### Paper Table 1 (theirs: Wijmans et al. 2024, A100-SXM4-80GB, N=8192, "
            "V=256000, D=2304, Gemma 2 2B; not measured here)",
            paper_table(),
        ]
    )
    replace_marked_section(readme, params["report"]["readme_section"], body)
    return agree


def build_parser() -> argparse.ArgumentParser:
    """The stage's command line (the engine's: ``--params``, ``--variant``, ``--set``, ...)."""
    return entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)


def main(argv: list[str] | None = None) -> dict:
    _, params, _ = parse_entry(build_parser(), argv)
    agree = build_report(params, params["report"]["readme"])
    print(f"report: {agree}")
    return agree


if __name__ == "__main__":
    main()
