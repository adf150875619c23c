"""Benchmark linear cross-entropy implementations: time (forward, backward, both) and peak memory.

    python -m kernels.cce.benchmark --out DIR [--n 4096 --v 65536 --d 512
        --sweep 8192,32768,65536,131072,262144 --repeats 3 --rounds 3 --methods a,b]

Each (method, V) runs in a fresh subprocess. ``cce_chunked@1.5`` is the chunked path allowed
1.5 x the gradient buffers (``memory_target``; plain ``cce_chunked`` uses the default 1.25). At
the main V the whole method list runs ``--rounds`` times, interleaved (a, b, c, a, b, c, ...),
so that a slow spell of the shared machine hits every method alike; a row keeps every round
and reports the round with the median time. Memory is the peak above the inputs: on CPU the
RSS sampled by a thread minus the RSS after the inputs exist (after one warm-up call and
malloc_trim, so compile caches and BLAS buffers do not count); on CUDA max_memory_allocated
minus the allocated bytes before the call. Times are the best of ``--repeats`` calls after the
warm-up. Results are rewritten after every row (``--resume`` skips rows already there).
Each row also reports time / (6 N V D flops at the measured sgemm rate) and memory /
the fp32 gradient buffers ((N + V) x D x 4 bytes). Writes results.json, results.md and
memory_time_vs_v.png (on CPU its time axis is process CPU time) into --out, atomically.
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv 2411.09009.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from core.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from core.utils.subprocess_json import run_json

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


def _method(name: str):
    """(e, c, targets) -> scalar mean loss for the named implementation."""
    if name == "cce_chunked" or name.startswith("cce_chunked@"):
        from core.losses.linear_ce import linear_cross_entropy

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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples the process RSS every ~0.5 ms in a thread; ``peak`` is the maximum seen."""

    def __enter__(self):
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def run_worker(method: str, n: int, v: int, d: int, repeats: int, device: str) -> dict:
    """Time and measure one method on fresh inputs e (n, d), c (v, d), targets (n,)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    fn = _method(method)
    e = (torch.randn(n, d, device=dev) / d**0.25).requires_grad_()
    c = (torch.randn(v, d, device=dev) / d**0.25).requires_grad_()
    t = torch.randint(0, v, (n,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step():
        e.grad = c.grad = None
        t0, p0 = time.perf_counter(), time.process_time()
        loss = fn(e, c, t)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1, time.process_time() - p0

    step()  # warm-up: compilation, autotuning, BLAS buffers
    e.grad = c.grad = None
    _trim()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        with _PeakRSS() as sampler:
            step()
        peak = sampler.peak - base
    times = [step() for _ in range(repeats)]
    fwd, bwd = min(x[0] for x in times), min(x[1] for x in times)
    both, cpu = min(x[0] + x[1] for x in times), min(x[2] for x in times)
    return {"method": method, "n": n, "v": v, "d": d, "fwd_s": fwd, "bwd_s": bwd,
            "fwd_bwd_s": both, "fwd_bwd_cpu_s": cpu, "peak_mem_bytes": int(peak)}  # fmt: skip


def sgemm_rate(n: int, v: int, d: int, device: str) -> tuple[float, float]:
    """fp32 FLOP/s of the three GEMMs of a linear CE step on the full shapes: 6 N V D / time.

    Returns (per wall-clock second, per process-CPU second); the second is robust to other
    processes sharing the cores.
    """
    dev = torch.device(device)
    e, c = torch.randn(n, d, device=dev), torch.randn(v, d, device=dev)
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


def _spawn(method: str, n: int, v: int, d: int, repeats: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "kernels.cce.benchmark", "--worker", method, "--n", str(n),
           "--v", str(v), "--d", str(d), "--repeats", str(repeats), "--device", device]  # fmt: skip
    return run_json(cmd, {"method": method, "n": n, "v": v, "d": d})


def _available(method: str, device: str) -> str | None:
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


def _markdown(rows: list[dict], meta: dict) -> str:
    head = ("| method | V | fwd s | bwd s | fwd+bwd s | x 6NVD bound | CPU s | x 6NVD CPU bound "
            "| peak MB above inputs | x grad buffers | fwd+bwd s per round |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    lines = []
    for r in rows:
        if "error" in r or "skipped" in r:
            why = r.get("error") or r.get("skipped")
            lines.append(f"| {r['method']} | {r['v']} | {why} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['v']} | {r['fwd_s']:.3f} | {r['bwd_s']:.3f} | "
            f"{r['fwd_bwd_s']:.3f} | {r['time_vs_bound']:.2f} | {r['fwd_bwd_cpu_s']:.3f} | "
            f"{r['cpu_time_vs_bound']:.2f} | {r['peak_mem_bytes'] / 2**20:.0f} | "
            f"{r['mem_vs_grad_buffers']:.2f} | "
            + " / ".join(f"{x['fwd_bwd_s']:.3f}" for x in r.get("rounds", []))
            + " |"
        )
    intro = (
        f"Linear cross-entropy, N={meta['n']}, D={meta['d']}, fp32, device {meta['device']} "
        f"({meta['threads']} threads); sgemm rate {meta['sgemm_gflops']:.1f} GFLOP/s wall, "
        f"{meta['sgemm_gflops_per_cpu_s']:.1f} GFLOP per CPU-second (6NVD bound at V={meta['v']}: "
        f"{meta['bound_s']:.3f} s); each process: best of {meta['repeats']} after a warm-up; at "
        f"V={meta['v']} the method list ran {meta.get('rounds', 1)} times interleaved and a row "
        "shows its median round; CPU s = process CPU time (robust to other load on shared "
        "cores); memory: peak above inputs (largest over rounds).\n\n"
    )
    return intro + head + "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, cpu_time: bool) -> None:
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


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--v", type=int, default=65536)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--sweep", default="8192,32768,65536,131072,262144")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds at the main V")
    p.add_argument("--methods", default=None, help="comma list; default: all for the device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-logits-gb", type=float, default=6.0,
                   help="skip materialising methods above 3 x N x V x 4 bytes")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="keep rows already in --out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(run_worker(a.worker, a.n, a.v, a.d, a.repeats, a.device)))
        return
    if a.out is None:
        p.error("--out is required")
    methods = a.methods.split(",") if a.methods else (
        CUDA_METHODS if a.device == "cuda" else CPU_METHODS
    )  # fmt: skip
    vs = sorted({int(x) for x in a.sweep.split(",") if x} | {a.v})
    rate, cpu_rate = sgemm_rate(a.n, a.v, a.d, a.device)
    grad_bytes = lambda v: (a.n + v) * a.d * 4  # noqa: E731
    meta = {"n": a.n, "v": a.v, "d": a.d, "device": a.device, "repeats": a.repeats, "rounds": a.rounds,
            "threads": torch.get_num_threads(), "sgemm_gflops": rate / 1e9,
            "sgemm_gflops_per_cpu_s": cpu_rate / 1e9,
            "bound_s": 6 * a.n * a.v * a.d / rate, "grad_buffer_bytes": grad_bytes(a.v),
            "torch": torch.__version__}  # fmt: skip
    rows = []
    if a.resume and (a.out / "results.json").exists():  # keep rows measured by an earlier run
        rows = json.loads((a.out / "results.json").read_text())["rows"]
    done = {(r["method"], r["v"]) for r in rows if r["n"] == a.n and r["d"] == a.d}
    for v in vs:
        todo, per = [], {}
        for m in methods:
            if (m, v) in done:
                continue
            reason = _available(m, a.device)
            if reason is None and m in MATERIALISED and 3 * a.n * v * 4 > a.max_logits_gb * 2**30:
                reason = f"skipped: 3 x N x V x 4 B > {a.max_logits_gb} GB"
            if reason:
                rows.append({"method": m, "n": a.n, "v": v, "d": a.d, "skipped": reason})
            else:
                todo.append(m)
        base = list(rows)
        for _ in range(a.rounds if v == a.v else 1):
            for m in todo:
                if per.get(m) and "error" in per[m][-1]:
                    continue  # a method that failed once is not retried
                r = _spawn(m, a.n, v, a.d, a.repeats, a.device)
                per.setdefault(m, []).append(r)
                print(json.dumps(r), flush=True)
                rows = base + [_row(per[x], rate, cpu_rate, grad_bytes(v)) for x in per]
                _write(a.out, meta, rows)  # after every run: a killed sweep keeps what it measured
    _write(a.out, meta, rows)


def _row(runs: list[dict], rate: float, cpu_rate: float, grad_bytes: int) -> dict:
    """One method at one V from its rounds: the median-time round, every round's times kept,
    the largest peak of any round, and the ratios to the 6NVD bound and the gradient buffers."""
    ok = [r for r in runs if "fwd_bwd_s" in r]
    if not ok:
        return runs[-1]
    ok_sorted = sorted(ok, key=lambda r: r["fwd_bwd_s"])
    row = dict(ok_sorted[(len(ok_sorted) - 1) // 2])  # lower median
    row["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in ok)
    row["rounds"] = [
        {k: r[k] for k in ("fwd_bwd_s", "fwd_bwd_cpu_s", "peak_mem_bytes")} for r in ok
    ]
    flops = 6 * row["n"] * row["v"] * row["d"]
    row["time_vs_bound"] = row["fwd_bwd_s"] / (flops / rate)
    row["cpu_time_vs_bound"] = row["fwd_bwd_cpu_s"] / (flops / cpu_rate)
    row["mem_vs_grad_buffers"] = row["peak_mem_bytes"] / grad_bytes
    return row


def versus_fastest_peer(rows: list[dict], v: int, ours: str = "cce_chunked") -> dict | None:
    """Per round at vocabulary ``v``: ``ours`` time / the fastest other (peer) method's time.

    Rounds pair up by index (round i of every method ran in the same sweep of the method list).
    Returns the fastest peer of the median round, the per-round wall and CPU-time ratios and
    their medians; None if ``ours`` or every peer lacks timings at ``v``.
    """
    at_v = {r["method"]: r for r in rows if r["v"] == v and "rounds" in r}
    peers = {m: r for m, r in at_v.items() if not m.startswith("cce_")}
    if ours not in at_v or not peers:
        return None
    n = min(len(r["rounds"]) for r in [at_v[ours], *peers.values()])
    out: dict = {"wall": [], "cpu": [], "peer": []}
    for i in range(n):
        for key, field in (("wall", "fwd_bwd_s"), ("cpu", "fwd_bwd_cpu_s")):
            best = min(peers, key=lambda m: peers[m]["rounds"][i][field])
            out[key].append(at_v[ours]["rounds"][i][field] / peers[best]["rounds"][i][field])
            if key == "wall":
                out["peer"].append(best)
    for key in ("wall", "cpu"):
        out[f"{key}_median"] = statistics.median(out[key])
    return out


def _write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["v"] != meta["v"], r["v"]))  # the main V first
    atomic_write_json(out / "results.json", {"meta": meta, "rows": rows})
    atomic_write_text(out / "results.md", _markdown(rows, meta))
    _plot(rows, out / "memory_time_vs_v.png", cpu_time=meta["device"] == "cpu")


if __name__ == "__main__":
    main()
