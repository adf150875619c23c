"""Markdown tables and number formats for the generated README sections."""

from __future__ import annotations

import math
from collections.abc import Sequence

from core.report.stats import MeanStd

__all__ = ["fmt", "fmt_mean_std", "markdown_table"]


def fmt(x: float | None, digits: int = 2, scale: float = 1.0) -> str:
    """``x * scale`` with ``digits`` decimals; ``—`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x * scale:.{digits}f}"


def fmt_mean_std(m: MeanStd, digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` (sample std) scaled; the mean alone for one value."""
    if m.n < 2:
        return fmt(m.mean, digits, scale)
    return f"{fmt(m.mean, digits, scale)} ± {fmt(m.std, digits, scale)}"


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None
) -> str:
    """A Markdown table; ``align`` one letter per column (``l``/``r``/``c``), default: the
    first column left, the others right."""
    ncol = len(header)
    align = align or "l" + "r" * (ncol - 1)
    if len(align) != ncol or any(r and len(r) != ncol for r in rows):
        raise ValueError(f"every row and align need {ncol} columns")
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(map(str, header)) + " |",
        "|" + "|".join(rule[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
