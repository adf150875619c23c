"""Stage kd-bench: time and peak memory of the fused linear KD loss against the materialised one.

Measured by the kernels' shared harness (``kernels.bench.harness``: one fresh process per case,
peak memory above the inputs, one JSON layout), per divergence in ``params.bench``: the fused
``linear_kd_loss`` (chunked) and the materialised reference at N tokens, vocabulary V, hidden
D, and on CUDA Liger's fused linear JSD beside ``js`` when liger-kernel is installed. Each row
adds its time over the materialised one; ``rounds`` > 1 interleaves the methods. Writes
``results.json`` and ``results.md`` into ``bench.out``; the report stage puts the table into
projects/kd/README.md. ``make bench PROJECT=kd`` runs this stage.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from core.engine.config import entry_parser, parse_entry
from core.utils.io import atomic_write_json, atomic_write_text
from kernels.bench import harness
from projects.kd import DEFAULT_PARAMS

METHODS = ("materialised", "chunked")
MODULE = "projects.kd.bench"  # the harness's workers run ``python -m MODULE --worker ...``


def build(case: dict):
    """The harness's inputs for one case -> (forward, [student hidden, student weight])."""
    dev = torch.device(case["device"])
    n, v, d, temp = case["n"], case["v"], case["d"], case["temperature"]
    e_s = (torch.randn(n, d, device=dev) / d**0.5).requires_grad_()
    w_s = torch.randn(v, d, device=dev).requires_grad_()
    e_t = torch.randn(n, d, device=dev) / d**0.5
    w_t = torch.randn(v, d, device=dev)
    if case["method"] == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD  # GPU-only peer

        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=temp)
        return (lambda: jsd(e_s, w_s, e_t, w_t)), [e_s, w_s]
    from core.losses import linear_kd_loss

    impl = {"materialised": "reference", "chunked": "chunked"}[case["method"]]
    kw = dict(divergence=case["divergence"], temperature=temp, impl=impl)
    return (lambda: linear_kd_loss(e_s, w_s, e_t, w_t, **kw)), [e_s, w_s]


def markdown(rows: list[dict], meta: dict) -> str:
    """The results table: per divergence, each method's time and peak memory with the ratios."""
    head = (
        f"Fused linear KD loss, fwd+bwd, N={meta['n']} V={meta['v']} D={meta['d']} fp32, "
        f"T={meta['temperature']}, device {meta['device']} ({meta['threads']} threads); time: "
        f"best of the steady (second) call and {meta['repeats']} more; memory: peak above the "
        f"inputs of the steady call; gradient buffers (N + V) x D = "
        f"{meta['grad_buffer_bytes'] / 2**20:.1f} MB. Measured by {harness.MEASURE}. Targets: "
        "time <= 1.2 x materialised, memory <= 1.25 x the gradient buffers.\n\n"
        "| divergence | method | time s | x materialised | peak MB above inputs | x grad buffers "
        "| first-call peak MB |\n|---|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if "fwd_bwd_s" not in r:
            lines.append(f"| {r['divergence']} | {r['method']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['divergence']} | {r['method']} | {r['fwd_bwd_s']:.2f} "
            f"| {r['time_vs_materialised']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} "
            f"| {r['peak_vs_grad_buffers']:.2f} | {r['first_call_peak_bytes'] / 2**20:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def _versus_materialised(rows: list[dict]) -> list[dict]:
    """Each row of a divergence with its time over the materialised row's."""
    base = {r["divergence"]: r["fwd_bwd_s"] for r in rows if r["method"] == "materialised"}
    return [
        r | {"time_vs_materialised": r["fwd_bwd_s"] / base.get(r["divergence"], float("nan"))}
        if "fwd_bwd_s" in r
        else r
        for r in rows
    ]


def run(cfg: dict, device: str, threads: int | None = None) -> dict:
    """Every (divergence, method) of a ``bench:`` params block; returns the written document."""
    out = Path(cfg["out"])
    meta = {k: cfg[k] for k in ("n", "v", "d", "temperature")} | {
        "device": device, "repeats": cfg.get("repeats", 0), "rounds": cfg.get("rounds", 1),
        "threads": threads or torch.get_num_threads(), "divergences": cfg["divergences"],
        "grad_buffer_bytes": (cfg["n"] + cfg["v"]) * cfg["d"] * 4, "torch": torch.__version__,
    }  # fmt: skip
    methods = list(METHODS)
    if device.startswith("cuda"):
        try:
            import liger_kernel  # noqa: F401

            methods.append("liger")
        except ImportError:
            print("liger-kernel not installed: skipping its fused linear JSD", file=sys.stderr)
    done: list[dict] = []

    def write(rows: list[dict]) -> dict:
        doc = harness.document(meta, _versus_materialised(done + rows))
        atomic_write_json(out / "results.json", doc)
        atomic_write_text(out / "results.md", markdown(doc["rows"], meta))
        return doc

    out.mkdir(parents=True, exist_ok=True)
    for divergence in cfg["divergences"]:
        cases = [
            {"divergence": divergence, "method": m, "device": device, "threads": threads or 0}
            | {k: meta[k] for k in ("n", "v", "d", "temperature", "repeats")}
            for m in methods
            if m != "liger" or divergence == "js"  # Liger has a fused JSD only
        ]
        done += harness.sweep(MODULE, cases, meta["rounds"], on_update=write)
    return write([])


def main(argv: list[str] | None = None) -> None:
    """Stage entry point; ``--worker '<case json>'`` measures one case (the harness's child)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        harness.worker_main(build, argv)
        return
    parser = entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, params, _ = parse_entry(parser, argv)
    run(params["bench"], args.device, args.threads)


if __name__ == "__main__":
    main()
