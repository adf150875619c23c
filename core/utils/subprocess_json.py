"""Run a worker command in a fresh process and read its result: the last stdout line, as JSON.

Benchmarks measure each method in its own process (clean peak RSS, no warm caches from the
previous method); this is their shared launcher.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

__all__ = ["run_json"]


def run_json(cmd: list[str], context: dict[str, Any]) -> dict[str, Any]:
    """``context`` updated with the JSON object the command prints last on stdout.

    A non-zero exit gives ``context`` plus ``"error"``: the last stderr line (300 characters at
    most), so one failing method becomes a row that says why instead of ending the sweep.
    """
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {**context, "error": err[:300]}
    return {**context, **json.loads(proc.stdout.strip().splitlines()[-1])}
