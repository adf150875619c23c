"""TTA pipeline pieces on tiny fake data: streams, label shift, error counting, report, params."""

import numpy as np
import pytest
import torch

from core.models.resnet import ResNet
from projects.tta.adapt import GRADUAL, label_order, main, make_stream, method_kwargs, run_stream
from projects.tta.common import load_params
from projects.tta.methods import METHODS, build
from projects.tta.report import claims, render

NAMES = ["gaussian_noise", "contrast"]


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """A fake Fashion-MNIST-C: 2 corruptions x 5 severities x 60 images, labels i % 10."""
    root = tmp_path_factory.mktemp("fmc")
    rng = np.random.default_rng(0)
    for name in NAMES:
        np.save(root / f"{name}.npy", rng.integers(0, 256, (5, 60, 28, 28), dtype=np.uint8))
    np.save(root / "labels.npy", np.arange(60) % 10)
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
    assert [b.corruption[0] for b in reset] == ["gaussian_noise"] * 2 + ["contrast"] * 2
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
    assert any(len(set(b.corruption)) == 2 for b in mixed)
    grad = make_stream(
        {"stream": "gradual", "batch_size": 10, "n_images": 10}, NAMES[:1], 5, fake_root, 0
    )
    assert [int(b.severity[0]) for b in grad] == list(GRADUAL) and grad[0].reset
    x0 = reset[0].x
    assert (
        x0.shape == (20, 1, 28, 28) and x0.dtype == torch.float32 and 0 <= x0.min() <= x0.max() <= 1
    )


def test_run_stream_counts_errors_at_the_target_severity(fake_root):
    torch.manual_seed(0)
    model = ResNet(width=4, norm="bn")
    stream = make_stream(
        {"stream": "gradual", "batch_size": 10, "n_images": 10}, NAMES[:1], 5, fake_root, 0
    )
    errors = run_stream(build("source", model), stream, 5)
    (b5,) = [b for b in stream if int(b.severity[0]) == 5]
    with torch.no_grad():
        expected = (model.eval()(b5.x).argmax(1) != b5.y).float().mean().item()
    assert errors == {"gaussian_noise": pytest.approx(expected)}


def test_every_method_in_params_builds_with_its_hparams():
    params = load_params()
    assert set(params["adapt"]["methods"]) <= set(METHODS.names())
    model = ResNet(norm="gn", **params["model"])
    x = torch.rand(30, 1, 28, 28)
    source = (x, torch.arange(30) % 10)
    for name in params["adapt"]["methods"]:
        kw = method_kwargs(name, params, source, seed=0)
        if name == "rmt":
            kw["warmup_steps"] = 1
        assert build(name, model, **kw)(x[:4]).shape == (4, 10)


def test_report_renders_tables_and_checks_claims():
    cell = lambda e: {"gaussian_noise": [e, e + 0.02], "contrast": [e, e]}  # noqa: E731
    errors = {
        "bn": {
            "reset": {"source": cell(0.5), "tent": cell(0.3), "rmt": cell(0.4)},
            "continual": {"source": cell(0.5), "tent": cell(0.6), "rmt": cell(0.2)},
        }
    }
    lines = claims(errors)
    assert any("Tent beats source" in s and "**holds**" in s for s in lines)
    assert any("RMT leads in the continual setting (bn): **holds**" in s for s in lines)
    assert any("not run" in s for s in lines)
    text = render(
        {"errors": errors, "seeds": [0, 1], "severity": 5},
        {"bn": {"clean_test_accuracy": 0.91}},
        ["source", "tent", "rmt"],
    )
    assert "| tent | 30.5 ± 0.5 | 60.5 ± 0.5 |" in text and "BN 91.00%" in text


def test_adapt_main_per_norm_runs_merge(fake_root, tmp_path):
    """``--norms bn`` then ``--norms gn`` leaves both norms' errors in errors.json."""
    import json

    import yaml

    params = load_params()
    params["model"] = {"width": 4, "blocks": 1, "stem_stride": 2}
    params["paths"].update(
        checkpoints=str(tmp_path), results=str(tmp_path / "results"), corrupted=fake_root
    )
    params["adapt"].update(seeds=[0], methods=["source", "bn", "tent"], corruptions=NAMES)
    params["adapt"]["settings"] = {"reset": {"stream": "reset", "batch_size": 20, "n_images": 20}}
    for norm in ("bn", "gn"):
        torch.save(
            ResNet(norm=norm, **params["model"]).state_dict(), tmp_path / f"source-{norm}.pt"
        )
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    main(["--params", str(path), "--norms", "bn"])
    main(["--params", str(path), "--norms", "gn"])
    out = json.loads((tmp_path / "results" / "errors.json").read_text())
    assert set(out["errors"]) == {"bn", "gn"}
    assert set(out["errors"]["gn"]["reset"]) == {"source", "bn", "tent"}
    assert all(len(v) == 1 for v in out["errors"]["bn"]["reset"]["tent"].values())
    # both norms at once in two worker processes give the same errors as the per-norm runs
    main(["--params", str(path)])
    both = json.loads((tmp_path / "results" / "errors.json").read_text())
    assert params["workers"] == 2 and both["errors"] == out["errors"]


def test_verdict_needs_a_consistent_and_material_gap():
    from projects.tta.report import verdict

    base = np.array([30.0, 31.0, 29.0])
    assert verdict(base - 2.0, base) == "**holds**"
    assert verdict(base + 2.0, base) == "**does not hold** (the reverse)"
    assert "below 0.5" in verdict(base - 0.2, base)  # consistent but negligible
    assert "seed noise" in verdict(base + np.array([-4.0, 3.0, -2.0]), base)
