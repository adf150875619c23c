"""kernels.bench.harness: the launcher, the memory and time measure, rounds -> rows, the ratio to
the fastest peer; and a tiny-shape smoke run of the cce bench stage on it."""

import json
import sys
import textwrap

import pytest

from kernels.bench import harness
from kernels.bench.harness import _row, median_ratio, run_json


def test_last_stdout_line_is_merged_over_the_context():
    code = 'print(\'warming up\'); print(\'{"t": 1.5, "m": "x"}\')'
    out = run_json([sys.executable, "-c", code], {"m": "ctx", "v": 3})
    assert out == {"m": "x", "v": 3, "t": 1.5}


def test_failure_gives_the_last_stderr_line_capped():
    code = "import sys; print('noise', file=sys.stderr); sys.exit('boom ' + 'y' * 400)"
    out = run_json([sys.executable, "-c", code], {"m": "a"})
    assert out["m"] == "a" and out["error"].startswith("boom y") and len(out["error"]) == 300
    assert run_json([sys.executable, "-c", "import sys; sys.exit(3)"], {})["error"] == "no output"


_MEASURE_CASE = textwrap.dedent("""
    import json, torch
    from kernels.bench import harness
    x = torch.randn(1000, 50, requires_grad=True)

    def forward():
        big = torch.ones(16 << 20)  # 64 MiB, touched
        return (x * big[: x.numel()].view_as(x)).sum() + big.sum() * 0

    out = harness.measure(forward, [x], repeats=2)
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    print(json.dumps(out))
""")


def test_measure_sees_a_known_allocation_and_the_gradient_buffers():
    """A loss that holds an extra 64 MiB buffer during the call peaks ~64 MiB above the inputs;
    the gradient buffers are the leaves' bytes; the time fields are consistent. In a fresh
    process, as the bench runs each case: in a long-lived one the allocator may serve the
    buffer from pages already resident, which the RSS high-water mark cannot see."""
    out = run_json([sys.executable, "-c", _MEASURE_CASE], {})
    assert "error" not in out, out
    assert out["peak_mem_bytes"] >= 60 << 20
    assert out["grad_buffer_bytes"] == 1000 * 50 * 4
    assert out["peak_vs_grad_buffers"] == out["peak_mem_bytes"] / out["grad_buffer_bytes"]
    assert out["fwd_bwd_s"] == pytest.approx(out["fwd_s"] + out["bwd_s"])
    assert out["first_call_s"] > 0 and out["fwd_bwd_cpu_s"] > 0


def _run(method, wall, cpu, peak=100):
    return {"method": method, "fwd_bwd_s": wall, "fwd_bwd_cpu_s": cpu, "peak_mem_bytes": peak,
            "grad_buffer_bytes": 50}  # fmt: skip


def test_row_takes_the_median_round_and_the_largest_peak():
    row = _row([_run("a", 3.0, 6.0, 10), _run("a", 1.0, 2.0, 30), _run("a", 2.0, 4.5, 20)])
    assert row["fwd_bwd_s"] == 2.0 and row["fwd_bwd_cpu_s"] == 4.5  # the median round's own CPU
    assert row["peak_mem_bytes"] == 30 and row["peak_vs_grad_buffers"] == 30 / 50
    assert [r["fwd_bwd_s"] for r in row["rounds"]] == [3.0, 1.0, 2.0]  # in run order
    failed = {"method": "a", "error": "boom"}
    assert _row([failed]) is failed


def test_median_ratio_pairs_rounds_and_picks_the_fastest_peer_per_round():
    rows = [
        _row([_run("cce_chunked", w, 2 * w) for w in (4.0, 3.9, 4.2)]),
        _row([_run("peer_x", w, 2 * w) for w in (3.8, 4.5, 4.0)]),
        _row([_run("peer_y", w, 2 * w) for w in (5.0, 3.9 / 0.975, 4.4)]),
        _row([_run("cce_chunked@1.5", w, w) for w in (1.0, 1.0, 1.0)]),
    ]
    peers = lambda m: not m.startswith("cce_")  # noqa: E731
    vs = median_ratio(rows, "cce_chunked", peers)
    assert vs["peer"] == ["peer_x", "peer_y", "peer_x"]  # our other variant is not a peer
    assert vs["wall"] == pytest.approx([4.0 / 3.8, 0.975, 4.2 / 4.0])
    assert vs["wall_median"] == pytest.approx(4.2 / 4.0) and vs["cpu_median"] == vs["wall_median"]
    assert median_ratio(rows, "cce_chunked@1.5", peers)["wall_median"] == pytest.approx(1 / 4.0)
    assert median_ratio(rows, "nope", peers) is None


def test_sweep_interleaves_rounds_in_fresh_processes_and_keeps_errors(tmp_path, monkeypatch):
    (tmp_path / "toy_bench.py").write_text(
        textwrap.dedent(
            """
            import sys, torch
            from kernels.bench import harness

            def build(case):
                with open(case["log"], "a") as f:
                    f.write(case["name"] + "\\n")
                if case["name"] == "bad":
                    raise SystemExit("bad case")
                x = torch.randn(10, requires_grad=True)
                return (lambda: (x * x).sum()), [x]

            if __name__ == "__main__":
                harness.worker_main(build)
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{sys.path[0]}")
    log = str(tmp_path / "log")
    cases = [{"name": n, "log": log, "repeats": 0} for n in ("a", "bad")]
    seen = []
    rows = harness.sweep("toy_bench", cases, rounds=2, on_update=seen.append)
    assert (tmp_path / "log").read_text().split() == ["a", "bad", "a"]  # bad: not retried
    assert rows[1]["error"] == "bad case" and len(rows[0]["rounds"]) == 2
    assert rows[0]["grad_buffer_bytes"] == 40 and len(seen) == 3
    doc = harness.document({"n": 1}, rows)
    assert doc["harness"] == harness.MEASURE and json.loads(json.dumps(doc)) == doc


def test_a_world_case_runs_its_ranks_in_one_group_and_reports_each(tmp_path, monkeypatch):
    """``"world": 2``: two processes in one gloo group (a collective in the loss); the row keeps
    the larger rank's peak (rank 1 holds an extra 32 MiB) and both ranks' figures; a rank that
    fails gives the row its error instead of leaving the other waiting."""
    (tmp_path / "toy_dist.py").write_text(
        textwrap.dedent(
            """
            import torch, torch.distributed as dist
            from kernels.bench import harness

            def build(case):
                rank = dist.get_rank()
                if case.get("fail") and rank == 1:
                    raise SystemExit("rank 1 gave up")
                x = torch.randn(1000, requires_grad=True)

                def forward():
                    extra = torch.ones((8 << 20) * rank)  # 32 MiB on rank 1, touched
                    total = (x * x).sum() + extra.sum() * 0
                    dist.all_reduce(total.detach().clone())
                    return total

                return forward, [x]

            if __name__ == "__main__":
                harness.worker_main(build)
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{sys.path[0]}")
    row = harness.spawn("toy_dist", {"world": 2, "repeats": 0, "threads": 1})
    assert [r["peak_mem_bytes"] >= 30 << 20 for r in row["ranks"]] == [False, True]
    assert row["peak_mem_bytes"] == row["ranks"][1]["peak_mem_bytes"]
    assert row["grad_buffer_bytes"] == 4000 and row["world"] == 2
    bad = harness.spawn("toy_dist", {"world": 2, "repeats": 0, "fail": True})
    assert bad["error"] == "rank 1: rank 1 gave up"


@pytest.mark.filterwarnings("ignore:Data has no positive values")  # tiny shapes: peak 0 MB
def test_cce_bench_stage_smoke(tmp_path, capsys):
    """The stage on the harness at a tiny shape: the JSON layout, the table, the report's
    targets parse it."""
    from projects.cce import bench, report

    cfg = {"out": str(tmp_path), "n": 32, "v": 64, "d": 8, "sweep": [32], "repeats": 0,
           "rounds": 1, "methods": ["cce_chunked", "torch_eager"]}  # fmt: skip
    doc = bench.run(cfg, "cpu")
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(doc)) and on_disk["harness"] == harness.MEASURE
    rows = {(r["method"], r["v"]): r for r in on_disk["rows"]}
    assert set(rows) == {(m, v) for m in cfg["methods"] for v in (32, 64)}
    assert [r["v"] for r in on_disk["rows"]] == [64, 64, 32, 32]  # the main V first
    for r in rows.values():
        assert r["time_vs_bound"] > 0 and r["grad_buffer_bytes"] == (32 + r["v"]) * 8 * 4
    assert "Measured by kernels.bench.harness" in (tmp_path / "results.md").read_text()
    targets = report.bench_targets(on_disk)
    assert set(targets) == {"cce_chunked"} and targets["cce_chunked"]["vs_fastest_peer"]


def test_world_cases_split_the_threads_and_rows_compare_with_world_one():
    cases = harness.world_cases({"device": "cpu", "n": 8}, [1, 2, 3], threads=4)
    assert [(c["world"], c["threads"]) for c in cases] == [(1, 4), (2, 2), (3, 1)]
    assert harness.world_cases({"device": "cuda"}, [2], threads=4)[0]["threads"] == 0
    rows = [
        {"world": 1, "threads": 2, "fwd_bwd_s": 2.0, "fwd_bwd_cpu_s": 4.0,
         "peak_mem_bytes": 200 << 20, "peak_vs_grad_buffers": 1.2},
        {"world": 2, "threads": 1, "fwd_bwd_s": 2.5, "fwd_bwd_cpu_s": 2.4,
         "peak_mem_bytes": 100 << 20, "peak_vs_grad_buffers": 1.3},
        {"world": 4, "threads": 1, "error": "rank 3: boom"},
    ]  # fmt: skip
    one, two, bad = harness.versus_world1(rows)
    assert (one["mem_vs_world1"], two["mem_vs_world1"], two["time_vs_world1"]) == (1, 0.5, 1.25)
    assert bad == rows[2] and harness.versus_world1(rows[1:]) == rows[1:]  # no world 1: as is
    table = harness.world_table([one, two, bad], label="").splitlines()
    assert table[2] == "| 1 | 2 | 200 | 1.00 | 1.20 | 2.00 | 1.00 | 4.00 |"
    assert table[3] == "| 2 | 1 | 100 | 0.50 | 1.30 | 2.50 | 1.25 | 2.40 |"
    assert table[4].startswith("| 4 | 1 | rank 3: boom |")
    labelled = harness.world_table([one | {"divergence": "js"}], label="divergence")
    assert labelled.splitlines()[2].startswith("| js | 1 | 2 | 200 |")


@pytest.mark.slow
def test_cce_bench_vocab_parallel_rows(tmp_path):
    """``bench.vocab_parallel``: the loss in 1 and 2 processes; per-rank rows beside the main
    table, memory and time against world 1, the cores split between the ranks."""
    from projects.cce import bench

    cfg = {"out": str(tmp_path), "n": 64, "v": 256, "d": 16, "repeats": 0,
           "methods": ["cce_chunked"], "vocab_parallel": {"worlds": [1, 2]}}  # fmt: skip
    doc = bench.run(cfg, "cpu", threads=2)
    one, two = doc["vocab_parallel"]
    assert (one["world"], one["threads"], two["world"], two["threads"]) == (1, 2, 2, 1)
    assert len(two["ranks"]) == 2 and one["mem_vs_world1"] == 1.0
    assert two["grad_buffer_bytes"] == (64 + 128) * 16 * 4  # e and half the head per rank
    assert two["mem_vs_world1"] == two["peak_mem_bytes"] / one["peak_mem_bytes"]
    assert json.loads((tmp_path / "results.json").read_text())["vocab_parallel"] == [one, two]
    assert "| 2 | 1 |" in (tmp_path / "results.md").read_text()


def test_kd_bench_stage_smoke(tmp_path):
    """The kd stage on the harness at a tiny shape; the kd report's bench section parses it."""
    from projects.kd import bench, report

    cfg = {"out": str(tmp_path), "n": 32, "v": 64, "d": 8, "temperature": 2.0, "repeats": 0,
           "divergences": ["akl"]}  # fmt: skip
    doc = bench.run(cfg, "cpu")
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(doc))
    rows = {r["method"]: r for r in doc["rows"]}
    assert (
        set(rows) == {"materialised", "chunked"}
        and rows["materialised"]["time_vs_materialised"] == 1
    )
    assert rows["chunked"]["grad_buffer_bytes"] == (32 + 64) * 8 * 4
    section = report.bench_section({"bench": cfg})
    assert "Measured by kernels.bench.harness" in section and "- akl: " in section


@pytest.mark.slow
def test_kd_bench_vocab_parallel_rows(tmp_path):
    """``bench.vocab_parallel``: the fused KD loss in 1 and 2 processes, a table of its own."""
    from projects.kd import bench

    cfg = {"out": str(tmp_path), "n": 32, "v": 64, "d": 8, "temperature": 2.0, "repeats": 0,
           "divergences": [], "vocab_parallel": {"worlds": [1, 2], "divergences": ["js"]}}  # fmt: skip
    doc = bench.run(cfg, "cpu", threads=2)  # the scaling rows only
    one, two = doc["vocab_parallel"]
    assert (one["divergence"], one["world"], two["world"], two["threads"]) == ("js", 1, 2, 1)
    assert two["grad_buffer_bytes"] == (32 + 32) * 8 * 4  # e_s and half the student head
    assert "| js | 2 | 1 |" in (tmp_path / "results.md").read_text()
