"""Benchmark: fused linear KD loss vs the materialised loss, time (fwd+bwd) and peak memory.

Every (divergence, method) runs in a fresh subprocess. Memory is the peak RSS during one
fwd+bwd above the RSS before it (Linux VmHWM, reset through /proc/self/clear_refs; the worker
has glibc mmap every allocation >= 1 MiB, so the peak is that of the live tensors), or on CUDA
the peak allocated memory above the inputs; it is compared with the gradient buffers
((N + V) x D floats, the lower bound of any method). The first call (which also pays one-time
library initialisation) is reported apart from the steady-state second call; the time is the
median of that second call and ``--repeats`` further calls. On CUDA, Liger's fused linear JSD
is timed beside ``js`` when liger-kernel is installed. With ``--out`` writes results.json and
results.md.

    python -m kernels.kd.benchmark --n 4096 --v 65536 --d 512 --divergences forward_kl,js \
        --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from core.utils.subprocess_json import run_json


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss_fn(method: str, divergence: str, temperature: float, chunk_size: int | None):
    if method == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD  # GPU-only peer

        jsd = LigerFusedLinearJSD(jsd_beta=0.5, temperature=temperature)
        return lambda e_s, w_s, e_t, w_t: jsd(e_s, w_s, e_t, w_t)
    from core.losses.linear_kd import fused_divergence
    from kernels.kd import linear_kd_impl

    impl = "reference" if method == "materialised" else "chunked"
    fused = fused_divergence(divergence)
    return lambda e_s, w_s, e_t, w_t: linear_kd_impl(
        e_s, w_s, e_t, w_t, None, fused, temperature=temperature, impl=impl,
        chunk_size=chunk_size if impl == "chunked" else None,
    )  # fmt: skip


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _map_work_buffers() -> None:
    """Serve every allocation of 1 MiB or more by mmap, returned to the OS on free.

    With glibc's default (a threshold that grows to 32 MiB after the first large free) the
    chunked losses' few-MB work buffers come from the heap, and the measured peak moved by
    +-20 % between identical processes: fragmentation raised it, and reuse of free heap pages
    that were already resident (invisible to VmHWM) hid part of it. Mapped buffers make the
    peak the live tensors' peak, the same in every process.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)


def worker(args: argparse.Namespace) -> dict:
    """Build inputs; peak memory of a first and a second fwd+bwd; median time of the second
    and ``repeats`` more."""
    _map_work_buffers()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads) if args.threads else None
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    e_s = (torch.randn(args.n, args.d, device=dev) / args.d**0.5).requires_grad_()
    w_s = torch.randn(args.v, args.d, device=dev).requires_grad_()
    e_t = torch.randn(args.n, args.d, device=dev) / args.d**0.5
    w_t = torch.randn(args.v, args.d, device=dev)
    fn = _loss_fn(args.method, args.divergence, args.temperature, args.chunk_size)

    def step() -> float:
        e_s.grad = w_s.grad = None
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(e_s, w_s, e_t, w_t).backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def peak_of_step() -> tuple[float, float]:
        """(seconds, peak bytes above the memory before the step)."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            sec = step()
            return sec, torch.cuda.max_memory_allocated() - base
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        sec = step()
        return sec, (_rss_kib("VmHWM") - base) * 1024

    first_s, first_peak = peak_of_step()  # includes one-time library initialisation
    e_s.grad = w_s.grad = None
    steady_s, peak = peak_of_step()  # steady state: a second call in the same process
    times = [steady_s] + [step() for _ in range(args.repeats)]
    return {
        "method": args.method,
        "peak_above_inputs_mb": peak / 2**20,
        "first_call_peak_mb": first_peak / 2**20,
        "time_s": statistics.median(times),
        "first_call_s": first_s,
    }


def _run_method(args: argparse.Namespace, divergence: str, method: str) -> dict:
    """One (divergence, method) row, measured in a fresh subprocess (clean RSS)."""
    cmd = [sys.executable, "-m", "kernels.kd.benchmark", "--method", method,
           "--divergences", divergence, "--n", str(args.n), "--v", str(args.v),
           "--d", str(args.d), "--temperature", str(args.temperature),
           "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--device", args.device]  # fmt: skip
    if args.chunk_size:
        cmd += ["--chunk-size", str(args.chunk_size)]
    return run_json(cmd, {"divergence": divergence, "method": method})


def markdown(rows: list[dict], config: dict, grad_mb: float) -> str:
    """The results table: per divergence, each method's time and peak memory with the ratios."""
    head = (
        f"Fused linear KD loss, fwd+bwd, N={config['n']} V={config['v']} D={config['d']} fp32, "
        f"T={config['temperature']}, device {config['device']} ({config['threads_used']} "
        f"threads); time: median of the second (steady) call and {config['repeats']} more; "
        f"memory: peak above the inputs of the second call; gradient buffers (N + V) x D = "
        f"{grad_mb:.1f} MB. Targets: time <= 1.2 x materialised, memory <= 1.25 x the "
        "gradient buffers.\n\n"
        "| divergence | method | time s | x materialised | peak MB above inputs | x grad buffers "
        "| first-call peak MB |\n|---|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['divergence']} | {r['method']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['divergence']} | {r['method']} | {r['time_s']:.2f} "
            f"| {r['time_vs_materialised']:.2f} | {r['peak_above_inputs_mb']:.0f} "
            f"| {r['peak_vs_grad_buffers']:.2f} | {r['first_call_peak_mb']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    """CLI: every (divergence, method) in its own subprocess; print and optionally save."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--v", type=int, default=65536)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--divergences", default="forward_kl", help="comma-separated registry names")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="timed calls after the steady one")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default="materialised,chunked", help="comma-separated")
    p.add_argument("--chunk-size", type=int, default=None, help="chunked rows per chunk")
    p.add_argument("--method", help=argparse.SUPPRESS)  # set in the worker subprocess
    p.add_argument("--out", help="write results.json and results.md into this directory")
    args = p.parse_args()
    if args.method:
        args.divergence = args.divergences
        print(json.dumps(worker(args)))
        return
    methods = args.methods.split(",")
    if args.device.startswith("cuda") and "liger" not in methods:
        try:
            import liger_kernel  # noqa: F401

            methods.append("liger")
        except ImportError:
            print("liger-kernel not installed: skipping its fused linear JSD", file=sys.stderr)
    grad_mb = (args.n + args.v) * args.d * 4 / 2**20
    config = vars(args) | {"threads_used": args.threads or torch.get_num_threads()}
    rows: list[dict] = []
    for divergence in args.divergences.split(","):
        todo = [m for m in methods if m != "liger" or divergence == "js"]  # Liger has JSD only
        block = [_run_method(args, divergence, m) for m in todo]
        base = next(
            (r["time_s"] for r in block if r.get("method") == "materialised" and "error" not in r),
            float("nan"),
        )
        for r in block:
            if "error" not in r:
                r["time_vs_materialised"] = r["time_s"] / base
                r["peak_vs_grad_buffers"] = r["peak_above_inputs_mb"] / grad_mb
        rows += block
        print(markdown(block, config, grad_mb).split("\n\n", 1)[1], flush=True)
        if args.out:  # rewritten after every divergence: a killed run keeps the finished rows
            from core.utils.io import atomic_write_json, atomic_write_text

            out = Path(args.out)
            atomic_write_json(
                out / "results.json", {"config": config, "grad_buffers_mb": grad_mb, "rows": rows}
            )
            atomic_write_text(out / "results.md", markdown(rows, config, grad_mb))


if __name__ == "__main__":
    main()
