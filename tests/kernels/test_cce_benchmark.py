"""kernels.cce.benchmark bookkeeping: rounds -> one row, and ours vs the fastest peer per round."""

from __future__ import annotations

import pytest

from kernels.cce.benchmark import _method, _row, versus_fastest_peer

N, V, D = 8, 16, 4


def _run(method: str, wall: float, cpu: float, peak: int = 100) -> dict:
    return {"method": method, "n": N, "v": V, "d": D, "fwd_s": wall, "bwd_s": 0.0,
            "fwd_bwd_s": wall, "fwd_bwd_cpu_s": cpu, "peak_mem_bytes": peak}  # fmt: skip


def test_row_takes_the_median_round_and_the_largest_peak():
    runs = [_run("a", 3.0, 6.0, 10), _run("a", 1.0, 2.0, 30), _run("a", 2.0, 4.5, 20)]
    flops = 6 * N * V * D
    row = _row(runs, rate=flops / 1.0, cpu_rate=flops / 2.0, grad_bytes=15)
    assert row["fwd_bwd_s"] == 2.0 and row["fwd_bwd_cpu_s"] == 4.5  # the median round's own CPU
    assert row["peak_mem_bytes"] == 30 and row["mem_vs_grad_buffers"] == 2.0
    assert row["time_vs_bound"] == pytest.approx(2.0) and row["cpu_time_vs_bound"] == 2.25
    assert [r["fwd_bwd_s"] for r in row["rounds"]] == [3.0, 1.0, 2.0]  # in run order
    failed = {"method": "a", "n": N, "v": V, "d": D, "error": "boom"}
    assert _row([failed], 1.0, 1.0, 1) is failed


def test_versus_fastest_peer_pairs_rounds_and_picks_the_fastest_peer_per_round():
    flops = 6 * N * V * D
    rows = [
        _row([_run("cce_chunked", w, 2 * w) for w in (4.0, 3.9, 4.2)], flops, flops, 1),
        _row([_run("peer_x", w, 2 * w) for w in (3.8, 4.5, 4.0)], flops, flops, 1),
        _row([_run("peer_y", w, 2 * w) for w in (5.0, 3.9 / 0.975, 4.4)], flops, flops, 1),
        _row([_run("cce_chunked@1.5", w, w) for w in (1.0, 1.0, 1.0)], flops, flops, 1),
    ]
    vs = versus_fastest_peer(rows, V)
    assert vs["peer"] == ["peer_x", "peer_y", "peer_x"]  # our other variant is not a peer
    assert vs["wall"] == pytest.approx([4.0 / 3.8, 0.975, 4.2 / 4.0])
    assert vs["wall_median"] == pytest.approx(4.2 / 4.0)
    assert vs["cpu_median"] == pytest.approx(4.2 / 4.0)
    assert versus_fastest_peer(rows, V, ours="cce_chunked@1.5")["wall_median"] == pytest.approx(
        1.0 / 4.0
    )
    assert versus_fastest_peer(rows, 2 * V) is None


def test_method_names():
    assert callable(_method("cce_chunked@1.5"))
    with pytest.raises(ValueError, match="unknown method"):
        _method("nope")
