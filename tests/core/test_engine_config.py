"""core.engine.config / variants: params, overrides, variants, machine knobs, the CLI."""

import pytest

from core.engine import variants
from core.engine.config import entry_parser, load_params, machine, parse_entry

PARAMS = """
seed: 0
machine: {threads: 1, workers: 2}
paths: {results: projects/p/results}
train: {lr: 0.001, epochs: 3}
"""


def _project(root):
    d = root / "projects" / "p"
    (d / "variants").mkdir(parents=True)
    (d / "params.yaml").write_text(PARAMS)
    (d / "variants" / "full.yaml").write_text(
        "paths.results: projects/p/results/full\ntrain.epochs: 30\n"
    )
    return d / "params.yaml"


def test_variant_then_overrides(tmp_path):
    path = _project(tmp_path)
    p = load_params(path, variant="full", overrides=["train.lr=3e-4", "seed=1"])
    assert p["paths"]["results"] == "projects/p/results/full" and p["train"]["epochs"] == 30
    assert p["train"]["lr"] == 3e-4 and p["seed"] == 1
    with pytest.raises(ValueError, match="no key 'lrr'"):
        load_params(path, overrides=["train.lrr=1"])
    with pytest.raises(ValueError, match="known variants: \\['full'\\]"):
        load_params(path, variant="gpu")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        load_params(path, overrides=["train.lr"])


def test_machine_knobs_from_params_and_cli(tmp_path):
    path = _project(tmp_path)
    args, params, m = parse_entry(entry_parser("x", path), ["--threads", "2"])
    assert (m.threads, m.workers) == (2, 2)
    with pytest.raises(ValueError, match=r"machine.workers must be an integer >= 1"):
        machine({"machine": {"workers": 0}})
    with pytest.raises(ValueError, match="unknown machine keys"):
        machine({"machine": {"thread": 1}})
    with pytest.raises(SystemExit):
        parse_entry(entry_parser("x", path), ["--workers", "0"])


def test_make_exp_command(tmp_path, monkeypatch):
    _project(tmp_path)
    monkeypatch.setattr(variants, "REPO_ROOT", tmp_path)
    cmd = variants.exp_command("p", "full")
    assert cmd[:6] == ["dvc", "exp", "run", "--temp", "-n", "p-full"]
    assert 'projects/p/params.yaml:paths.results="projects/p/results/full"' in cmd
    assert "projects/p/params.yaml:train.epochs=30" in cmd and cmd[-1] == "projects/p/dvc.yaml"
    with pytest.raises(ValueError, match="has no"):
        variants.exp_command("nope", "full")
