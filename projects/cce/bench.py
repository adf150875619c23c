"""Stage cce-bench: loss+grad memory and time of linear cross-entropy implementations.

Runs ``python -m kernels.cce.benchmark`` with the sizes in ``params.bench`` (N tokens, vocabulary
V, hidden D, a V sweep), writing ``results.json``, ``results.md`` and ``memory_time_vs_v.png``
into ``bench.out``. The benchmark itself lives with the kernel (kernels/cce/benchmark.py).
"""

from __future__ import annotations

import subprocess
import sys

from core.engine.config import entry_parser, parse_entry
from projects.cce import DEFAULT_PARAMS


def bench_command(cfg: dict) -> list[str]:
    """The ``kernels.cce.benchmark`` command line for a ``bench:`` params block."""
    cmd = [sys.executable, "-m", "kernels.cce.benchmark", "--out", str(cfg["out"])]
    for key in ("n", "v", "d", "repeats", "rounds"):
        if key in cfg:
            cmd += [f"--{key}", str(cfg[key])]
    if cfg.get("sweep"):
        cmd += ["--sweep", ",".join(str(v) for v in cfg["sweep"])]
    if cfg.get("methods"):
        cmd += ["--methods", ",".join(cfg["methods"])]
    return cmd


def main(argv: list[str] | None = None) -> None:
    _, params, _ = parse_entry(entry_parser(__doc__.splitlines()[0], DEFAULT_PARAMS), argv)
    cmd = bench_command(params["bench"])
    print("bench:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
