"""core.utils.runs: per-run result files reused only for an identical config."""

import json

from core.utils.runs import cached_run, load_cached, store_run


def test_cached_run_reuses_a_result_only_for_the_same_config(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"metrics": {"accuracy": len(calls)}}

    path = tmp_path / "sub" / "run.json"
    first = cached_run(path, {"a": 1}, fn)
    again = cached_run(path, {"a": 1}, fn)
    assert not first["cached"] and again["cached"] and len(calls) == 1
    assert again["metrics"] == first["metrics"] and first["wall_s"] >= 0 and "cpu_s" in first
    changed = cached_run(path, {"a": 2}, fn)
    assert not changed["cached"] and changed["metrics"]["accuracy"] == 2
    stored = json.loads(path.read_text())
    assert stored["config"] == {"a": 2} and "cached" not in stored


def test_load_cached_needs_equal_config_required_files_and_valid_json(tmp_path):
    path, curve = tmp_path / "r.json", tmp_path / "r.csv"
    assert load_cached(path, {"a": 1}) is None
    store_run(path, {"a": 1, "b": [1, 2]}, {"loss": 0.5})
    assert load_cached(path, {"a": 1, "b": [1, 2]}) == {
        "config": {"a": 1, "b": [1, 2]},
        "loss": 0.5,
    }
    assert load_cached(path, {"a": 1, "b": [1, 3]}) is None
    assert load_cached(path, {"a": 1, "b": [1, 2]}, requires=[curve]) is None
    curve.write_text("step,val\n")
    assert load_cached(path, {"a": 1, "b": [1, 2]}, requires=[curve]) is not None
    path.write_text('{"config": {"a": 1')  # a torn write from another tool: treated as absent
    assert load_cached(path, {"a": 1}) is None


def test_load_cached_treats_every_unreadable_file_as_absent(tmp_path):
    # issue 15 item 15: non-UTF-8 and non-dict JSON raised although the docstring says absent
    path = tmp_path / "r.json"
    for content in (b"\xff\xfe\x00garbage", b"[1, 2]", b"null", b'"config"', b"3"):
        path.write_bytes(content)
        assert load_cached(path, {"a": 1}) is None
    path.unlink()
    path.mkdir()  # a directory where the file should be
    assert load_cached(path, {"a": 1}) is None
