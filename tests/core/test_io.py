import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from core.utils.io import (
    atomic_dir,
    atomic_open,
    atomic_write_json,
    load_npy,
    remove_stale_temps,
    replace_marked_section,
)
from core.utils.show_results import results_sections


def test_atomic_open_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_atomic_write_json_is_sorted_and_complete(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1} and text.index('"a"') < text.index('"b"')


def test_replace_marked_section_keeps_prose(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# P\n\nprose\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\ntail\n")
    replace_marked_section(readme, "results", "| a |\n|---|\n| 1 |")
    text = readme.read_text()
    assert "prose" in text and "tail" in text and "old" not in text
    assert results_sections(text) == ["| a |\n|---|\n| 1 |"]
    replace_marked_section(readme, "bench", "B")  # missing markers are appended
    assert results_sections(readme.read_text()) == ["| a |\n|---|\n| 1 |", "B"]


# ---- issue 15 item 14: file modes, stale temporaries, directories committed as a unit ----


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_open_uses_the_umask_default_for_new_files(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_json(tmp_path / "new.json", {})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new.json") == 0o640  # mkstemp made every output 0600


def test_atomic_open_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- r:start -->\n<!-- r:end -->\n")
    readme.chmod(0o664)
    replace_marked_section(readme, "r", "table")
    assert _mode(readme) == 0o664 and "table" in readme.read_text()
    script = tmp_path / "run.sh"
    script.write_text("old")
    script.chmod(0o755)
    with atomic_open(script) as f:
        f.write("new")
    assert _mode(script) == 0o755


def test_atomic_open_refuses_read_and_append_modes(tmp_path):
    for mode in ("r", "a", "rb"):
        with (
            pytest.raises(ValueError, match="mode must be a write mode"),
            atomic_open(tmp_path / "x", mode),
        ):
            pass


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writer_leaves_a_temp_that_the_next_write_removes(tmp_path):
    out = tmp_path / "metrics.json"
    code = (
        "import os, signal, sys\n"
        "from core.utils.io import atomic_open\n"
        "with atomic_open(sys.argv[1]) as f:\n"
        "    f.write('half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], check=False)
    assert proc.returncode == -signal.SIGKILL
    (leftover,) = (p.name for p in tmp_path.iterdir())
    assert leftover.startswith(".metrics.json.") and leftover.endswith(".tmp")
    atomic_write_json(out, {"a": 1})  # the next write of the same name cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_remove_stale_temps_spares_live_writers_and_other_files(tmp_path):
    target = tmp_path / "a.json"
    dead = tmp_path / f".a.json.{_dead_pid()}.x1.tmp"
    live = tmp_path / f".a.json.{os.getppid()}.x2.tmp"  # the parent process runs
    legacy = tmp_path / ".a.json.k3j2l1.tmp"  # old mkstemp name: no PID, left alone
    other = tmp_path / f".b.json.{_dead_pid()}.x4.tmp"
    stale_dir = tmp_path / f".a.json.{_dead_pid()}.x5.tmp"
    for p in (dead, live, legacy, other):
        p.write_text("")
    stale_dir.mkdir()
    (stale_dir / "train.jsonl").write_text("")
    assert sorted(p.name for p in remove_stale_temps(target)) == sorted([dead.name, stale_dir.name])
    assert live.exists() and legacy.exists() and other.exists()


def _write(directory, **files):
    for name, text in files.items():
        (directory / name).write_text(text)


def test_atomic_dir_swaps_every_file_at_once(tmp_path):
    out = tmp_path / "processed"
    with atomic_dir(out) as d:
        _write(d, **{"a.txt": "1", "b.txt": "1"})
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "1", "b.txt": "1"}
    with atomic_dir(out) as d:
        _write(d, **{"a.txt": "2"})
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a.txt": "2"}  # b.txt gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]
    assert _mode(out) == 0o777 & ~_current_umask()


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_dir_keeps_the_old_directory_when_the_build_or_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "processed"
    out.mkdir()
    _write(out, **{"train.jsonl": "old", "test.jsonl": "old", "manifest.json": "old"})
    with pytest.raises(RuntimeError), atomic_dir(out) as d:
        _write(d, **{"train.jsonl": "new"})
        raise RuntimeError("killed while writing")
    assert {p.read_text() for p in out.iterdir()} == {"old"}

    real_replace, calls = os.replace, []

    def fail_second(src, dst):  # the old dir moves aside, the new one fails to move in
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"), atomic_dir(out) as d:
        _write(d, **{"train.jsonl": "new", "test.jsonl": "new", "manifest.json": "new"})
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.jsonl", "train.jsonl"]
    assert {p.read_text() for p in out.iterdir()} == {"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_load_npy_names_truncated_and_missing_files(tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(1000, dtype=np.int64))
    np.testing.assert_array_equal(load_npy(path, mmap_mode="r"), np.arange(1000))
    path.write_bytes(path.read_bytes()[:-100])
    for mmap_mode in (None, "r"):
        with pytest.raises(ValueError, match=r"ids.npy is truncated or not a .npy array.*rebuild"):
            load_npy(path, mmap_mode=mmap_mode, remedy="rebuild it")
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(ValueError, match="not a .npy array"):
        load_npy(tmp_path / "text.npy")
    with pytest.raises(FileNotFoundError, match="nope.npy missing: rebuild"):
        load_npy(tmp_path / "nope.npy", remedy="rebuild")
