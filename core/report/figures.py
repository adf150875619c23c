"""Matplotlib figures for report stages: headless backend, saved atomically, closed after."""

from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from core.utils.io import atomic_write_bytes  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Write ``fig`` as PNG to ``path`` through a temp file and close it (PNG metadata
    without a timestamp, so an unchanged figure rewrites identical bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
