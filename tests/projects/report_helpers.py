"""Shared test helpers for the projects' pipelines: tiny token corpora and the check that a
report stage regenerates its committed README section and result files byte for byte."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from core.utils.show_results import results_sections

ROOT = Path(__file__).resolve().parents[2]


def random_token_data(tmp_path: Path, vocab: int = 67) -> Path:
    """``tmp_path/data`` with train (2000) and val (500) uint16 token arrays, seeded."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 2000), ("val", 500)):
        np.save(data / f"{split}.npy", rng.integers(0, vocab, n).astype(np.uint16))
    return data


def assert_report_regenerates(
    tmp_path: Path,
    project: Path,
    params: dict,
    build: Callable[[dict, Path], object],
    names: Iterable[str],
) -> None:
    """Run ``build(params, readme)`` on a copy of the committed results in ``tmp_path`` and
    assert the README results section and each file in ``names`` equal the committed ones."""
    results = ROOT / params["paths"]["results"]
    shutil.copytree(results, tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:start -->\n<!-- results:end -->\n")
    params["paths"]["results"] = str(tmp_path / "results")
    build(params, readme)
    committed = (project / "README.md").read_text(encoding="utf-8")
    assert results_sections(readme.read_text()) == results_sections(committed)[:1]
    for name in names:
        assert (tmp_path / "results" / name).read_bytes() == (results / name).read_bytes(), name
