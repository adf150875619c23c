"""robust_losses stages: run identity (what recomputes, what does not), the multi-process path, and
the report regenerating the committed README section byte for byte."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from core.engine import identity
from core.engine.config import load_params
from projects.robust_losses import DEFAULT_PARAMS, report, train

PROJECT = Path(__file__).resolve().parents[2] / "projects" / "robust_losses"


@pytest.fixture
def fake_data(tmp_path):
    """A fake processed Fashion-MNIST: 200 train and 60 test images, class-dependent pixels."""
    root = tmp_path / "fm"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 200), ("test", 60)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 128, (n, 28, 28), generator=g, dtype=torch.uint8)
        images[:, 0, :10] += (100 * torch.nn.functional.one_hot(labels, 10)).to(torch.uint8)
        torch.save({"images": images, "labels": labels}, root / f"{split}.pt")
    return root


def _params(tmp_path, data, **machine):
    p = load_params(DEFAULT_PARAMS)
    p["machine"] = {"threads": 1, "workers": 1} | machine
    p["seeds"] = [0]
    p["noise"] = {"symmetric": [0.0, 0.4]}
    p["losses"] = {k: p["losses"][k] for k in ("ce", "gce", "aldr_kl")}
    p["data"]["n_train"] = 200
    p["model"]["hidden"] = [16]
    p["trainer"]["max_epochs"] = 1
    p["probe"]["n"] = 30
    p["paths"] = {"data": str(data), "runs": str(tmp_path / "runs"), "results": str(tmp_path / "r")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return ["--params", str(path)]


@pytest.fixture
def counting(monkeypatch):
    """The jobs train_run actually trained (not served from their stored records)."""
    trained, real = [], train.train_run

    def run(p, data, job):
        trained.append(job)
        return real(p, data, job)

    monkeypatch.setattr(train, "train_run", run)
    return trained


def test_identity_machine_knobs_recompute_nothing_and_edits_recompute_their_runs(
    tmp_path, fake_data, counting, monkeypatch
):
    args = _params(tmp_path, fake_data)
    assert train.main(args) == 0 and len(counting) == 6  # 2 conditions x 3 losses
    first = json.loads((tmp_path / "r" / "runs.json").read_text())["runs"]
    record = json.loads((tmp_path / "runs" / "sym40-gce-s0.json").read_text())
    code = record["identity"]["code"]
    for f in ("projects/robust_losses/model.py", "core/losses/classification.py"):
        assert f in code  # the imported code, from the import graph

    counting.clear()  # machine knobs: threads (and workers, in the slow test) change nothing
    assert train.main(args + ["--threads", "2"]) == 0 and counting == []
    again = json.loads((tmp_path / "r" / "runs.json").read_text())["runs"]
    assert [r["cached"] for r in again] == [True] * 6
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in first]

    counting.clear()  # a changed loss hyperparameter: just that loss's runs
    assert train.main(args + ["--set", "losses.gce.q=0.5"]) == 0
    assert sorted(j[3] for j in counting) == ["gce", "gce"]

    counting.clear()  # a killed stage: the missing record alone
    (tmp_path / "runs" / "clean-ce-s0.json").unlink()
    assert train.main(args + ["--set", "losses.gce.q=0.5"]) == 0
    assert counting == [("clean", 0.0, 0, "ce")]

    counting.clear()  # an edit of the loss functions' module (seen as a new file digest)
    real_digest = identity.file_digest

    def edited(path):
        if str(path).endswith("core/losses/classification.py"):
            return "edited"
        return real_digest(path)

    monkeypatch.setattr(identity, "file_digest", edited)
    assert train.main(args + ["--set", "losses.gce.q=0.5"]) == 0 and len(counting) == 6


@pytest.mark.slow
def test_worker_processes_give_the_in_process_numbers(tmp_path, fake_data):
    """workers = 2 (spawned processes) trains the same numbers as one process, and a rerun
    with other machine knobs serves every run from its record."""
    args = _params(tmp_path, fake_data, workers=2)
    assert train.main(args) == 0
    two = json.loads((tmp_path / "r" / "runs.json").read_text())["runs"]
    assert not any(r["cached"] for r in two)
    code = json.loads((tmp_path / "runs" / "sym40-gce-s0.json").read_text())["identity"]["code"]
    assert "projects/robust_losses/model.py" in code  # a fresh worker imports no report code
    assert "projects/robust_losses/report.py" not in code
    shutil.rmtree(tmp_path / "runs")
    assert train.main(args + ["--workers", "1"]) == 0
    one = json.loads((tmp_path / "r" / "runs.json").read_text())["runs"]
    assert [r["test_acc"] for r in one] == [r["test_acc"] for r in two]
    assert train.main(args + ["--workers", "2", "--threads", "2"]) == 0
    assert all(r["cached"] for r in json.loads((tmp_path / "r" / "runs.json").read_text())["runs"])


def test_stage_smoke_then_report_outputs(tmp_path, fake_data):
    args = _params(tmp_path, fake_data)
    assert train.main(args) == 0
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nSTALE\n<!-- results:end -->\ntail\n")
    args += ["--set", f"report.readme={readme}"]
    args += ["--set", "report.claims=[{a: gce, b: ce, min_effect: 1.0, paper: P}]"]
    assert report.main(args) == 0
    text = readme.read_text()
    assert "STALE" not in text and text.endswith("tail\n") and "| aldr_kl |" in text
    assert "gce > ce (P)" in text and "MDE" in text and "](r/accuracy.png)" in text
    out = tmp_path / "r"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"acc", "peak"} and set(metrics["acc"]["ce"]) == {"clean", "sym40"}
    assert (out / "curves" / "test_acc_sym40.csv").read_text().startswith("epoch,ce,gce,aldr_kl")
    assert (out / "curves" / "dse_ce.csv").read_text().startswith("epoch,clean,sym40")
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "dse.png").stat().st_size > 0


def test_report_regenerates_the_committed_readme_section_byte_for_byte(tmp_path):
    p = load_params(DEFAULT_PARAMS)
    results = PROJECT / "results"
    if not (results / "runs.json").exists():
        pytest.skip("no committed results yet")
    out = tmp_path / "results"
    out.mkdir()
    for name in ("runs.json", "curves.csv"):
        shutil.copy(results / name, out / name)
    readme = tmp_path / "README.md"
    shutil.copy(PROJECT / "README.md", readme)
    p["paths"]["results"] = str(out)
    p["report"]["readme"] = str(readme)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    assert report.main(["--params", str(tmp_path / "params.yaml")]) == 0
    assert readme.read_bytes() == (PROJECT / "README.md").read_bytes()
    for name in ("metrics.json", "report.json"):
        assert (out / name).read_bytes() == (results / name).read_bytes()


@pytest.mark.slow
def test_missing_data_fails_in_worker_processes_instead_of_hanging(tmp_path):
    args = _params(tmp_path, tmp_path / "absent", workers=2)
    with pytest.raises(FileNotFoundError, match="processed Fashion-MNIST missing"):
        train.main(args)
