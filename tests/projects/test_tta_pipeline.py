"""projects.tta stages on tiny fake data: streams, label shift, error counting on a Fabric,
entry points, params and the full variant, run identity of train-source and adapt, report."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from core.engine import variants
from core.engine.config import load_params, parse_entry
from core.engine.deps import missing_deps
from core.engine.trainer import FABRIC_KEYS, TRAINER_KEYS, build_fabric
from core.models.resnet import ResNet
from projects.tta import adapt, report, train_source
from projects.tta.adapt import GRADUAL, label_order, make_stream, method_kwargs, run_stream
from projects.tta.methods import METHODS, build
from projects.tta.report import build_report, evaluate_claims, headline_metrics
from tests.projects.report_helpers import assert_report_regenerates

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "projects" / "tta"
NAMES = ["gaussian_noise", "contrast"]
TINY_MODEL = {"width": 4, "blocks": 1, "stem_stride": 2}


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """A fake Fashion-MNIST-C: 2 corruptions x 5 severities x 60 images, labels i % 10."""
    root = tmp_path_factory.mktemp("fmc")
    rng = np.random.default_rng(0)
    for name in NAMES:
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5, 60, 28, 28), dtype=np.uint8))
    np.save(root / "labels.npy", np.arange(60) % 10)
    return str(root)


@pytest.fixture(scope="module")
def fake_clean(tmp_path_factory):
    """A fake processed Fashion-MNIST: 256 train and 100 test images."""
    root = tmp_path_factory.mktemp("fm")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 256), ("test", 100)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        torch.save({"images": images, "labels": torch.arange(n) % 10}, root / f"{split}.pt")
    return str(root)


def test_label_order_sorted_and_dirichlet():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 40)[rng.permutation(400)]
    perm = label_order(y, "sorted", 50, 0.1, rng)
    assert sorted(perm) == list(range(400)) and np.all(np.diff(y[perm]) >= 0)
    perm = label_order(y, "dirichlet", 50, 0.01, rng)
    assert sorted(perm) == list(range(400))
    shifted = np.mean([len(set(y[perm][i : i + 50])) for i in range(0, 400, 50)])
    iid = label_order(y, None, 50, 0.1, rng)
    assert shifted < np.mean([len(set(y[iid][i : i + 50])) for i in range(0, 400, 50)])
    with pytest.raises(ValueError, match="label_order"):
        label_order(y, "reversed", 50, 0.1, rng)


def test_streams_reset_flags_and_contents(fake_root):
    reset = make_stream(
        {"stream": "reset", "batch_size": 20, "n_images": 40}, NAMES, 5, fake_root, 0
    )
    assert [b.reset for b in reset] == [True, False, True, False]
    assert [int(b.corruption[0]) for b in reset] == [0, 0, 1, 1]
    cont = make_stream(
        {"stream": "continual", "batch_size": 20, "n_images": 40}, NAMES, 5, fake_root, 0
    )
    assert [b.reset for b in cont] == [True, False, False, False]
    for a, b in zip(reset, cont):  # same data, same order; only the resets differ
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    mixed = make_stream(
        {"stream": "mixed", "batch_size": 20, "n_images": 40}, NAMES, 5, fake_root, 0
    )
    assert [b.reset for b in mixed] == [True, False, False, False]
    assert any(len(b.corruption.unique()) == 2 for b in mixed)
    assert sorted(torch.cat([b.corruption for b in mixed]).tolist()) == [0] * 40 + [1] * 40
    grad = make_stream(
        {"stream": "gradual", "batch_size": 10, "n_images": 10}, NAMES[:1], 5, fake_root, 0
    )
    assert [int(b.severity[0]) for b in grad] == list(GRADUAL) and grad[0].reset
    x0 = reset[0].x
    assert x0.shape == (20, 1, 28, 28) and x0.dtype == torch.float32
    assert 0 <= x0.min() <= x0.max() <= 1
    with pytest.raises(ValueError, match="stream"):
        make_stream({"stream": "random", "batch_size": 2, "n_images": 2}, NAMES, 5, fake_root, 0)


def test_bad_setting_names_the_key():
    params = load_params(PROJECT / "params.yaml")
    params["adapt"]["settings"]["reset"]["batch_size"] = 0
    with pytest.raises(ValueError, match=r"adapt\.settings\.reset\.batch_size"):
        adapt.jobs(params)


def test_run_stream_counts_errors_at_the_target_severity(fake_root):
    """Errors per corruption on the severity-5 samples only, against a hand count."""
    torch.manual_seed(0)
    model = ResNet(norm="bn", **TINY_MODEL)
    stream = make_stream(
        {"stream": "gradual", "batch_size": 10, "n_images": 10}, NAMES, 5, fake_root, 0
    )
    fabric = build_fabric({"accelerator": "cpu", "devices": 1, "precision": "32-true"})
    out = run_stream(build("source", model), stream, 5, NAMES, fabric)
    assert out["batches"] == 2 * len(GRADUAL) and out["n"] == {"gaussian_noise": 10, "contrast": 10}
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            (b5,) = [b for b in stream if int(b.severity[0]) == 5 and int(b.corruption[0]) == i]
            wrong = int((model.eval()(b5.x).argmax(1) != b5.y).sum())
            assert out["errors"][name] == wrong / 10


def test_every_method_in_params_builds_with_its_hparams():
    params = load_params(PROJECT / "params.yaml")
    assert set(params["adapt"]["methods"]) <= set(METHODS.names())
    model = ResNet(norm="gn", **params["model"])
    x = torch.rand(30, 1, 28, 28)
    source = (x, torch.arange(30) % 10)
    for name in params["adapt"]["methods"]:
        kw = method_kwargs(name, params, source, seed=0)
        if name == "rmt":
            kw["warmup_steps"] = 1
        assert build(name, model, **kw)(x[:4]).shape == (4, 10)


# --- entry points, params, variant, DVC -------------------------------------------------------


@pytest.mark.parametrize("module", [train_source, adapt, report])
def test_entry_point_help(module, capsys):
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "--params" in capsys.readouterr().out


OUTPUTS = ("paths.checkpoints", "paths.runs", "paths.results", "report.readme_section")


def _get(params: dict, dotted: str):
    for key in dotted.split("."):
        params = params[key]
    return params


@pytest.mark.parametrize("variant", [None, "full"])
def test_every_stage_parses_the_params_and_variant(variant):
    """Each entry point reads the defaults and the full variant; the merged params carry only
    known trainer / Fabric keys, valid settings and claims; the variant's outputs never land on
    the defaults' (so `make exp` cannot overwrite them)."""
    argv = ["--params", str(PROJECT / "params.yaml")] + (["--variant", variant] if variant else [])
    merged = {}
    for name, module in (("train", train_source), ("adapt", adapt), ("report", report)):
        _, merged[name], mach = parse_entry(module.build_parser(), argv)
        assert mach.threads >= 1 and mach.workers >= 1
    p = merged["adapt"]
    assert merged["train"] == merged["report"] == p
    assert "threads" not in p and "workers" not in p
    assert set(p["source"]["trainer"]) <= TRAINER_KEYS
    assert "enable_progress_bar" not in p["source"]["trainer"]
    assert set(p["adapt"]["trainer"]) <= FABRIC_KEYS and p["adapt"]["trainer"]["devices"] == 1
    assert set(p["source"]["max_epochs"]) == set(p["source"]["norms"]) >= set(p["adapt"]["norms"])
    assert set(p["adapt"]["methods"]) <= set(METHODS.names())
    assert len(adapt.jobs(p)) == (
        len(p["adapt"]["norms"])
        * len(p["adapt"]["settings"])
        * len(p["adapt"]["methods"])
        * len(p["adapt"]["seeds"])
    )
    report.check_claims(p["report"]["claims"])
    for c in p["report"]["claims"]:
        assert c["setting"] in p["adapt"]["settings"], c
    if variant:
        default = load_params(PROJECT / "params.yaml")
        for key in OUTPUTS:
            assert _get(p, key) != _get(default, key), key
        assert len(p["adapt"]["seeds"]) >= 5 and len(p["adapt"]["corruptions"]) >= 15


def test_full_variant_runs_as_a_dvc_experiment():
    cmd = variants.exp_command("tta", "full")
    assert cmd[:6] == ["dvc", "exp", "run", "--temp", "-n", "tta-full"]
    assert any(c.startswith("projects/tta/params.yaml:paths.results=") for c in cmd)
    assert cmd[-1] == "projects/tta/dvc.yaml"


def test_dvc_deps_cover_every_stage_import():
    assert missing_deps(PROJECT / "dvc.yaml") == {}


# --- run identity of the real stages ----------------------------------------------------------


def _tiny_params(tmp_path: Path, fake_root: str, fake_clean: str) -> Path:
    """Params for seconds-long runs: a width-4 ResNet, 1 epoch of 4 steps, 2 seeds, 3 methods."""
    p = load_params(PROJECT / "params.yaml")
    p["paths"] = {
        "clean": fake_clean,
        "corrupted": fake_root,
        "checkpoints": str(tmp_path / "checkpoints"),
        "runs": str(tmp_path / "runs"),
        "results": str(tmp_path / "results"),
    }
    p["model"] = TINY_MODEL
    p["source"] |= {"batch_size": 64, "max_epochs": {"bn": 1, "gn": 1}}
    p["adapt"] |= {"seeds": [0, 1], "methods": ["source", "bn", "tent"], "corruptions": NAMES}
    p["adapt"]["settings"] = {"reset": {"stream": "reset", "batch_size": 10, "n_images": 20}}
    p["report"] |= {"readme": str(tmp_path / "README.md")}
    path = tmp_path / "params.yaml"
    path.write_text(json.dumps(p))  # JSON is YAML
    return path


def test_train_source_identity(tmp_path, fake_root, fake_clean, capsys):
    """Other machine knobs: nothing trains (the finished run is restored); a changed source
    param starts fresh (not restored from the finished run's checkpoint)."""
    args = ["--params", str(_tiny_params(tmp_path, fake_root, fake_clean)), "--workers", "1"]
    first = train_source.main(args)
    ckpt = tmp_path / "runs" / "source" / "bn" / "checkpoints" / "last.ckpt"
    weights = tmp_path / "checkpoints" / "source-bn.pt"
    mtime, w0 = ckpt.stat().st_mtime_ns, torch.load(weights, weights_only=True)
    assert set(first) == {"bn", "gn"} and 0 <= first["bn"]["clean_test_accuracy"] <= 1

    capsys.readouterr()
    again = train_source.main(args + ["--set", "machine.threads=2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "resuming from" in out and "starting fresh" not in out and "train epoch" not in out
    assert ckpt.stat().st_mtime_ns == mtime
    assert again["bn"]["clean_test_accuracy"] == first["bn"]["clean_test_accuracy"]
    w1 = torch.load(weights, weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)

    changed = train_source.main(args + ["--set", "source.lr=0.03", "--norms", "bn"])
    assert "starting fresh (config changed" in capsys.readouterr().out
    w2 = torch.load(weights, weights_only=True)
    assert not all(torch.equal(w0[k], w2[k]) for k in w0)
    assert set(changed) == {"bn", "gn"}  # the other norm's metrics are kept


def _records(tmp_path: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tmp_path)): p.stat().st_mtime_ns
        for p in sorted((tmp_path / "runs" / "adapt").rglob("*.json"))
    }


def test_adapt_identity(tmp_path, fake_root, fake_clean, capsys):
    """Per-run records: a rerun with other machine knobs recomputes nothing; a changed method
    hparam recomputes only that method's runs; a lost record (killed stage) only its run."""
    params = _tiny_params(tmp_path, fake_root, fake_clean)
    p = load_params(params)
    for norm in ("bn", "gn"):
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        torch.save(
            ResNet(norm=norm, **TINY_MODEL).state_dict(),
            tmp_path / "checkpoints" / f"source-{norm}.pt",
        )
    args = ["--params", str(params), "--workers", "1"]
    first = adapt.main(args)
    records = _records(tmp_path)
    assert len(records) == 2 * 1 * 3 * 2  # norms x settings x methods x seeds
    assert "[tta-adapt 12/12]" in capsys.readouterr().out
    errors_json = tmp_path / "results" / "errors.json"
    assert json.loads(errors_json.read_text()) == first
    assert first["streams"]["reset"] == {
        "batches": 4,
        "batch_size": 10,
        "images": 20,
        "corruptions": 2,
    }
    assert len(first["errors"]["bn"]["reset"]["tent"]["contrast"]) == 2  # one error per seed

    again = adapt.main(args + ["--set", "machine.threads=2", "--set", "machine.workers=3"])
    out = capsys.readouterr().out
    assert out.count("(cached") == 12 and _records(tmp_path) == records
    assert again["errors"] == first["errors"]

    tent = adapt.main(
        args
        + [
            "--set",
            f"adapt.hparams.tent={json.dumps(p['adapt']['hparams']['tent'] | {'lr': 0.01})}",
        ]
    )
    out = capsys.readouterr().out
    assert out.count("(cached") == 8
    changed = {k for k, v in _records(tmp_path).items() if records[k] != v}
    assert changed == {k for k in records if "/tent/" in k}
    assert tent["errors"]["bn"]["reset"]["bn"] == first["errors"]["bn"]["reset"]["bn"]
    rec = json.loads(
        (tmp_path / "runs" / "adapt" / "bn" / "reset" / "tent" / "seed0.json").read_text()
    )
    assert rec["identity"]["config"]["hparams"]["lr"] == 0.01 and not rec.get("cached")

    lost = tmp_path / "runs" / "adapt" / "gn" / "reset" / "bn" / "seed1.json"
    lost.unlink()
    adapt.main(args)  # tent back at its params value: recomputed as well
    out = capsys.readouterr().out
    assert out.count("(cached") == 12 - 1 - 4 and lost.exists()


# --- report -----------------------------------------------------------------------------------


def _cell(errors_per_seed: list[float]) -> dict[str, list[float]]:
    return {"gaussian_noise": errors_per_seed, "contrast": errors_per_seed}


def test_claims_by_hand():
    """Paired over seeds: tent beats bn by 1 point in every seed (holds); sar vs tent differs
    in sign across seeds (inconclusive); a missing setting is 'not run'."""
    errors = {
        "bn": {
            "reset": {
                "bn": _cell([0.20, 0.22, 0.21]),
                "tent": _cell([0.19, 0.21, 0.20]),
                "sar": _cell([0.18, 0.23, 0.20]),
            }
        }
    }
    claims = [
        {
            "text": "t",
            "paper": "p",
            "setting": "reset",
            "a": "bn/tent",
            "b": "bn/bn",
            "min_effect": 0.5,
        },
        {
            "text": "s",
            "paper": "p",
            "setting": "reset",
            "a": "bn/sar",
            "b": "bn/tent",
            "min_effect": 0.5,
        },
        {
            "text": "x",
            "paper": "p",
            "setting": "bs1",
            "a": "bn/sar",
            "b": "bn/tent",
            "min_effect": 1,
        },
    ]
    out = evaluate_claims(errors, claims)
    assert out[0]["verdict"] == "holds" and out[0]["mean"] == pytest.approx(1.0)
    assert out[0]["se"] == pytest.approx(0.0, abs=1e-9)
    assert out[1]["verdict"] == "inconclusive"
    # differences tent - sar: +1, -2, 0 points: mean -1/3, sample sd sqrt(7/3), se sqrt(7/9)
    assert out[1]["mean"] == pytest.approx(-1 / 3) and out[1]["se"] == pytest.approx((7 / 9) ** 0.5)
    assert out[2]["verdict"] is None
    assert "not run" in report.claim_line(out[2]) and "MDE" in report.claim_line(out[1])
    line = report.crosscheck_line(out)
    assert line.startswith("1 of 3 claims") and "(sar, tent) match" in line
    assert "Not compared" in report.crosscheck_line([out[1] | {"a": "bn/rmt"}])
    with pytest.raises(ValueError, match=r"report\.claims\[0\]\.a"):
        evaluate_claims(errors, [claims[0] | {"a": "tent"}])
    with pytest.raises(ValueError, match=r"report\.claims\[0\]\.min_effect"):
        evaluate_claims(errors, [claims[0] | {"min_effect": -1}])


def test_headline_metrics_are_flat_and_short():
    """Mean over corruptions per seed, then over seeds: (10 + 20 + 60) / 3 and (20 + 30 + 70) / 3
    -> 30 and 40 -> 35 %."""
    cell = {"a": [0.1, 0.2], "b": [0.2, 0.3], "c": [0.6, 0.7]}
    m = headline_metrics({"bn": {"reset": {"tent": cell}}}, {"bn": {"clean_test_accuracy": 0.9}})
    assert m == {"error": {"bn": {"reset": {"tent": 35.0}}}, "clean_acc": {"bn": 90.0}}


def test_report_regenerates_the_committed_readme_section(tmp_path):
    """From the committed results, the report writes the committed README section, metrics,
    claims and figure byte for byte."""
    p = load_params(PROJECT / "params.yaml")

    def build(params, readme):
        params["report"]["readme"] = str(readme)
        build_report(params)

    names = ("metrics.json", "claims.json", "errors.png")
    assert_report_regenerates(tmp_path, PROJECT, p, build, names)


@pytest.mark.slow
def test_pipeline_end_to_end_in_worker_processes(tmp_path, fake_root, fake_clean):
    """train-source -> adapt -> report with two worker processes: the same errors as in one."""
    params = _tiny_params(tmp_path, fake_root, fake_clean)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\n<!-- results:end -->\n")
    args = ["--params", str(params)]
    train_source.main(args + ["--workers", "2"])
    two = adapt.main(args + ["--workers", "2"])
    shutil.rmtree(tmp_path / "runs" / "adapt")
    one = adapt.main(args + ["--workers", "1"])
    assert one["errors"] == two["errors"]
    claims = report.main(args)
    assert len(claims) == len(load_params(params)["report"]["claims"])
    text = readme.read_text()
    assert "| tent |" in text and "not run in this params set" in text
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert set(metrics["error"]["gn"]["reset"]) == {"source", "bn", "tent"}
