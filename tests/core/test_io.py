import json

import pytest

from core.utils.io import atomic_open, atomic_write_json, replace_marked_section
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
