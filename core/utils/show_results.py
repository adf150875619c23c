"""Print the generated results sections of a project README (``make reproduce`` ends with it).

Usage: ``python -m core.utils.show_results projects/<p>/README.md``
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def results_sections(text: str) -> list[str]:
    """Bodies of every ``<!-- X:start --> ... <!-- X:end -->`` block, in order."""
    return [
        m.group(2).strip()
        for m in re.finditer(r"<!-- (\S+):start -->\n(.*?)<!-- \1:end -->", text, re.S)
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m core.utils.show_results README.md", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.exists():
        print(f"error: {path} does not exist: did the report stage run?", file=sys.stderr)
        return 1
    sections = results_sections(path.read_text(encoding="utf-8"))
    if not sections:
        print(f"error: {path} has no generated results section", file=sys.stderr)
        return 1
    print(f"\n== results from {path} ==\n")
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
