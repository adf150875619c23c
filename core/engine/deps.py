"""DVC stage deps checked against the import graph: a stage reruns whenever code it runs changes.

For each stage whose ``cmd`` runs ``python -m <module>``, the static import closure of that
module (every ``import`` statement in the repository's own files, those inside functions
included) must be covered by the stage's ``deps`` (the file itself or a folder above it).
``python -m core.engine.deps [dvc.yaml ...]`` prints what is missing and exits 1 if anything
is; the test suite runs it over every pipeline.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterable
from pathlib import Path

import yaml

from core.engine import identity
from core.engine.identity import REPO_ROOT

__all__ = ["missing_deps", "module_file", "static_closure"]

_CMD_MODULE = re.compile(r"python3?\s+-m\s+([\w.]+)")


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The source file of module ``name`` under ``root`` (``a/b.py`` or ``a/b/__init__.py``)."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, name: str) -> set[str]:
    """Repository modules named by the import statements of module ``name`` (file ``path``),
    with the packages they pass through."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]
        for t in targets:
            parts = t.split(".")
            if parts[0] in identity.PACKAGES:
                found.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return found


def static_closure(module: str, root: Path = REPO_ROOT) -> set[Path]:
    """Source files of ``module`` and of every repository module it imports, transitively."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:  # a name imported from a package, not a module of its own
            continue
        files.add(path)
        todo.extend(_imports(path, name) - seen)
    return files


def _covered(path: Path, deps: Iterable[Path]) -> bool:
    return any(path == d or d in path.parents for d in deps)


def missing_deps(dvc_yaml: str | Path, root: Path = REPO_ROOT) -> dict[str, list[str]]:
    """``{stage: [repo-relative files its cmd imports but its deps do not cover]}``."""
    dvc_yaml = Path(dvc_yaml)
    spec = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
    out: dict[str, list[str]] = {}
    for stage, body in (spec.get("stages") or {}).items():
        if "foreach" in body or "matrix" in body:
            body = body.get("do", body)
        wdir = (dvc_yaml.parent / body.get("wdir", ".")).resolve()
        modules = _CMD_MODULE.findall(str(body.get("cmd", "")))
        if not modules:
            continue
        deps = [
            (wdir / (next(iter(d)) if isinstance(d, dict) else d)).resolve()
            for d in body.get("deps", [])
        ]
        needed = set().union(*(static_closure(m, root) for m in modules))
        missing = sorted(p.relative_to(root).as_posix() for p in needed if not _covered(p, deps))
        if missing:
            out[stage] = missing
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m core.engine.deps [dvc.yaml ...]`` (default: every dvc.yaml of the repository);
    prints each stage whose deps miss code it runs, exit status 1 if any."""
    parser = argparse.ArgumentParser(
        prog="python -m core.engine.deps",
        description="Check that each DVC stage's deps cover its entry point's import graph.",
    )
    parser.add_argument("pipelines", nargs="*", help="dvc.yaml files (default: all)")
    paths = parser.parse_args(argv).pipelines or [
        str(p.relative_to(REPO_ROOT))
        for p in sorted(REPO_ROOT.glob("**/dvc.yaml"))
        if ".venv" not in p.parts and ".dvc" not in p.parts
    ]
    bad = 0
    for path in paths:
        for stage, files in missing_deps(REPO_ROOT / path).items():
            bad += 1
            print(f"{path}: stage {stage} runs code its deps miss: {', '.join(files)}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
