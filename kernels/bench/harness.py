"""The kernels' benchmark harness: time and peak memory of a loss + gradient, one fresh process
per case, interleaved rounds, one JSON layout.

A project's bench script defines ``build(case) -> (forward, leaves)`` (inputs made, a zero-arg
function returning the loss, the tensors that receive gradients) and calls ``sweep``; its
``python -m <module> --worker '<case json>'`` entry calls ``worker_main(build)``. Memory is the
peak above the inputs, measured one way for every kernel: on CPU the process's VmHWM (reset to the
current RSS through /proc/self/clear_refs just before the call) minus its RSS, with glibc serving
every allocation of 1 MiB or more by mmap so that the peak is the live tensors' peak in every
process (with its default heap the same chunked loss read different peaks in identical
processes: fragmentation, and resident free heap that VmHWM cannot see); on CUDA
max_memory_allocated above the allocated bytes before the call. A case runs a first call (one-time
initialisation, reported apart), a steady second call (its peak is the row's) and ``repeats``
more; the time is the best of the steady and repeated calls. A case with ``"world": W`` runs in W
processes joined in one torch.distributed group (gloo on CPU, nccl on CUDA, one GPU per rank;
the same workers under torchrun read its env:// variables): each rank measures itself, and the
row gives the largest peak and time over the ranks, with every rank's figures under "ranks".
Only the standard library and torch.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "MEASURE",
    "document",
    "measure",
    "median_ratio",
    "run_json",
    "spawn",
    "spawn_ranks",
    "sweep",
    "versus_world1",
    "worker_main",
    "world_cases",
    "world_table",
]

MEASURE = (
    "kernels.bench.harness: one fresh process per case; peak memory above the inputs "
    "(CPU: VmHWM after clear_refs, glibc mmap threshold 1 MiB; CUDA: max_memory_allocated); "
    "time: best of the steady second call and the repeats, wall and process CPU"
)
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

Build = Callable[[dict], tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]]


def run_json(cmd: list[str], context: dict[str, Any]) -> dict[str, Any]:
    """``context`` updated with the JSON object the command prints last on stdout.

    A non-zero exit gives ``context`` plus ``"error"``: the last stderr line (300 characters at
    most), so one failing case becomes a row that says why instead of ending the sweep.
    """
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return _parse(proc.returncode, proc.stdout, proc.stderr, context)


def _parse(code: int, stdout: str, stderr: str, context: dict[str, Any]) -> dict[str, Any]:
    if code != 0:
        err = (stderr.strip().splitlines() or ["no output"])[-1]
        return {**context, "error": err[:300]}
    return {**context, **json.loads(stdout.strip().splitlines()[-1])}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], repeats: int):
    """Time and peak memory of ``forward().backward()`` (see the module docstring).

    ``leaves``: the tensors whose gradients are reset before each call; their size is the
    gradient buffers the peak is compared with. Returns the row's measured fields.
    """
    cuda = any(x.device.type == "cuda" for x in leaves)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> tuple[float, float, float]:
        for x in leaves:
            x.grad = None
        sync()
        t0, p0 = time.perf_counter(), time.process_time()
        loss = forward()
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return t1 - t0, time.perf_counter() - t1, time.process_time() - p0

    def peak_of_step() -> tuple[tuple[float, float, float], int]:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = step()
            return times, torch.cuda.max_memory_allocated() - base
        for x in leaves:
            x.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        base = _rss_kib("VmRSS")
        times = step()
        return times, (_rss_kib("VmHWM") - base) * 1024

    first, first_peak = peak_of_step()  # includes one-time library initialisation
    steady, peak = peak_of_step()
    runs = [steady] + [step() for _ in range(repeats)]
    fwd, bwd, _ = min(runs, key=lambda r: r[0] + r[1])
    grad_bytes = sum(x.numel() * x.element_size() for x in leaves)
    return {
        "fwd_s": fwd, "bwd_s": bwd, "fwd_bwd_s": fwd + bwd,
        "fwd_bwd_cpu_s": min(r[2] for r in runs), "peak_mem_bytes": int(peak),
        "first_call_s": first[0] + first[1], "first_call_peak_bytes": int(first_peak),
        "grad_buffer_bytes": grad_bytes, "peak_vs_grad_buffers": peak / grad_bytes,
    }  # fmt: skip


def worker_main(build: Build, argv: list[str] | None = None) -> None:
    """``python -m <bench module> --worker '<case json>'``: measure one case, print its JSON.

    The case may set ``repeats`` (default 2) and ``threads`` (torch threads; 0 = default)."""
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, help="the case, as JSON")
    case = json.loads(p.parse_args(argv).worker)
    with contextlib.suppress(OSError, AttributeError):  # mmap every buffer >= 1 MiB (glibc)
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    if "world" in case:  # one rank of a multi-process case (``spawn`` or torchrun)
        cuda = str(case.get("device", "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=os.environ.get("INIT_METHOD", "env://"),
            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
        )  # fmt: skip
    torch.manual_seed(0)
    forward, leaves = build(case)
    print(json.dumps(measure(forward, leaves, int(case.get("repeats", 2)))), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(module: str, case: dict) -> dict:
    """One case in a fresh process (clean peak RSS, no warm caches from the previous case); a
    case with ``"world": W`` in W fresh processes (``spawn_ranks``)."""
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(case)]
    return run_json(cmd, case) if "world" not in case else spawn_ranks(cmd, case)


RANK_FIELDS = ("fwd_s", "bwd_s", "fwd_bwd_s", "fwd_bwd_cpu_s", "peak_mem_bytes",
               "first_call_s", "first_call_peak_bytes", "grad_buffer_bytes")  # fmt: skip


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Exit codes of ``procs``; once one fails the others are killed (they would wait in a
    collective for the failed rank until the process group's timeout)."""
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)


def spawn_ranks(cmd: list[str], case: dict) -> dict:
    """``cmd`` as ranks 0..W-1 of one process group (a file store in a temporary directory),
    run together; the row: each field's largest value over the ranks (the slowest rank's time,
    the largest per-rank peak), ``peak_vs_grad_buffers`` of that peak over the largest rank's
    gradient buffers, every rank's figures under "ranks"; a failing rank's error otherwise."""
    world = int(case["world"])
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"WORLD_SIZE": str(world), "INIT_METHOD": f"file://{tmp}/store"}
        procs = []
        for r in range(world):  # run together; output to files (a full pipe would block a rank)
            with open(f"{tmp}/out{r}", "w") as out, open(f"{tmp}/err{r}", "w") as err:
                rank_env = env | {"RANK": str(r), "LOCAL_RANK": str(r)}
                procs.append(subprocess.Popen(cmd, env=rank_env, stdout=out, stderr=err))
        codes = _wait_all(procs)
        ranks = [
            _parse(code, Path(f"{tmp}/out{r}").read_text(), Path(f"{tmp}/err{r}").read_text(), {})
            for r, code in enumerate(codes)
        ]
    failed = sorted((code < 0, r) for r, code in enumerate(codes) if code != 0)  # killed last
    if failed:
        return {**case, "error": f"rank {failed[0][1]}: {ranks[failed[0][1]]['error']}"}
    row = {**case, **{k: max(r[k] for r in ranks) for k in RANK_FIELDS}}
    row["peak_vs_grad_buffers"] = row["peak_mem_bytes"] / row["grad_buffer_bytes"]
    row["ranks"] = [{k: r[k] for k in RANK_FIELDS} for r in ranks]
    return row


def _row(runs: list[dict]) -> dict:
    """One case from its rounds: the (lower) median-time round, every round's figures kept, the
    largest peak of any round; a case without a successful round is its last error."""
    ok = sorted((r for r in runs if "fwd_bwd_s" in r), key=lambda r: r["fwd_bwd_s"])
    if not ok:
        return runs[-1]
    row = dict(ok[(len(ok) - 1) // 2])
    row["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in ok)
    row["peak_vs_grad_buffers"] = row["peak_mem_bytes"] / row["grad_buffer_bytes"]
    row["rounds"] = [
        {k: r[k] for k in ("fwd_bwd_s", "fwd_bwd_cpu_s", "peak_mem_bytes")}
        for r in runs
        if "fwd_bwd_s" in r
    ]
    return row


def sweep(
    module: str,
    cases: list[dict],
    rounds: int = 1,
    on_update: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Run ``cases`` ``rounds`` times interleaved (a, b, c, a, b, c, ...), each in a fresh
    process, so that a slow spell of a shared machine hits every case alike; a case that fails
    once is not retried. Returns one row per case (``_row``); ``on_update(rows)`` after every
    run, so a killed sweep keeps what it measured."""
    runs: list[list[dict]] = [[] for _ in cases]
    for _ in range(rounds):
        for case, got in zip(cases, runs, strict=True):
            if got and "error" in got[-1]:
                continue
            got.append(spawn(module, case))
            print(json.dumps(got[-1]), flush=True)
            if on_update:
                on_update([_row(r) for r in runs if r])
    return [_row(r) for r in runs]


def world_cases(case: dict, worlds: Sequence[int], threads: int) -> list[dict]:
    """``case`` once per world size W (``"world": W``); on CPU the ``threads`` budget is split
    between the W ranks so that every world size uses the same cores."""
    cpu = str(case.get("device", "cpu")) == "cpu"
    return [case | {"world": int(w), "threads": max(1, threads // int(w)) if cpu else 0}
            for w in worlds]  # fmt: skip


def versus_world1(rows: list[dict]) -> list[dict]:
    """Rows of ``world_cases`` with their per-rank peak and slowest-rank time over world 1's
    (``mem_vs_world1``, ``time_vs_world1``), when a world-1 row was measured."""
    base = next((r for r in rows if r.get("world") == 1 and "fwd_bwd_s" in r), None)
    if base is None:
        return rows
    return [
        r | {"mem_vs_world1": r["peak_mem_bytes"] / base["peak_mem_bytes"],
             "time_vs_world1": r["fwd_bwd_s"] / base["fwd_bwd_s"]}
        if "fwd_bwd_s" in r else r
        for r in rows
    ]  # fmt: skip


def world_table(rows: list[dict], label: str = "") -> str:
    """The markdown table of ``versus_world1`` rows: per world size, the largest per-rank peak
    above the inputs and the slowest rank's time, each against world 1. ``label``: a first
    column (e.g. the divergence) when set."""
    first = ("| " + label) if label else ""
    head = (f"{first}| world | threads per rank | per-rank peak MB | x world 1 | x own grad "
            f"buffers | fwd+bwd s | x world 1 | CPU s |\n"
            f"{'|---' if label else ''}|---:|---:|---:|---:|---:|---:|---:|---:|\n")  # fmt: skip
    lines = []
    for r in rows:
        cell = f"| {r.get(label, '')} " if label else ""
        if "fwd_bwd_s" not in r:
            lines.append(f"{cell}| {r['world']} | {r['threads']} | {r.get('error')} | | | | | |")
            continue
        nan = float("nan")
        lines.append(
            f"{cell}| {r['world']} | {r['threads']} | {r['peak_mem_bytes'] / 2**20:.0f} "
            f"| {r.get('mem_vs_world1', nan):.2f} | {r['peak_vs_grad_buffers']:.2f} "
            f"| {r['fwd_bwd_s']:.2f} | {r.get('time_vs_world1', nan):.2f} "
            f"| {r['fwd_bwd_cpu_s']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def document(meta: dict, rows: list[dict]) -> dict:
    """The JSON layout every bench writes: {"harness": MEASURE, "meta": ..., "rows": ...}."""
    return {"harness": MEASURE, "meta": meta, "rows": rows}


def median_ratio(rows: list[dict], ours: str, others: Callable[[str], bool]) -> dict | None:
    """Per round: ``ours`` time / the fastest of the ``others`` methods' times, wall and CPU.

    Rounds pair up by index (round i of every case ran in the same sweep of the list). Returns
    the fastest other per round, the per-round ratios and their medians; None without timings.
    """
    by = {r["method"]: r for r in rows if "rounds" in r}
    peers = {m: r for m, r in by.items() if m != ours and others(m)}
    if ours not in by or not peers:
        return None
    n = min(len(r["rounds"]) for r in [by[ours], *peers.values()])
    out: dict = {"wall": [], "cpu": [], "peer": []}
    for i in range(n):
        for key, field in (("wall", "fwd_bwd_s"), ("cpu", "fwd_bwd_cpu_s")):
            best = min(peers, key=lambda m: peers[m]["rounds"][i][field])
            out[key].append(by[ours]["rounds"][i][field] / peers[best]["rounds"][i][field])
            if key == "wall":
                out["peer"].append(best)
    for key in ("wall", "cpu"):
        out[f"{key}_median"] = statistics.median(out[key])
    return out
