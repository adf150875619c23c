"""projects/kd report stage: tables, claim verdicts and the README block from synthetic metrics."""

import json
import sys
import types

import pytest
import yaml

from projects.kd import common, report

SEEDS = (0, 1, 2)
# per method: accuracy by seed (paired across methods), ECE fixed
OFFLINE_ACC = {
    "ce": (0.80, 0.81, 0.79),
    "forward_kl": (0.82, 0.83, 0.81),  # +2 points every seed: holds
    "dkd": (0.78, 0.79, 0.77),  # -4 points vs KD every seed: reversed
    "sinkhorn": (0.83, 0.82, 0.81),  # +1, -1, 0 vs KD: not resolved
}
ONLINE_ACC = {"dml": (0.81, 0.82, 0.80), "bdkd": (0.815, 0.83, 0.80)}


def _runs(table, teacher=False):
    runs = []
    for method, accs in table.items():
        for seed, acc in zip(SEEDS, accs):
            m = {"accuracy": acc, "ece": 0.02 + 0.01 * seed, "nll": 0.5, "agreement": 0.9}
            run = {"method": method, "seed": seed, "metrics": m, "wall_s": 1.0, "cpu_s": 1.0}
            run["n_params"] = 1000
            if teacher:
                run["teacher_metrics"] = {"accuracy": 0.85, "ece": 0.01, "nll": 0.4}
            runs.append(run)
    return runs


@pytest.fixture
def synthetic(tmp_path):
    params = common.load_params()
    params["image"]["paths"]["results"] = str(tmp_path / "results/image")
    params["report"] = {"readme": str(tmp_path / "README.md"), "results": str(tmp_path / "results")}
    params["bench"]["out"] = str(tmp_path / "results/bench")
    res = tmp_path / "results/image"
    res.mkdir(parents=True)
    teacher = {
        "n_params": 5000,
        "metrics": {"accuracy": 0.86, "ece": 0.01, "nll": 0.4},
        "wall_s": 3,
    }
    offline = {"runs": _runs(OFFLINE_ACC), "wall_s": 10}
    offline["summary"] = common.summarise(offline["runs"])
    online_runs = _runs(ONLINE_ACC, teacher=True)
    online = {"runs": online_runs, "wall_s": 20, "summary": common.summarise(online_runs)}
    online["teacher_summary"] = common.summarise(
        [{"method": r["method"], "metrics": r["teacher_metrics"]} for r in online_runs]
    )
    for name, obj in (("teacher", teacher), ("offline", offline), ("online", online)):
        (res / f"{name}.json").write_text(json.dumps(obj))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    (tmp_path / "README.md").write_text(
        "# kd\n\nintro\n\n<!-- results:start -->\nSTALE\n<!-- results:end -->\n\ntail\n"
    )
    return tmp_path, path


def _claim_row(body, text):
    rows = [line for line in body.splitlines() if f"| {text} |" in line]
    assert len(rows) == 1, text
    return rows[0]


def test_report_writes_tables_claims_and_plot_into_the_marked_block(synthetic):
    tmp_path, path = synthetic
    body = report.main(["--params", str(path)])
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# kd\n\nintro\n") and text.rstrip().endswith("tail")
    assert "STALE" not in text and body in text
    assert text.count("<!-- results:start -->") == 1
    # one row per method, mean ± std as in the synthetic runs
    assert "| student alone (CE) | 80.00 ± 1.00 |" in body
    assert "| KD, forward KL (Hinton et al. 2015) | 82.00 ± 1.00 |" in body
    kd_row = next(r for r in body.splitlines() if r.startswith("| KD, forward KL"))
    assert kd_row.endswith("| +2.00 |")  # delta top-1 vs the student alone, in points
    assert "| teacher (1 run) | 86.00 | 1.00 | 0.400 |" in body
    # verdicts computed from the paired differences
    assert _claim_row(body, "KD beats the student alone").endswith("| holds |")
    assert _claim_row(body, "DKD beats KD").endswith("| reversed |")
    assert "not resolved" in _claim_row(body, "adding the Sinkhorn distance beats KD")
    assert "not resolved" in _claim_row(body, "online BD-KD beats online DML (student top-1)")
    # claims whose methods were not run are left out
    assert "Dual-Head KD beats KD" not in body
    assert (tmp_path / "results" / report.PLOT).stat().st_size > 1000
    assert "![student top-1 and ECE per method](results/image_accuracy_ece.png)" in body
    assert "LM part not run." in body
    assert "Benchmark not run (`make bench PROJECT=kd`)." in body


def test_report_bench_section_verdicts_from_the_bench_results(synthetic):
    tmp_path, path = synthetic
    out = tmp_path / "results/bench"
    out.mkdir(parents=True)
    rows = [
        {"divergence": "js", "method": "materialised", "time_vs_materialised": 1.0,
         "peak_vs_grad_buffers": 90.0},
        {"divergence": "js", "method": "chunked", "time_vs_materialised": 0.61,
         "peak_vs_grad_buffers": 1.14},
        {"divergence": "akl", "method": "chunked", "time_vs_materialised": 1.31,
         "peak_vs_grad_buffers": 1.10},
        {"divergence": "tv", "method": "chunked", "time_vs_materialised": 0.9,
         "peak_vs_grad_buffers": 1.26},
    ]  # fmt: skip
    (out / "results.json").write_text(json.dumps({"rows": rows}))
    (out / "results.md").write_text("BENCH TABLE\n")
    body = report.main(["--params", str(path)])
    assert "BENCH TABLE" in body
    assert (
        "- js: 0.61 x the materialised time, 1.14 x the gradient buffers -> both targets met"
        in body
    )
    assert (
        "- akl: 1.31 x the materialised time, 1.10 x the gradient buffers -> target missed" in body
    )
    assert (
        "- tv: 0.90 x the materialised time, 1.26 x the gradient buffers -> target missed" in body
    )
    assert "no GPU here" in body


def test_report_includes_the_lm_section_when_that_part_has_run(synthetic, monkeypatch):
    tmp_path, path = synthetic
    (tmp_path / "results/lm").mkdir()
    (tmp_path / "results/lm/metrics.json").write_text("{}")
    fake = types.ModuleType("projects.kd.report_lm")
    fake.lm_section = lambda results: f"LM TABLE from {results.name}"
    monkeypatch.setitem(sys.modules, "projects.kd.report_lm", fake)
    body = report.main(["--params", str(path)])
    assert "LM TABLE from results" in body and "LM part not run" not in body


def test_verdict_thresholds():
    assert report.verdict(0.02, 0.005, True) == "holds"
    assert report.verdict(-0.02, 0.005, True) == "reversed"
    assert report.verdict(-0.02, 0.005, False) == "holds"  # lower ECE is better
    assert report.verdict(0.009, 0.005, True).startswith("not resolved")
