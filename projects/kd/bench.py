"""Stage kd-bench: time and peak memory of the fused linear KD loss against the materialised one.

Measured by the kernels' shared harness (``kernels.bench.harness``: one fresh process per case,
peak memory above the inputs, one JSON layout), per divergence in ``params.bench``: the fused
``linear_kd_loss`` (chunked) and the materialised reference at N tokens, vocabulary V, hidden
D, and on CUDA Liger's fused linear JSD beside ``js`` when liger-kernel is installed. Each row
adds its time over the materialised one; ``rounds`` > 1 interleaves the methods.
``bench.vocab_parallel`` (optional; ``worlds``, ``divergences``): the fused loss with both heads
split by vocabulary rows over W processes (``process_group``), per-rank peak memory and time
against world 1, under "vocab_parallel" in results.json and a table of its own.
``bench.bf16`` (optional; ``divergences``, ``rounds``): both methods with bf16 hidden states and
heads (issue 18; materialised: bf16 logits, the divergence in fp32), each row's time over the
bf16 materialised one and the fused row's peak over its fp32 row's; under "bf16" in
results.json, a table of its own. Writes
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
VOCAB_PARALLEL = "chunked_vocab_parallel"
MODULE = "projects.kd.bench"  # the harness's workers run ``python -m MODULE --worker ...``


def build(case: dict):
    """The harness's inputs for one case -> (forward, [student hidden, student weight]); the
    vocabulary-parallel method gets this rank's rows of both heads (hidden states replicated)."""
    dev = torch.device(case["device"])
    n, v, d, temp = case["n"], case["v"], case["d"], case["temperature"]
    kw = dict(divergence=case["divergence"], temperature=temp)
    dt = getattr(torch, case.get("dtype", "float32"))
    if case["method"] == VOCAB_PARALLEL:  # one process group per case (the harness's)
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        kw["process_group"] = dist.group.WORLD
        e_s = (torch.randn(n, d, device=dev) / d**0.5).requires_grad_()  # same seed: replicated
        e_t = torch.randn(n, d, device=dev) / d**0.5
        torch.manual_seed(1 + rank)
        rows = v // world + (rank < v % world)
        w_s = torch.randn(rows, d, device=dev).requires_grad_()
        w_t = torch.randn(rows, d, device=dev)
    else:
        e_s = (torch.randn(n, d, device=dev) / d**0.5).to(dt).requires_grad_()
        w_s = torch.randn(v, d, device=dev).to(dt).requires_grad_()
        e_t = (torch.randn(n, d, device=dev) / d**0.5).to(dt)
        w_t = torch.randn(v, d, device=dev).to(dt)
    if case["method"] == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD  # GPU-only peer

        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=temp)
        return (lambda: jsd(e_s, w_s, e_t, w_t)), [e_s, w_s]
    from core.losses import linear_kd_loss

    if case["method"] == "materialised" and dt != torch.float32:  # logits in dt, D in fp32
        from core.losses.linear_kd import fused_divergence
        from kernels.kd import reference_linear_kd

        div = fused_divergence(kw.pop("divergence"))
        ref = dict(temperature=temp, compute_dtype=dt)
        return (lambda: reference_linear_kd(e_s, w_s, e_t, w_t, None, div, **ref)), [e_s, w_s]
    kw["impl"] = "reference" if case["method"] == "materialised" else "chunked"
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


def bf16_markdown(rows: list[dict], meta: dict) -> str:
    """The bf16 table: per divergence, time over the bf16 materialised row, peak over fp32's."""
    head = (
        f"\nFused linear KD loss with bf16 hidden states and heads (issue 18), N={meta['n']} "
        f"V={meta['v']} D={meta['d']}, loss in fp32; materialised: bf16 logits, the divergence in "
        "fp32; x fp32: the peak over the same method's fp32 row above.\n\n"
        "| divergence | method | time s | x materialised | peak MB above inputs | x fp32 peak "
        "| time s per round |\n|---|---|---:|---:|---:|---:|---|\n"
    )
    lines = []
    nan = float("nan")
    for r in rows:
        if "fwd_bwd_s" not in r:
            lines.append(f"| {r['divergence']} | {r['method']} | {r.get('error')} | | | | |")
            continue
        lines.append(
            f"| {r['divergence']} | {r['method']} | {r['fwd_bwd_s']:.2f} "
            f"| {r['time_vs_materialised']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} "
            f"| {r.get('peak_vs_fp32', nan):.2f} | "
            + " / ".join(f"{x['fwd_bwd_s']:.2f}" for x in r.get("rounds", []))
            + " |"
        )
    return head + "\n".join(lines) + "\n"


def _versus_fp32(rows: list[dict], fp32: list[dict]) -> list[dict]:
    """bf16 rows with their peak over the same (divergence, method) fp32 row's."""
    base = {(r["divergence"], r["method"]): r["peak_mem_bytes"] for r in fp32 if "fwd_bwd_s" in r}
    nan = float("nan")
    return [
        r | {"peak_vs_fp32": r["peak_mem_bytes"] / (base[(r["divergence"], r["method"])] or nan)}
        if "fwd_bwd_s" in r and (r["divergence"], r["method"]) in base
        else r
        for r in rows
    ]


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
    scaling: list[dict] = []
    half: list[dict] = []

    def write(rows: list[dict], vp_rows: list[dict] | None = None, half_rows=None) -> dict:
        doc = harness.document(meta, _versus_materialised(done + rows))
        text = markdown(doc["rows"], meta)
        h_rows = half + (half_rows or [])
        if h_rows:
            doc["bf16"] = _versus_fp32(_versus_materialised(h_rows), doc["rows"])
            text += bf16_markdown(doc["bf16"], meta)
        vp_rows = scaling if vp_rows is None else vp_rows
        if vp_rows:
            doc["vocab_parallel"] = vp_rows
            text += (
                "\nVocabulary-parallel fused KD (``process_group``): each rank holds V / W rows "
                "of both heads; per-rank peak above the inputs, slowest rank's time.\n\n"
                + harness.world_table(vp_rows, label="divergence")
            )
        atomic_write_json(out / "results.json", doc)
        atomic_write_text(out / "results.md", text)
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
    if cfg.get("vocab_parallel"):
        scaling += vocab_parallel_sweep(cfg, device, threads, lambda r: write([], r))
    bf16 = cfg.get("bf16") or {}
    for divergence in bf16.get("divergences", []):
        cases = [
            {"divergence": divergence, "method": m, "device": device, "threads": threads or 0,
             "dtype": "bfloat16"} | {k: meta[k] for k in ("n", "v", "d", "temperature", "repeats")}
            for m in METHODS
        ]  # fmt: skip
        half += harness.sweep(
            MODULE, cases, int(bf16.get("rounds", 1)), on_update=lambda r: write([], None, r)
        )
    return write([])


def vocab_parallel_sweep(cfg: dict, device: str, threads: int | None = None, on_update=None):
    """Per divergence of ``cfg["vocab_parallel"]`` (default: the first of ``divergences``) and
    world size of its ``worlds``: the vocabulary-parallel fused loss in W fresh processes (the
    ``threads`` budget split between them on CPU), against world 1."""
    vp = cfg["vocab_parallel"]
    rows: list[dict] = []  # the finished divergences' rows

    def update(got: list[dict]) -> None:
        on_update(rows + harness.versus_world1(got))

    for divergence in vp.get("divergences", cfg["divergences"][:1]):
        case = {"divergence": divergence, "method": VOCAB_PARALLEL, "device": device,
                "repeats": cfg.get("repeats", 0)}  # fmt: skip
        case |= {k: cfg[k] for k in ("n", "v", "d", "temperature")}
        cases = harness.world_cases(case, vp["worlds"], threads or torch.get_num_threads())
        sweep = harness.sweep(MODULE, cases, 1, on_update=update if on_update else None)
        rows += harness.versus_world1(sweep)
    return rows


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
