"""The chunking core's CPU work buffers (``kernels.chunking.workspace``): backed by transparent
huge pages where the OS offers them, same contents and no extra resident memory; and the shared
row arithmetic (``row_indices``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from kernels import chunking

CPU = torch.device("cpu")


def _vma_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping holding ``addr`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m[1], 16) <= addr < int(m[2], 16)
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


needs_thp = pytest.mark.skipif(
    chunking._madvise() is None, reason="transparent huge pages are not offered here"
)


@needs_thp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_big_buffer_is_aligned_and_marked_for_huge_pages(monkeypatch, dtype):
    """A buffer of >= HUGE_MIN_BYTES starts on a 2 MiB boundary and its mapping carries the
    kernel's "hg" (MADV_HUGEPAGE) flag; it behaves like torch.empty of its shape and dtype."""
    monkeypatch.delenv(chunking.HUGE_PAGES_ENV, raising=False)
    shape = (5, chunking.HUGE_MIN_BYTES // 4 + 333)
    w = chunking.workspace(shape, dtype, CPU)
    assert w.shape == shape and w.dtype == dtype and w.is_contiguous()
    assert w.data_ptr() % chunking.HUGE_PAGE == 0
    assert "hg" in _vma_flags(w.data_ptr())
    w.copy_(torch.arange(w.numel(), dtype=torch.float32).view(shape))
    assert torch.equal(w, torch.arange(w.numel(), dtype=torch.float32).view(shape).to(dtype))


@needs_thp
def test_small_buffers_and_the_switch_give_plain_tensors(monkeypatch):
    """Below HUGE_MIN_BYTES, or with KERNELS_CPU_HUGE_PAGES=0, a plain torch.empty (its storage
    exactly its size); another value of the switch is refused by name."""
    small = chunking.workspace((16, 1024), torch.float32, CPU)
    assert small.untyped_storage().nbytes() == 16 * 1024 * 4
    monkeypatch.setenv(chunking.HUGE_PAGES_ENV, "0")
    off = chunking.workspace((chunking.HUGE_MIN_BYTES,), torch.uint8, CPU)
    assert off.untyped_storage().nbytes() == chunking.HUGE_MIN_BYTES
    monkeypatch.setenv(chunking.HUGE_PAGES_ENV, "yes")
    with pytest.raises(ValueError, match="KERNELS_CPU_HUGE_PAGES must be '0' or '1'"):
        chunking.workspace((chunking.HUGE_MIN_BYTES,), torch.uint8, CPU)


RSS_SCRIPT = """
import ctypes, sys, torch
from kernels import chunking
ctypes.CDLL(None).mallopt(-3, 1 << 20)  # every allocation of 1 MiB or more by mmap (fresh pages)
def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) * 1024
nbytes = int(sys.argv[1])
warm = chunking.workspace((nbytes,), torch.uint8, torch.device("cpu")).fill_(1)  # first-call costs
del warm
before = rss()
w = chunking.workspace((nbytes,), torch.uint8, torch.device("cpu"))
w.fill_(1)
print(rss() - before)
"""


@needs_thp
@pytest.mark.parametrize("huge", ["1", "0"])
def test_huge_pages_add_no_resident_memory(huge):
    """Touching a workspace in a fresh process raises the resident set by its own size, with or
    without huge pages (whole 2 MiB pages for the aligned part, 4 KiB pages for the ragged tail),
    not by the 2 MiB of slack around it."""
    nbytes = 6 * chunking.HUGE_PAGE + 12345
    env = {**os.environ, chunking.HUGE_PAGES_ENV: huge}
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(nbytes)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    grown = int(out.stdout.split()[-1])
    assert nbytes - (64 << 10) <= grown <= nbytes + (64 << 10), grown


def test_workspace_off_cpu_is_plain_empty():
    """Other devices get torch.empty (the meta device stands in for CUDA here)."""
    w = chunking.workspace((chunking.HUGE_MIN_BYTES,), torch.float32, torch.device("meta"))
    assert w.device.type == "meta" and w.shape == (chunking.HUGE_MIN_BYTES,)


@pytest.mark.parametrize("rows", [slice(7, 19), torch.tensor([3, 5, 8, 13, 21, 34])])
def test_row_indices(rows):
    """Positions of a chunk map to row numbers of the N rows, for slices and index rows."""
    idx = torch.tensor([0, 2, 5])
    full = torch.arange(100)[rows]
    assert torch.equal(chunking.row_indices(rows, idx), full[idx])
