"""core.engine.identity / cache: a result is reused only under the same run identity.

The issue's proof: editing a function that a run uses recomputes that run; editing code it never
imported, or changing threads / workers (machine knobs), recomputes nothing; a changed config or
input file recomputes.
"""

import json

import pytest

from core.engine.cache import cached_run, load_cached
from core.engine.identity import (
    CodeChangedError,
    RunIdentity,
    code_digests,
    data_digests,
    run_config,
)
from tests.core.engine_probe import probe_repo

PARAMS = {"seed": 0, "model": {"width": 8}, "machine": {"threads": 1, "workers": 2}}


def _runner(repo, calls):
    def fn():
        calls.append(1)
        return {"value": repo.model().f(1)}

    return fn


def test_identity_records_the_imported_repository_modules_only(tmp_path, monkeypatch):
    repo = probe_repo(tmp_path, monkeypatch)
    repo.model()
    code = code_digests()
    assert set(code) == {"probe_pkg/__init__.py", "probe_pkg/model.py"}  # not unused.py


def test_editing_a_used_function_recomputes_the_run(tmp_path, monkeypatch):
    repo, calls = probe_repo(tmp_path, monkeypatch), []
    path, cfg, data = tmp_path / "runs" / "a.json", run_config(PARAMS), []
    first = cached_run(path, cfg, _runner(repo, calls), data)
    again = cached_run(path, cfg, _runner(repo, calls), data)
    assert (first["cached"], again["cached"], len(calls)) == (False, True, 1)
    repo.edit("model", "\n\ndef f(x):\n    return x + 2\n")  # the function the run used
    changed = cached_run(path, cfg, _runner(repo, calls), data)
    assert not changed["cached"] and changed["value"] == 3 and len(calls) == 2


def test_machine_knobs_and_unimported_code_recompute_nothing(tmp_path, monkeypatch):
    repo, calls = probe_repo(tmp_path, monkeypatch), []
    path = tmp_path / "runs" / "a.json"
    cached_run(path, run_config(PARAMS), _runner(repo, calls))
    knobs = {**PARAMS, "machine": {"threads": 2, "workers": 1}}
    repo.edit("unused", "\n# an edit to a module the run never imported\n")
    again = cached_run(path, run_config(knobs), _runner(repo, calls))
    assert again["cached"] and len(calls) == 1


def test_config_and_data_changes_recompute(tmp_path, monkeypatch):
    repo, calls = probe_repo(tmp_path, monkeypatch), []
    path, data = tmp_path / "runs" / "a.json", tmp_path / "data"
    data.mkdir()
    (data / "x.bin").write_bytes(b"\x00\x01")
    cached_run(path, run_config(PARAMS), _runner(repo, calls), [data])
    other = {**PARAMS, "model": {"width": 16}}
    assert not cached_run(path, run_config(other), _runner(repo, calls), [data])["cached"]
    (data / "x.bin").write_bytes(b"\x00\x02")
    assert not cached_run(path, run_config(other), _runner(repo, calls), [data])["cached"]
    assert cached_run(path, run_config(other), _runner(repo, calls), [data])["cached"]
    assert len(calls) == 3


def test_changes_say_why(tmp_path, monkeypatch):
    repo = probe_repo(tmp_path, monkeypatch)
    repo.model()
    (tmp_path / "d.txt").write_text("a")
    ident = RunIdentity.seal({"a": 1}, [tmp_path / "d.txt"])
    assert ident.changes({"a": 1}, [tmp_path / "d.txt"]) == []
    repo.edit("model", "\n# edited\n")
    (tmp_path / "d.txt").write_text("b")
    reasons = ident.changes({"a": 2}, [tmp_path / "d.txt"])
    assert reasons[0] == "config changed"
    assert reasons[1].startswith("data changed") and "d.txt" in reasons[1]
    assert reasons[2] == "code changed: probe_pkg/model.py"
    assert "does not exist" in ident.changes({"a": 1}, [tmp_path / "gone"])[-1]
    assert RunIdentity.from_dict(ident.as_dict()).key == ident.key


def test_unreadable_result_files_count_as_absent(tmp_path):
    for i, content in enumerate([b"\xff\xfe", b"[1, 2]", b'{"identity": 3}', b"{"]):
        path = tmp_path / f"r{i}.json"
        path.write_bytes(content)
        assert load_cached(path, {"a": 1}) is None


def test_stored_record_and_missing_inputs(tmp_path):
    path = tmp_path / "r.json"
    rec = cached_run(path, {"a": 1}, lambda: {"m": 1.0})
    stored = json.loads(path.read_text())
    assert stored["identity"]["config"] == {"a": 1} and "cached" not in stored
    assert rec["wall_s"] >= 0 and "cpu_s" in rec
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_digests([tmp_path / "missing"])
    assert load_cached(path, {"a": 1}, requires=[tmp_path / "curve.csv"]) is None


def test_core_losses_loads_no_fused_kernel_until_one_is_called():
    """A run that never calls a fused loss is not tied to the kernels' code: importing
    core.losses loads only kernels.vocab_parallel (the divergences' row reductions); the first
    fused call loads the rest."""
    import subprocess
    import sys

    code = (
        "import sys, torch, core.losses as L\n"
        "k = lambda: sorted(m for m in sys.modules if m.startswith('kernels.'))\n"
        "print(k())\n"
        "L.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))\n"
        "print(k())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = out.stdout.strip().splitlines()
    assert before == "['kernels.vocab_parallel']"
    assert "'kernels.cce.api'" in after and "'kernels.chunking'" in after


def test_a_module_edited_during_the_run_is_not_sealed(tmp_path, monkeypatch):
    """An edit to a module the run imported, made while it runs, refuses the result (it would be
    stored under code it did not run); the next call runs the new code and stores it."""
    repo, calls = probe_repo(tmp_path, monkeypatch), []
    path, cfg = tmp_path / "runs" / "a.json", run_config(PARAMS)
    repo.model()

    def edits_midway():
        calls.append(1)
        repo.edit("model", "\n# edited while a run used me\n")
        return {"value": 1}

    with pytest.raises(CodeChangedError, match="probe_pkg/model.py changed on disk"):
        cached_run(path, cfg, edits_midway)
    assert not path.exists()
    again = cached_run(path, cfg, _runner(repo, calls))
    assert not again["cached"] and len(calls) == 2 and path.exists()
