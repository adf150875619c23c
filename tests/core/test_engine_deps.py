"""core.engine.deps: a stage's deps must cover the static import closure of its entry point."""

import textwrap

import pytest

from core.engine import deps, identity


def _tree(root):
    pkg = root / "probe_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import f\n")
    (pkg / "sub" / "leaf.py").write_text("import os\n\ndef f():\n    from probe_pkg import lazy\n")
    (pkg / "lazy.py").write_text("X = 1\n")
    (pkg / "entry.py").write_text("from probe_pkg.sub import f\nimport numpy\n")
    (pkg / "other.py").write_text("")
    return pkg


def test_static_closure_follows_relative_and_in_function_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "PACKAGES", ("probe_pkg",))
    pkg = _tree(tmp_path)
    files = deps.static_closure("probe_pkg.entry", tmp_path)
    assert files == {
        pkg / "__init__.py",
        pkg / "entry.py",
        pkg / "sub" / "__init__.py",
        pkg / "sub" / "leaf.py",
        pkg / "lazy.py",  # imported inside a function: still part of the graph
    }


def test_missing_deps_names_uncovered_files(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "PACKAGES", ("probe_pkg",))
    _tree(tmp_path)
    stage = textwrap.dedent("""
        stages:
          s:
            cmd: python -m probe_pkg.entry --flag
            deps: [probe_pkg/entry.py, probe_pkg/sub, data.bin]
          t:
            cmd: python -m probe_pkg.entry
            deps: [probe_pkg]
          u:
            cmd: echo no python module here
    """)
    (tmp_path / "dvc.yaml").write_text(stage)
    assert deps.missing_deps(tmp_path / "dvc.yaml", tmp_path) == {
        "s": ["probe_pkg/__init__.py", "probe_pkg/lazy.py"]
    }


PIPELINES = sorted(
    p.relative_to(identity.REPO_ROOT).as_posix()
    for p in [identity.REPO_ROOT / "dvc.yaml", *identity.REPO_ROOT.glob("projects/*/dvc.yaml")]
)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_committed_pipeline_covers_its_imports(pipeline):
    """Every stage of every committed pipeline lists the code its entry point imports."""
    assert len(PIPELINES) >= 6
    assert deps.missing_deps(identity.REPO_ROOT / pipeline) == {}
