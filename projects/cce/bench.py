"""Stage cce-bench: loss + gradient memory and time of linear cross-entropy implementations.

Measured by the kernels' shared harness (``kernels.bench.harness``: one fresh process per case,
peak memory above the inputs, interleaved rounds, one JSON layout). ``params.bench``: N tokens,
vocabulary V, hidden D, a V ``sweep``, ``repeats`` per process, ``rounds`` (the method list runs
that many times interleaved at the main V; a row is its median round) and optionally
``methods``. ``cce_chunked@1.5`` is the chunked path with ``memory_target`` 1.5, ``cce_chunked@2/4k`` the same
at 2 with its CPU work buffers on 4 KiB pages (``KERNELS_CPU_HUGE_PAGES=0``: the A/B of the
huge-page workspace, ``kernels.chunking.workspace``). Writes
``results.json`` (the harness layout; each row adds its time over the 6 N V D flops bound at the
measured sgemm rate, wall and CPU), ``results.md`` and ``memory_time_vs_v.png`` (on CPU its time
axis is process CPU time) into ``bench.out``, rewritten after every case. ``bench.vocab_parallel``
(optional): ``worlds``, the process counts at which the vocabulary-parallel loss runs at N, V, D
(each rank 1/W of the head rows; gloo processes with the cores split between them on CPU, nccl
with one GPU per rank on CUDA); its rows (per-rank peak memory and time, each world's memory over
world 1's) go under "vocab_parallel" in results.json and a table of their own in results.md.
``bench.bf16`` (optional; ``methods``, ``sweep``, ``rounds``): the same cases with bf16 e and c
(issue 18), each row's time over the 6 N V D bound at the measured bf16 matmul rate, over the
fastest bf16 peer's time and memory; under "bf16" in results.json, a table of its own.
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from core.engine.config import entry_parser, parse_entry
from core.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from kernels.bench import harness
from projects.cce import DEFAULT_PARAMS

CPU_METHODS = [
    "cce_chunked",
    "cce_chunked@1.5",
    "torch_eager",
    "torch_lce",
    "torch_lce_chunked",
    "peer_torch_compile",
]
CUDA_METHODS = CPU_METHODS + ["cce_triton", "peer_cce", "liger"]
MATERIALISED = {"torch_eager", "torch_lce", "peer_torch_compile"}
BF16_METHODS = [
    "cce_chunked",
    "cce_chunked@2",
    "cce_chunked@2/4k",
    "peer_torch_compile",
    "torch_eager",
]
SMALL_PAGES = "/4k"  # cce_chunked[@t]/4k: work buffers on 4 KiB pages (KERNELS_CPU_HUGE_PAGES=0)
BF16 = {"dtype": "bfloat16"}
MAX_LOGITS_GB = 6.0  # materialising methods are skipped above 3 x N x V x 4 bytes
MODULE = "projects.cce.bench"  # the harness's workers run ``python -m MODULE --worker ...``


def loss_fn(name: str):
    """(e, c, targets) -> scalar mean loss for the named implementation."""
    if name == "cce_chunked" or name.startswith(("cce_chunked@", "cce_chunked/")):
        from core.losses.linear_ce import linear_cross_entropy

        name = name.removesuffix(SMALL_PAGES)
        target = float(name.split("@", 1)[1]) if "@" in name else None
        return lambda e, c, t: linear_cross_entropy(e, c, t, impl="chunked", memory_target=target)
    if name == "cce_triton":
        from core.losses.linear_ce import linear_cross_entropy

        return lambda e, c, t: linear_cross_entropy(e, c, t, impl="triton")
    if name == "torch_eager":
        return lambda e, c, t: F.cross_entropy((e @ c.T).float(), t)
    if name == "torch_lce":
        return lambda e, c, t: F.linear_cross_entropy(e, c, t)
    if name == "torch_lce_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda e, c, t: F.linear_cross_entropy(e, c, t, options=opts)
    if name in ("peer_torch_compile", "peer_cce"):
        from cut_cross_entropy import linear_cross_entropy as peer

        impl = "torch_compile" if name == "peer_torch_compile" else "cce"
        return lambda e, c, t: peer(e, c, t, impl=impl)
    if name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda e, c, t: liger_fused_linear_cross_entropy(e, c, t)
    raise ValueError(f"unknown method {name!r}; known: {CUDA_METHODS}")


def build(case: dict):
    """The harness's inputs for one case: e (n, d), c (v, d) in ``case["dtype"]`` (default fp32),
    targets (n,) -> (forward, [e, c]); a vocabulary-parallel case gets this rank's rows of c (one
    process group per case)."""
    dev = torch.device(case["device"])
    n, v, d = case["n"], case["v"], case["d"]
    if case["method"] == VOCAB_PARALLEL:
        return _build_vocab_parallel(n, v, d, dev)
    if case["method"].endswith(SMALL_PAGES):  # this worker process only
        from kernels.chunking import HUGE_PAGES_ENV

        os.environ[HUGE_PAGES_ENV] = "0"
    fn = loss_fn(case["method"])
    dt = getattr(torch, case.get("dtype", "float32"))
    e = (torch.randn(n, d, device=dev) / d**0.25).to(dt).requires_grad_()
    c = (torch.randn(v, d, device=dev) / d**0.25).to(dt).requires_grad_()
    t = torch.randint(0, v, (n,), device=dev)
    return (lambda: fn(e, c, t)), [e, c]


VOCAB_PARALLEL = "cce_vocab_parallel"  # linear_cross_entropy over the harness's process group


def _build_vocab_parallel(n: int, v: int, d: int, dev: torch.device):
    """e (n, d) and targets replicated (the harness seeds every rank alike), c: this rank's
    contiguous V / W (+1 on the first V mod W ranks) rows, its own values."""
    import torch.distributed as dist

    from core.losses.linear_ce import linear_cross_entropy

    rank, world = dist.get_rank(), dist.get_world_size()
    e = (torch.randn(n, d, device=dev) / d**0.25).requires_grad_()
    t = torch.randint(0, v, (n,), device=dev)
    rows = v // world + (rank < v % world)
    g = torch.Generator(device=dev).manual_seed(1 + rank)
    c = (torch.randn(rows, d, device=dev, generator=g) / d**0.25).requires_grad_()
    group = dist.group.WORLD
    return (lambda: linear_cross_entropy(e, c, t, process_group=group)), [e, c]


def available(method: str, device: str) -> str | None:
    """None if the method can run here, else the reason it is skipped."""
    try:
        if method == "liger":
            import liger_kernel  # noqa: F401
        if method.startswith("peer"):
            import cut_cross_entropy  # noqa: F401
        if method == "torch_lce_chunked" and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return "torch.nn.LinearCrossEntropyOptions missing"
    except ImportError as err:
        return f"not importable: {err}"
    if method in ("cce_triton", "peer_cce", "liger") and device != "cuda":
        return "needs CUDA"
    return None


def sgemm_rate(n: int, v: int, d: int, device: str, dtype=torch.float32) -> tuple[float, float]:
    """FLOP/s of the three GEMMs of a linear CE step on the full shapes in ``dtype`` (default
    fp32; bf16 for the bf16 rows' bound): 6 N V D / time.

    Returns (per wall-clock second, per process-CPU second); the second is robust to other
    processes sharing the cores.
    """
    dev = torch.device(device)
    e = torch.randn(n, d, device=dev, dtype=dtype)
    c = torch.randn(v, d, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(3):
        sync()
        t0, p0 = time.perf_counter(), time.process_time()
        logits = e @ c.T  # (N, V)
        _ = logits @ c  # (N, D)
        _ = logits.T @ e  # (V, D)
        sync()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - p0)
        del logits
    return 6 * n * v * d / best, 6 * n * v * d / best_cpu


def markdown(rows: list[dict], meta: dict) -> str:
    """The results table with its measurement note."""
    head = ("| method | V | fwd s | bwd s | fwd+bwd s | x 6NVD bound | CPU s | x 6NVD CPU bound "
            "| peak MB above inputs | x grad buffers | fwd+bwd s per round |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    lines = []
    for r in rows:
        if "fwd_bwd_s" not in r:
            why = r.get("error") or r.get("skipped")
            lines.append(f"| {r['method']} | {r['v']} | {why} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['v']} | {r['fwd_s']:.3f} | {r['bwd_s']:.3f} | "
            f"{r['fwd_bwd_s']:.3f} | {r['time_vs_bound']:.2f} | {r['fwd_bwd_cpu_s']:.3f} | "
            f"{r['cpu_time_vs_bound']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} | "
            f"{r['peak_vs_grad_buffers']:.2f} | "
            + " / ".join(f"{x['fwd_bwd_s']:.3f}" for x in r.get("rounds", []))
            + " |"
        )
    intro = (
        f"Linear cross-entropy, N={meta['n']}, D={meta['d']}, fp32, device {meta['device']} "
        f"({meta['threads']} threads); sgemm rate {meta['sgemm_gflops']:.1f} GFLOP/s wall, "
        f"{meta['sgemm_gflops_per_cpu_s']:.1f} GFLOP per CPU-second (6NVD bound at V={meta['v']}: "
        f"{meta['bound_s']:.3f} s); each process: best of the steady call and {meta['repeats']} "
        f"more; at V={meta['v']} the method list ran {meta.get('rounds', 1)} times interleaved "
        "and a row shows its median round; CPU s = process CPU time (robust to other load on "
        f"shared cores); memory: peak above inputs (largest over rounds). Measured by "
        f"{harness.MEASURE}.\n\n"
    )
    return intro + head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, cpu_time: bool) -> None:
    """Peak memory and time against V, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == m and "fwd_bwd_s" in r]
        if ok:
            vs = [r["v"] for r in ok]
            ax_m.plot(vs, [r["peak_mem_bytes"] / 2**20 for r in ok], "o-", label=m)
            ax_t.plot(
                vs, [r["fwd_bwd_cpu_s" if cpu_time else "fwd_bwd_s"] for r in ok], "o-", label=m
            )
    t_label = "forward+backward, process CPU s" if cpu_time else "forward+backward (s)"
    for ax, lab in ((ax_m, "peak memory above inputs (MB)"), (ax_t, t_label)):
        ax.set(xscale="log", yscale="log", xlabel="vocabulary size V", ylabel=lab)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)  # redrawn after every run
    atomic_write_bytes(path, buf.getvalue())


def _with_bounds(row: dict, rate: float, cpu_rate: float) -> dict:
    if "fwd_bwd_s" in row:
        flops = 6 * row["n"] * row["v"] * row["d"]
        row = row | {
            "time_vs_bound": row["fwd_bwd_s"] / (flops / rate),
            "cpu_time_vs_bound": row["fwd_bwd_cpu_s"] / (flops / cpu_rate),
        }
    return row


def vocab_parallel_sweep(cfg: dict, device: str, threads: int | None = None, on_update=None):
    """The rows of ``cfg["vocab_parallel"]`` (``worlds``, optional ``rounds``): the
    vocabulary-parallel loss at N, V, D in W fresh processes per world size (the ``threads``
    budget, default torch's, split between the ranks on CPU), each row with its per-rank peak
    memory and slowest-rank time over world 1's (``harness.versus_world1``)."""
    vp = cfg["vocab_parallel"]
    case = {"method": VOCAB_PARALLEL, "n": cfg["n"], "v": cfg["v"], "d": cfg["d"],
            "device": device, "repeats": cfg.get("repeats", 2)}  # fmt: skip
    cases = harness.world_cases(case, vp["worlds"], threads or torch.get_num_threads())
    update = None if on_update is None else (lambda r: on_update(harness.versus_world1(r)))
    rows = harness.sweep(MODULE, cases, int(vp.get("rounds", 1)), on_update=update)
    return harness.versus_world1(rows)


def vocab_parallel_markdown(rows: list[dict], meta: dict) -> str:
    """The scaling table: per world size, per-rank memory and time against world 1."""
    backend = "nccl, one GPU per rank" if meta["device"] == "cuda" else "gloo, CPU processes"
    return (
        f"\nVocabulary-parallel linear cross-entropy (``process_group``), N={meta['n']}, "
        f"V={meta['v']}, D={meta['d']}, fp32, {backend}: each rank holds V / W head rows, e is "
        "replicated and its gradient all-reduced. Memory: the largest per-rank peak above the "
        "inputs; time: the slowest rank (fwd+bwd, wall and process CPU).\n\n"
        + harness.world_table(rows)
    )


def bf16_rows(rows: list[dict], v: int) -> list[dict]:
    """bf16 rows with, at each V, ours' time and peak over the fastest peer's (a peer: a
    method that is not ``cce_*``) and, at the main V, the per-round ratios
    (``harness.median_ratio``)."""
    out, nan = [], float("nan")
    for r in rows:
        if "fwd_bwd_s" in r and r["method"].startswith("cce_"):
            peers = [p for p in rows if p["v"] == r["v"] and "fwd_bwd_s" in p
                     and not p["method"].startswith("cce_")]  # fmt: skip
            if peers:
                best = min(peers, key=lambda p: p["fwd_bwd_s"])
                r = r | {"fastest_peer": best["method"],
                         "time_vs_peer": r["fwd_bwd_s"] / best["fwd_bwd_s"],
                         "mem_vs_peer": r["peak_mem_bytes"] / (best["peak_mem_bytes"] or nan)}  # fmt: skip
            if r["v"] == v:
                at_v = [p for p in rows if p["v"] == v]
                r = r | {"rounds_vs_peer": harness.median_ratio(
                    at_v, r["method"], lambda m: not m.startswith("cce_"))}  # fmt: skip
        out.append(r)
    return out


def _ratio(row: dict, key: str) -> str:
    """A ratio cell: two decimals, or a dash where the row has none (the peers' own rows)."""
    return f"{row[key]:.2f}" if key in row else "—"


def bf16_markdown(rows: list[dict], meta: dict) -> str:
    """The bf16 table: time against the bf16 6NVD bound and the fastest peer, memory."""
    b = meta["bf16"]
    head = (
        f"\nLinear cross-entropy with bf16 e and c (issue 18), N={meta['n']}, D={meta['d']}, "
        f"loss in fp32; bf16 matmul rate {b['gemm_gflops']:.1f} GFLOP/s wall, "
        f"{b['gemm_gflops_per_cpu_s']:.1f} per CPU-second (6NVD bound at V={meta['v']}: "
        f"{b['bound_s']:.3f} s); at V={meta['v']} {b['rounds']} interleaved rounds, a row "
        "shows its median round; x peer: over the fastest non-cce method at that V (time) and "
        "its peak (memory); @t: memory_target t; /4k: the work buffers on 4 KiB pages instead "
        "of transparent huge pages (KERNELS_CPU_HUGE_PAGES=0).\n\n"
        "| method | V | fwd+bwd s | x bf16 6NVD bound | CPU s | x CPU bound | peak MB above "
        "inputs | x bf16 grad buffers | x peer time | x peer memory | fwd+bwd s per round |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if "fwd_bwd_s" not in r:
            why = r.get("error") or r.get("skipped")
            lines.append(f"| {r['method']} | {r['v']} | {why} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['v']} | {r['fwd_bwd_s']:.3f} | {r['time_vs_bound']:.2f} | "
            f"{r['fwd_bwd_cpu_s']:.3f} | {r['cpu_time_vs_bound']:.2f} | "
            f"{r['peak_mem_bytes'] / 2**20:.0f} | {r['peak_vs_grad_buffers']:.2f} | "
            f"{_ratio(r, 'time_vs_peer')} | {_ratio(r, 'mem_vs_peer')} | "
            + " / ".join(f"{x['fwd_bwd_s']:.3f}" for x in r.get("rounds", []))
            + " |"
        )
    return head + "\n".join(lines) + "\n"


def cases_at(methods, n: int, vv: int, d: int, device: str, meta: dict, threads, extra=None):
    """(runnable cases, skipped rows) of ``methods`` at vocabulary ``vv``."""
    cases, skipped = [], []
    for m in methods:
        case = {"method": m, "n": n, "v": vv, "d": d, "device": device,
                "repeats": meta["repeats"], "threads": threads or 0} | (extra or {})  # fmt: skip
        reason = available(m, device)
        if reason is None and m in MATERIALISED and 3 * n * vv * 4 > MAX_LOGITS_GB * 2**30:
            reason = f"skipped: 3 x N x V x 4 B > {MAX_LOGITS_GB} GB"
        if reason:
            skipped.append(case | {"skipped": reason})
        else:
            cases.append(case)
    return cases, skipped


def run(cfg: dict, device: str, threads: int | None = None) -> dict:
    """The whole sweep of a ``bench:`` params block (``threads``: torch threads per worker,
    default torch's); returns the document it wrote."""
    n, v, d, out = cfg["n"], cfg["v"], cfg["d"], Path(cfg["out"])
    methods = cfg.get("methods")  # [] runs no fp32 rows (e.g. the bf16 rows alone)
    methods = (CUDA_METHODS if device == "cuda" else CPU_METHODS) if methods is None else methods
    rate, cpu_rate = sgemm_rate(n, v, d, device)
    meta = {"n": n, "v": v, "d": d, "device": device, "repeats": cfg.get("repeats", 2),
            "rounds": cfg.get("rounds", 1), "threads": threads or torch.get_num_threads(),
            "sgemm_gflops": rate / 1e9, "sgemm_gflops_per_cpu_s": cpu_rate / 1e9,
            "bound_s": 6 * n * v * d / rate, "grad_buffer_bytes": (n + v) * d * 4,
            "torch": torch.__version__}  # fmt: skip
    bf16 = cfg.get("bf16") or {}
    if bf16:
        rate16, cpu_rate16 = sgemm_rate(n, v, d, device, torch.bfloat16)
        meta["bf16"] = {"gemm_gflops": rate16 / 1e9, "gemm_gflops_per_cpu_s": cpu_rate16 / 1e9,
                        "bound_s": 6 * n * v * d / rate16, "rounds": bf16.get("rounds", 1),
                        "grad_buffer_bytes": (n + v) * d * 2}  # fmt: skip
    done: list[dict] = []
    scaling: list[dict] = []
    half: list[dict] = []

    def write(rows: list[dict], vp_rows: list[dict] | None = None, half_rows=None) -> dict:
        rows = sorted(done + rows, key=lambda r: (r["v"] != v, r["v"]))  # the main V first
        doc = harness.document(meta, [_with_bounds(r, rate, cpu_rate) for r in rows])
        text = markdown(doc["rows"], meta)
        vp_rows = scaling if vp_rows is None else vp_rows
        if vp_rows:
            doc["vocab_parallel"] = vp_rows
            text += vocab_parallel_markdown(vp_rows, meta)
        h_rows = sorted(half + (half_rows or []), key=lambda r: (r["v"] != v, r["v"]))
        if h_rows:
            h_rows = bf16_rows([_with_bounds(r, rate16, cpu_rate16) for r in h_rows], v)
            doc["bf16"] = h_rows
            text += bf16_markdown(h_rows, meta)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", doc)
        atomic_write_text(out / "results.md", text)
        plot(doc["rows"], out / "memory_time_vs_v.png", cpu_time=device == "cpu")
        return doc

    for vv in sorted({int(x) for x in cfg.get("sweep", [])} | {v}):
        cases, skipped = cases_at(methods, n, vv, d, device, meta, threads)
        done += skipped
        rounds = meta["rounds"] if vv == v else 1
        done += harness.sweep(MODULE, cases, rounds, on_update=write)
    if cfg.get("vocab_parallel"):
        scaling += vocab_parallel_sweep(cfg, device, threads, lambda r: write([], r))
    for vv in sorted({int(x) for x in bf16.get("sweep", [])} | {v}) if bf16 else ():
        methods16 = bf16.get("methods") or BF16_METHODS
        cases, skipped = cases_at(methods16, n, vv, d, device, meta, threads, BF16)
        half += skipped
        rounds = int(bf16.get("rounds", 1)) if vv == v else 1
        half += harness.sweep(MODULE, cases, rounds, on_update=lambda r: write([], None, r))
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
