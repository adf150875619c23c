"""Run a params variant of a project as a DVC experiment: ``make exp PROJECT=p VARIANT=v``.

A variant is ``projects/<p>/variants/<v>.yaml``: dotted params keys -> values, results paths
included, so its outputs land beside (never over) the default results. This module turns it into
``dvc exp run --temp -n <p>-<v> -S projects/<p>/params.yaml:<key>=<value> ...
projects/<p>/dvc.yaml``: the run happens in a temporary copy of the workspace, and ``dvc exp
show`` / ``dvc exp apply`` compare or bring back its results.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from core.engine.config import apply_overrides, load_variant
from core.engine.identity import REPO_ROOT

__all__ = ["exp_command"]


def exp_command(project: str, variant: str, *extra: str) -> list[str]:
    """The ``dvc exp run`` command line for ``variant`` of ``project`` (checked against the
    project's params: every key must exist)."""
    import yaml

    params_path = REPO_ROOT / "projects" / project / "params.yaml"
    if not params_path.is_file():
        raise ValueError(f"project {project!r} has no {params_path}")
    overlay = load_variant(params_path, variant)
    apply_overrides(yaml.safe_load(params_path.read_text(encoding="utf-8")), overlay)
    rel = params_path.relative_to(REPO_ROOT).as_posix()
    sets = []
    for key, value in overlay.items():
        sets += ["-S", f"{rel}:{key}={json.dumps(value, separators=(',', ':'))}"]
    return [
        "dvc", "exp", "run", "--temp", "-n", f"{project}-{variant}", *sets, *extra,
        f"projects/{project}/dvc.yaml",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("project")
    parser.add_argument("variant")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")
    args, extra = parser.parse_known_args(argv)
    try:
        cmd = exp_command(args.project, args.variant, *extra)
    except ValueError as e:
        parser.error(str(e))
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return subprocess.call(cmd, cwd=Path(REPO_ROOT))


if __name__ == "__main__":
    sys.exit(main())
