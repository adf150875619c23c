"""A throwaway package of "repository code" for the run-identity tests.

``probe_repo(tmp_path, monkeypatch)`` writes ``probe_pkg/{__init__,model,unused}.py`` under
``tmp_path``, makes ``tmp_path`` the repository root seen by :mod:`core.engine.identity` (with
``probe_pkg`` as its only package) and returns a handle to edit and re-import the modules.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from core.engine import identity

MODEL = """
import torch
import lightning as L


def f(x):
    return x + 1


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 2)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
"""


class ProbeRepo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pkg = root / "probe_pkg"
        self.pkg.mkdir()
        (self.pkg / "__init__.py").write_text("")
        (self.pkg / "model.py").write_text(MODEL)
        (self.pkg / "unused.py").write_text("def g():\n    return 0\n")

    def edit(self, name: str, text: str) -> None:
        """Append ``text`` to ``probe_pkg/<name>.py`` (a new mtime even on coarse clocks)."""
        path = self.pkg / f"{name}.py"
        time.sleep(0.01)
        path.write_text(path.read_text() + text)

    def model(self):
        """``probe_pkg.model``, (re)imported from its current source."""
        importlib.invalidate_caches()
        if "probe_pkg.model" in sys.modules:
            return importlib.reload(sys.modules["probe_pkg.model"])
        return importlib.import_module("probe_pkg.model")


def probe_repo(tmp_path: Path, monkeypatch) -> ProbeRepo:
    repo = ProbeRepo(tmp_path)
    monkeypatch.setattr(identity, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(identity, "PACKAGES", ("probe_pkg",))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "probe_pkg" or m.startswith("probe_pkg.")]:
        monkeypatch.delitem(sys.modules, name)
    return repo
