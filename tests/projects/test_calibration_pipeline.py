"""projects/calibration: the synthetic TS-vs-mixup pipeline end to end on tiny params."""

import json

import yaml

from projects.calibration import report, train


def _tiny_params(tmp_path):
    params = train.load_params()
    params.update(runs=2, seed=3)
    params["data"].update(dim=5, n=200, means=[1.0])
    params["model"]["hidden"] = [16]
    params["optim"].update(epochs=3, batch_size=50)
    params["paths"]["results"] = str(tmp_path / "results")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_train_and_report_end_to_end(tmp_path):
    params = _tiny_params(tmp_path)
    train.main(["--params", str(params)])
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    runs = json.loads((tmp_path / "results" / "runs.json").read_text())["mean_1.0"]
    assert len(runs) == 2 and set(metrics["mean_1.0"]) == {"erm", "erm+ts", "mixup", "mixup+ts"}
    for run in runs:
        for method in ("erm", "mixup"):
            # TS keeps the argmax, hence accuracy
            assert run[f"{method}+ts"]["accuracy"] == run[method]["accuracy"]
            assert run[f"{method}+ts"]["temperature"] > 0
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\noutro\n")
    report.main(["--params", str(params), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert text.count("| 1.0 |") == 4


def test_dvc_stages_follow_house_rules():
    with open("projects/calibration/dvc.yaml") as f:
        stages = yaml.safe_load(f)["stages"]
    assert set(stages) == {"calibration-train", "calibration-report"}
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m projects.calibration.{name.removeprefix('calibration-')}"
    metrics = stages["calibration-train"]["metrics"][0]
    assert metrics == {"projects/calibration/results/metrics.json": {"cache": False}}
