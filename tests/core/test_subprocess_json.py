"""core.utils.subprocess_json: a worker's last JSON line, or its last error line."""

import sys

from core.utils.subprocess_json import run_json


def test_last_stdout_line_is_merged_over_the_context():
    code = 'print(\'warming up\'); print(\'{"t": 1.5, "m": "x"}\')'
    out = run_json([sys.executable, "-c", code], {"m": "ctx", "v": 3})
    assert out == {"m": "x", "v": 3, "t": 1.5}


def test_failure_gives_the_last_stderr_line_capped():
    code = "import sys; print('noise', file=sys.stderr); sys.exit('boom ' + 'y' * 400)"
    out = run_json([sys.executable, "-c", code], {"m": "a"})
    assert out["m"] == "a" and out["error"].startswith("boom y") and len(out["error"]) == 300
    assert run_json([sys.executable, "-c", "import sys; sys.exit(3)"], {})["error"] == "no output"
