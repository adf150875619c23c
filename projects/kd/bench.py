"""Stage kd-bench: time and peak memory of the fused linear KD loss against the materialised one.

Runs ``python -m kernels.kd.benchmark`` with the sizes and divergences in ``params.bench``
(N tokens, vocabulary V, hidden D), writing ``results.json`` and ``results.md`` into
``bench.out``; the report stage puts the table into projects/kd/README.md. The benchmark itself
lives with the kernel (kernels/kd/benchmark.py). ``make bench PROJECT=kd`` runs this stage.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import yaml

from projects.kd import DEFAULT_PARAMS


def bench_command(cfg: dict) -> list[str]:
    """The ``kernels.kd.benchmark`` command line for a ``bench:`` params block."""
    cmd = [sys.executable, "-m", "kernels.kd.benchmark", "--out", str(cfg["out"])]
    for key in ("n", "v", "d", "repeats", "temperature", "threads"):
        if key in cfg:
            cmd += [f"--{key}", str(cfg[key])]
    return cmd + ["--divergences", ",".join(cfg["divergences"])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params YAML file")
    args = parser.parse_args(argv)
    with open(args.params, encoding="utf-8") as f:
        cmd = bench_command(yaml.safe_load(f)["bench"])
    print("kd-bench:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
