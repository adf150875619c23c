"""projects/calibration: the synthetic TS-vs-mixup stage on tiny params, and the stage layout."""

import json

import yaml

from projects.calibration import train


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


def test_train_end_to_end(tmp_path):
    # the report stage needs the Fashion-MNIST results too: tested in test_calibration_fmnist.py
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


def test_dvc_stages_follow_house_rules():
    with open("projects/calibration/dvc.yaml") as f:
        stages = yaml.safe_load(f)["stages"]
    assert set(stages) == {
        "calibration-train",
        "calibration-fmnist-train",
        "calibration-fmnist-calibrate",
        "calibration-report",
    }
    for name, stage in stages.items():
        module = name.removeprefix("calibration-").replace("-", "_")
        assert stage["cmd"] == f"python -m projects.calibration.{module}"
        assert stage["wdir"] == "../.."
    metrics = stages["calibration-train"]["metrics"][0]
    assert metrics == {"projects/calibration/results/metrics.json": {"cache": False}}
