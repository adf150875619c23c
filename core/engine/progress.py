"""Progress of a multi-run stage: ``[stage 12/126] name detail (3.1 s) · ETA 4 min 10 s``."""

from __future__ import annotations

import time

from core.engine.dist import is_global_zero

__all__ = ["RunProgress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s`` or ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class RunProgress:
    """Counts finished runs of a stage and prints one line each, with an ETA.

    The ETA divides the time spent so far by the runs actually computed (cached runs cost
    nothing), times the runs left, over ``workers`` parallel processes already folded in.
    """

    def __init__(self, total: int, label: str = "") -> None:
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.total, self.label = total, label
        self.done = self.computed = 0
        self._t0 = time.perf_counter()

    def eta(self) -> float | None:
        """Seconds left, or None before the first computed run."""
        if self.computed == 0:
            return None
        elapsed = time.perf_counter() - self._t0
        return elapsed / self.computed * (self.total - self.done)

    def update(self, name: str, detail: str = "", *, cached: bool = False) -> str:
        """Record one finished run and print (and return) its line (printed on global rank 0
        only: every rank of a distributed stage walks the same runs)."""
        self.done += 1
        self.computed += not cached
        eta = self.eta()
        tail = "cached" if cached else ""
        if self.done < self.total and eta is not None:
            tail += (" · " if tail else "") + f"ETA {format_seconds(eta)}"
        head = (
            f"[{self.label} {self.done}/{self.total}]"
            if self.label
            else f"[{self.done}/{self.total}]"
        )
        line = " ".join(x for x in (head, name, detail) if x) + (f" ({tail})" if tail else "")
        if is_global_zero():
            print(line, flush=True)
        return line
