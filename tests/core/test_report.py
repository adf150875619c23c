"""core.report: sample statistics, the claim rule against scipy, tables, DVC metrics files."""

import json
import math
import statistics

import numpy as np
import pytest
from scipy import stats

from core.report.claims import VERDICTS, mde, paired_claim
from core.report.metrics import check_metrics, write_metrics
from core.report.stats import mean_std, paired_differences
from core.report.tables import fmt, fmt_mean_std, markdown_table


def test_mean_std_is_the_sample_std():
    x = [0.91, 0.93, 0.90, 0.95]
    m = mean_std(x)
    assert m.mean == pytest.approx(statistics.fmean(x)) and m.n == 4
    assert m.std == pytest.approx(statistics.stdev(x))  # ddof 1, not the population std
    assert m.se == pytest.approx(statistics.stdev(x) / 2)
    assert math.isnan(mean_std([1.0]).std)
    with pytest.raises(ValueError, match="finite"):
        mean_std([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        mean_std([])


def test_paired_differences_pair_by_seed():
    a, b = {2: 5.0, 0: 1.0, 1: 3.0}, {0: 0.5, 1: 1.0, 2: 4.0}
    np.testing.assert_array_equal(paired_differences(a, b), [0.5, 2.0, 1.0])
    with pytest.raises(ValueError, match="paired seeds differ"):
        paired_differences(a, {0: 1.0})


@pytest.mark.parametrize("d", [[0.8, 1.1, 0.9, 1.3, 1.0], [0.2, -0.1, 0.4], [-1.0, -1.2, -0.9]])
def test_claim_interval_and_mde_match_scipy(d):
    c = paired_claim(d, min_effect=0.5)
    n, se = len(d), stats.sem(d)
    lo, hi = stats.t.interval(0.95, n - 1, loc=np.mean(d), scale=se)
    assert (c.n, c.mean, c.se) == (n, pytest.approx(np.mean(d)), pytest.approx(se))
    assert (c.ci_low, c.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    # MDE: the effect a one-sample t-test at alpha 0.05 detects with power 0.8 (noncentral t)
    delta = c.mde / se
    crit = stats.t.ppf(0.975, n - 1)
    power = 1 - stats.nct.cdf(crit, n - 1, delta) + stats.nct.cdf(-crit, n - 1, delta)
    assert power == pytest.approx(0.8, abs=1e-6)


def test_claim_verdicts():
    assert paired_claim([0.8, 1.1, 0.9, 1.3, 1.0], min_effect=0.5).verdict == "holds"
    # significant but smaller than the claimed minimum: not "holds"
    assert paired_claim([0.30, 0.31, 0.29, 0.30], min_effect=0.5).verdict == "does not hold"
    assert paired_claim([-1.0, -1.2, -0.9], min_effect=0.0).verdict == "does not hold"
    noisy = paired_claim([2.0, -1.5, 0.5], min_effect=0.5)
    assert noisy.verdict == "inconclusive" and noisy.mde > 2
    one = paired_claim([3.0], min_effect=0.5)
    assert one.verdict == "inconclusive" and one.mde == math.inf and "n 1" in one.text()
    assert set(VERDICTS) == {"holds", "does not hold", "inconclusive"}
    with pytest.raises(ValueError, match="min_effect"):
        paired_claim([1.0, 2.0], min_effect=-1)
    text = paired_claim([0.8, 1.1, 0.9, 1.3, 1.0], min_effect=0.5).text("pts")
    assert text.startswith("holds: +1.02 ± 0.09 pts (95 % CI") and "MDE" in text
    assert mde(0.1, 1) == math.inf


def test_tables_and_formats():
    t = markdown_table(["a", "b"], [["x", 1], ["y", 2]])
    assert t.splitlines() == ["| a | b |", "|---|---:|", "| x | 1 |", "| y | 2 |"]
    assert fmt(None) == "—" and fmt(0.1234, 1, 100) == "12.3"
    assert fmt_mean_std(mean_std([1.0, 3.0]), 1) == "2.0 ± 1.4"
    with pytest.raises(ValueError, match="columns"):
        markdown_table(["a"], [["x", 1]])


def test_metrics_files_have_short_keys_and_numbers(tmp_path):
    write_metrics(tmp_path / "m.json", {"val_loss": {"torch": 6.2, "cce": 6.2}, "n": 3})
    assert json.loads((tmp_path / "m.json").read_text())["val_loss"]["cce"] == 6.2
    for bad in ({"a claim holds": 1.0}, {"a": [1, 2]}, {"a": "holds"}, {"a": float("nan")}):
        with pytest.raises(ValueError, match="metrics"):
            check_metrics(bad)
