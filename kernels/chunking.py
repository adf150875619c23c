"""One chunking core for the fused linear losses (Cut Cross-Entropy, fused KD): the CPU path.

A fused loss maps hidden states e (N, D) and a head c (V, D) (+ bias (V,)) to per-row values
without the (N, V) logits: the valid rows go in chunks whose logits z = e_k c^T + b live in a
reused (chunk, V) buffer. This module owns everything but the per-chunk maths (Liger-Kernel's
chunked-loss base class is the model): the accumulation dtype, the chunk size from
``memory_target``, the valid rows (``ignore_index``), the GEMMs into and out of the chunk, the
reduction and the autograd Function. For a scalar loss ("mean"/"sum") the gradients are computed
during the forward and backward only scales them (6 N V D flops in all); per-row outputs
("none", extra outputs such as CCE's LSE) get values in the forward (2 N V D) and gradients in a
backward that recomputes each chunk with the per-row output gradients (6 N V D). A loss
subclasses ``ChunkLoss`` and writes only ``chunk``. Memory O(chunk x V + N x D + V x D).
Vocabulary parallelism (``ChunkLoss.vocab``, see ``kernels.vocab_parallel``): c is this rank's
shard of the vocabulary rows; the chunk maths combine their row statistics over the group, this
core sizes the chunks alike on every rank and all-reduces dE; dC stays local.
fp16/bf16 on CPU (``half_path``): where the CPU has matrix instructions for the dtype the
native half path runs the GEMMs in the input dtype and the chunk maths in fp32 on small
sub-blocks (``_sweep_half``), with dE and dC summed in fp32 and no fp32 copies of e or c; elsewhere
(and for vocabulary shards) the inputs are upcast to fp32 once (the upcast path).

Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", arXiv:2411.09009;
Hsu et al. 2024, "Liger Kernel", arXiv:2410.10989 (its fused-linear chunked-loss base class).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import numbers
import os

import torch
from torch.autograd.function import once_differentiable

REDUCTIONS = ("mean", "sum", "none")
# Peak memory above the inputs may reach memory_target x the gradient buffers ((N + V) x D
# accumulators); the chunk's (chunk, V) buffers get what is left after a safety margin, but at
# least 8 MiB (GEMM efficiency at small V, where the absolute memory is small anyway).
MEMORY_TARGET = 1.25
SAFETY_BYTES = 2 << 20
MIN_CHUNK_BUDGET_BYTES = 8 << 20
# Native half path (bf16/fp16 on CPUs with half matrix instructions): the chunk's logits stay in
# the input dtype and go through the fp32 maths SUB_ROWS rows at a time in a small (s, V) fp32
# work buffer; dC accumulates in fp32 blocks of V_BLOCK vocabulary rows.
SUB_ROWS = 16
V_BLOCK = 4096
DE_ROW_BYTES = 2 + 4 + 4  # per chunk row and D column: dE's half GEMM block, its fp32 copy and sum
HALF_PATH_ENV = "KERNELS_CPU_HALF_PATH"  # "upcast" | "native": overrides the capability check
HALF_PATHS = ("upcast", "native")
HALF_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}
# CPU work buffers of at least HUGE_MIN_BYTES are backed by 2 MiB transparent huge pages where
# the kernel offers them (``workspace``): a fresh buffer is faulted in page by page on every call
# (glibc maps allocations above its mmap threshold anew each time), and 4 KiB faults cost about as
# much as the bf16 path's elementwise maths. KERNELS_CPU_HUGE_PAGES=0 turns this off.
HUGE_PAGE = 2 << 20
HUGE_MIN_BYTES = 2 * HUGE_PAGE
HUGE_PAGES_ENV = "KERNELS_CPU_HUGE_PAGES"
MADV_HUGEPAGE = 14  # <linux/mman.h>
_log = logging.getLogger(__name__)
_logged: set = set()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_half_path(dtype: torch.dtype) -> tuple[str, str]:
    """("native" | "upcast", reason) for fp16/bf16 inputs of the chunked path on CPU.

    native: GEMMs in the input dtype, fp32 softmax and dC accumulation; chosen where the CPU
    has matrix instructions for the dtype (bf16: avx512_bf16 / amx_bf16, fp16: avx512_fp16 /
    amx_fp16, with ATen's AVX512 kernels), else upcast (fp32 copies of the inputs, fp32 GEMMs).
    ``KERNELS_CPU_HALF_PATH=upcast|native`` overrides the check (tests, benchmarks).
    """
    env = os.environ.get(HALF_PATH_ENV, "")
    if env:
        if env not in HALF_PATHS:
            raise ValueError(f"{HALF_PATH_ENV} must be one of {HALF_PATHS} or unset, got {env!r}")
        return env, f"{HALF_PATH_ENV}={env}"
    flags = HALF_FLAGS.get(dtype)
    if flags is None:
        return "upcast", f"{dtype} is not a half-precision dtype"
    have = sorted(set(flags) & cpu_flags())
    if not have:
        return "upcast", f"the CPU has no {' / '.join(flags)} (half GEMMs would be emulated)"
    cap = torch.backends.cpu.get_cpu_capability()
    if not cap.startswith("AVX512"):
        return "upcast", f"ATen CPU capability {cap} (needs AVX512 kernels)"
    return "native", f"the CPU has {' / '.join(have)} (ATen capability {cap})"


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise where transparent huge pages can be requested (Linux with THP "always" or
    "madvise"), else None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def huge_pages_enabled() -> bool:
    """Whether ``workspace`` asks for huge pages: ``KERNELS_CPU_HUGE_PAGES`` "1" (default) or "0",
    and the OS offers them."""
    env = os.environ.get(HUGE_PAGES_ENV, "1")
    if env not in ("0", "1"):
        raise ValueError(f"{HUGE_PAGES_ENV} must be '0' or '1' or unset, got {env!r}")
    return env == "1" and _madvise() is not None


def workspace(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised work buffer (like torch.empty) that lives only inside a fused call.

    On CPU a buffer of at least HUGE_MIN_BYTES is carved 2 MiB-aligned out of a slightly larger
    allocation (+2 MiB of address space, never touched) and its whole 2 MiB pages are marked
    MADV_HUGEPAGE before first touch, so it is faulted in 2 MiB at a time (512 x fewer faults; the
    ragged tail keeps 4 KiB pages, so resident memory does not grow). Elsewhere, or when
    ``huge_pages_enabled`` says no, plain torch.empty. Not for tensors handed to the caller (their
    storage would be larger than they are).
    """
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < HUGE_MIN_BYTES or not huge_pages_enabled():
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    _madvise()(raw.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return raw[start : start + nbytes].view(dtype).view(shape)  # a failed madvise: 4 KiB pages


def half_path(e: torch.Tensor, c: torch.Tensor, bias, loss: ChunkLoss) -> tuple[str, str]:
    """The chunked path's choice for these inputs: "native" only for CPU fp16/bf16 e, c (and
    bias) of one dtype, no vocabulary shard, and ``cpu_half_path`` saying so; logged once per
    (dtype, choice)."""
    if e.device.type != "cpu" or e.dtype not in HALF_FLAGS:
        return "upcast", "not a CPU half-precision input"
    if c.dtype != e.dtype or (bias is not None and bias.dtype != e.dtype):
        path, why = "upcast", "mixed input dtypes"
    elif loss.vocab is not None:
        path, why = "upcast", "vocabulary-parallel calls (process_group) take the upcast path"
    else:
        path, why = cpu_half_path(e.dtype)
    if (e.dtype, path, why) not in _logged:
        _logged.add((e.dtype, path, why))
        _log.info("fused linear loss, %s on CPU: %s path (%s)", e.dtype, path, why)
    return path, why


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and returned-loss) dtype: fp64 for fp64 inputs, fp32 for fp32/bf16/fp16."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_budget(
    n: int, v: int, d: int, dtype: torch.dtype, memory_target: float = MEMORY_TARGET
) -> float:
    """Bytes the chunk's work buffers may take: (memory_target - 1) x the gradient buffers
    ((N + V) x D accumulators) minus a small margin, at least MIN_CHUNK_BUDGET_BYTES, so the
    peak above the inputs stays <= memory_target x the gradient buffers."""
    if not memory_target > 1.0:
        raise ValueError(f"memory_target must be > 1 (x the gradient buffers), got {memory_target}")
    grad_bytes = (n + v) * d * (torch.finfo(acc_dtype(dtype)).bits // 8)
    return max((memory_target - 1) * grad_bytes - SAFETY_BYTES, MIN_CHUNK_BUDGET_BYTES)


def pick_chunk_size(
    n: int,
    v: int,
    d: int,
    dtype: torch.dtype,
    n_buffers: int = 1,
    memory_target: float = MEMORY_TARGET,
) -> int:
    """Rows per chunk so that ``n_buffers`` (chunk, V) buffers of the accumulation dtype fit
    ``chunk_budget``. A larger target buys longer GEMMs (more rows per chunk): speed for memory.
    """
    item = torch.finfo(acc_dtype(dtype)).bits // 8
    return rows_within(chunk_budget(n, v, d, dtype, memory_target), n, v * item * n_buffers)


def rows_within(budget: float, n: int, row_bytes: int) -> int:
    """Chunk rows of ``row_bytes`` each that fit ``budget``: a multiple of 8 from 16 rows up,
    at least 1, at most n."""
    rows = int(budget // max(row_bytes, 1))
    rows = rows // 8 * 8 if rows >= 16 else max(rows, 1)
    return max(1, min(rows, n))


def native_plan(
    n: int, v: int, d: int, n_buffers: int, n_half_buffers: int, memory_target: float
) -> tuple[int, int, int]:
    """(chunk rows, sub_rows, v_block) of the native half path: its work buffers (``half_work``),
    ``n_half_buffers`` (chunk, V) 2-byte buffers and the (chunk, D) dE buffers (DE_ROW_BYTES a
    row and column, ``_HalfGrads``) inside ``chunk_budget``, and where the fp32
    path's chunk is bound by memory (fewer rows than n) inside what its ``n_buffers`` (chunk, V)
    fp32 buffers actually take (their rows rounded down to 8): so the native path never outgrows
    the fp32 path's peak."""
    budget = chunk_budget(n, v, d, torch.float32, memory_target)
    rows32 = rows_within(budget, n, v * 4 * n_buffers)
    if rows32 < n:
        budget = rows32 * v * 4 * n_buffers
    sub, v_block, work = half_work(v, d, n_buffers, budget)
    return rows_within(budget - work, n, v * 2 * n_half_buffers + DE_ROW_BYTES * d), sub, v_block


def half_work(v: int, d: int, n_buffers: int, budget: float) -> tuple[int, int, int]:
    """(sub_rows, v_block, bytes) of the native half path's fp32 work buffers: ``n_buffers``
    (sub_rows, V) sub-block buffers and a (v_block, D) dC staging block (half + fp32), as
    large as SUB_ROWS / V_BLOCK allow within half of ``budget`` (``chunk_budget``), so the
    chunk's half buffers keep the other half and the peak stays inside the fp32 path's budget
    even for divergences with many buffers (V_BLOCK shrinks to 1024 first, then the sub-block)."""

    def cost(sub: int, vb: int) -> int:
        return sub * v * 4 * n_buffers + min(vb, v) * d * 6

    sub, vb = SUB_ROWS, V_BLOCK
    while vb > 1024 and cost(sub, vb) > budget / 2:
        vb //= 2
    while sub > 1 and cost(sub, vb) > budget / 2:
        sub //= 2
    return sub, vb, cost(sub, vb)


def check_options(
    *, reduction: str, ignore_index: int, memory_target: float | None, impl: str, impls: tuple
) -> None:
    """The options every fused front door shares, checked the same way (ValueError/TypeError)."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not isinstance(impl, str) or impl not in impls:
        raise ValueError(f"impl must be one of {impls}, got {impl!r}")
    if memory_target is None:
        return
    if isinstance(memory_target, bool) or not isinstance(memory_target, numbers.Real):
        raise TypeError(f"memory_target must be None or a number > 1, got {memory_target!r}")
    if not 1.0 < memory_target < math.inf:
        raise ValueError(
            f"memory_target must be None or a finite number > 1 (x the gradient buffers), "
            f"got {memory_target!r}"
        )
    if impl not in ("auto", "chunked"):
        raise ValueError(
            f"memory_target sizes the chunked path's chunks; impl={impl!r} does not use it"
        )


def valid_rows(targets: torch.Tensor | None, n: int, ignore_index: int):
    """(indices (n_valid,) of the rows whose target is not ignore_index or None if all count,
    n_valid). ``targets`` (N,) int64 or None (every row counts)."""
    if targets is None:
        return None, n
    keep = targets != ignore_index
    n_valid = int(keep.sum())
    return (None, n) if n_valid == n else (keep.nonzero().squeeze(1), n_valid)


def first_order(backward):
    """``once_differentiable`` that also refuses ``create_graph=True``: a fused loss has no
    second derivative, and a gradient penalty built on its gradients would silently lose that
    term (once_differentiable alone raises only when the incoming gradient requires grad)."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():  # backward runs with grad enabled iff create_graph=True
            raise RuntimeError(
                "fused linear losses are differentiable once: double backward "
                "(create_graph=True, gradient penalties) is not supported"
            )
        return inner(ctx, *grads)

    return wrapper


def chunk_logits(e: torch.Tensor, w: torch.Tensor, bias, flat: torch.Tensor, transposed: bool):
    """Logits e (k, D) @ w (V, D)^T + bias (V,) of one chunk, (k, V), written into ``flat``
    (>= k V elements). ``transposed``: stored as a (V, k) block and returned as its transpose,
    the faster fp32 GEMM orientation for CCE on CPU (MKL, k 128, V 65536, D 512); KD's row-wise
    closed forms run faster on (k, V) rows."""
    k, v = e.shape[0], w.shape[0]
    if not transposed:
        out = flat[: k * v].view(k, v)
        return torch.mm(e, w.T, out=out) if bias is None else torch.addmm(bias, e, w.T, out=out)
    out = flat[: k * v].view(v, k)
    if bias is None:
        torch.mm(w, e.T, out=out)
    else:
        torch.addmm(bias[:, None], w, e.T, out=out)
    return out.T


class ChunkLoss:
    """The per-chunk maths of a fused linear loss; subclasses write ``chunk`` and set the sizes."""

    n_buffers: int = 1  # (chunk, V) acc-dtype buffers alive at a chunk's peak, logits included
    n_outputs: int = 1  # per-row outputs: the loss first, then extras (CCE: its LSE)
    transposed: bool = True  # the chunk's logits stored (V, k) (see chunk_logits)
    vocab = None  # a kernels.vocab_parallel.VocabShard when c is this rank's vocabulary shard
    native = False  # set by the core: True on the native half path (inputs kept in fp16/bf16)
    n_half_buffers: int = 1  # native half path: (chunk, V) input-dtype buffers (logits included)
    sub_rows: int = SUB_ROWS  # native half path: rows per fp32 sub-block (set by half_work)
    v_block: int = V_BLOCK  # native half path: vocabulary rows per dC staging block

    def chunk(self, z: torch.Tensor, rows: slice | torch.Tensor, w: tuple | None):
        """Per-row outputs of one chunk and, given output weights, the gradient w.r.t. z.

        z (k, V): the logits of rows ``rows`` (a slice, or (k,) indices into the N rows) in the
        accumulation dtype, free to overwrite. w: None (values only), or one (k,) tensor or
        None (= 0) per output: d objective / d output_i. Returns (outputs, g): a tuple of
        ``n_outputs`` (k,) tensors and g (k, V) = sum_o w_o d output_o / d z (may be z), or None.
        """
        raise NotImplementedError

    def begin_chunk(self, rows: slice | torch.Tensor) -> None:
        """Native half path: called once per chunk of ``rows`` before its sub-blocks go to
        ``chunk`` (KD computes its teacher's chunk logits here, in the input dtype)."""

    def upcast(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """An fp32 copy of x (m, V) in persistent buffer ``i``: a sub-block of a half chunk."""
        out = self._flat(i, x.numel(), x.new_empty(0, dtype=torch.float32))
        return out.view(x.shape).copy_(x)

    def buffer(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """Persistent work buffer ``i`` shaped and strided like ``like``: allocated at the first
        (largest) chunk of a sweep and reused, so later chunks pay no allocation or page faults."""
        return self._flat(i, like.numel(), like).as_strided(like.shape, like.stride())

    def logits(self, i: int, e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Another head's chunk logits e (k, D) @ w (V, D)^T (KD's teacher) into persistent
        buffer ``i``, by the core's GEMM and layout."""
        return chunk_logits(e, w, None, self._flat(i, e.shape[0] * w.shape[0], e), self.transposed)

    def head_logits(self, rows: torch.Tensor) -> torch.Tensor:
        """The (r, V) logits of rows ``rows`` (indices into the N rows) recomputed from the
        core's e, c, bias: for a chunk's rare exact-path fallback."""
        e, c, bias = self.__dict__["_head"]
        z = (e.index_select(0, rows) @ c.T).to(acc_dtype(e.dtype))
        return z if bias is None else z.add_(bias)

    def _flat(self, i: int, n: int, like: torch.Tensor) -> torch.Tensor:
        bufs = self.__dict__.setdefault("_buffers", {})
        if i not in bufs:
            bufs[i] = workspace((n,), like.dtype, like.device)
        return bufs[i][:n]

    def release(self) -> None:
        """Free the work buffers (called at the end of every sweep)."""
        for key in ("_buffers", "_head", "_teacher", "_chunk_t"):
            self.__dict__.pop(key, None)


def row_indices(rows: slice | torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The row numbers (into the N rows) of positions ``idx`` (r,) of a chunk's ``rows`` (a
    slice, or (k,) indices): for recomputing a few of a chunk's rows (``ChunkLoss.head_logits``)."""
    if isinstance(rows, slice):
        return idx + rows.start
    return rows.index_select(0, idx)


def _row_chunks(e: torch.Tensor, valid, n_valid: int, k_max: int):
    """(start, rows, e_k) per chunk of the valid rows: rows a slice (all rows valid) or (k,)
    indices into the N rows, e_k (k, D) their hidden states."""
    for s in range(0, n_valid, k_max):
        k = min(k_max, n_valid - s)
        if valid is None:
            rows = slice(s, s + k)
            yield s, rows, e[rows]
        else:
            rows = valid[s : s + k]
            yield s, rows, e.index_select(0, rows)


def _de_buffers(e: torch.Tensor, valid, n_valid: int, chunk_size: int, wanted: bool):
    """(dE (N, D), a (chunk, D) staging buffer when some rows are ignored) or (None, None);
    ignored rows keep a zero gradient."""
    if not wanted:
        return None, None
    if valid is None:
        return e.new_empty(e.shape), None
    return e.new_zeros(e.shape), e.new_empty(min(chunk_size, n_valid), e.shape[1])


def _write_de(de: torch.Tensor, de_tmp, g: torch.Tensor, c: torch.Tensor, rows) -> None:
    """dE[rows] = g (k, V) @ c (V, D), through the staging buffer for index rows."""
    if de_tmp is None:
        torch.mm(g, c, out=de[rows])
    else:
        k = g.shape[0]
        torch.mm(g, c, out=de_tmp[:k])
        de.index_copy_(0, rows, de_tmp[:k])


def _store_de(de: torch.Tensor, de_tmp, de_k: torch.Tensor, rows) -> None:
    """dE[rows] = de_k (k, D), rounded to dE's dtype, through the staging buffer for index rows."""
    if de_tmp is None:
        de[rows].copy_(de_k)
    else:
        k = de_k.shape[0]
        de.index_copy_(0, rows, de_tmp[:k].copy_(de_k))


def _sweep(e, c, bias, loss: ChunkLoss, valid, n_valid, chunk_size, weights, want, native=False):
    """One pass over the valid rows: per-row outputs (N,) each (0 on other rows) and, with
    ``weights`` (one (n_valid,) tensor or None per output), the gradients (dE, dC, dbias) of
    sum_o weights_o . output_o for the inputs flagged in ``want`` (``native``: see
    ``_sweep_half``)."""
    if native:
        return _sweep_half(e, c, bias, loss, valid, n_valid, chunk_size, weights, want)
    n, v = e.shape[0], c.shape[0]
    outs = [e.new_zeros(n) for _ in range(loss.n_outputs)]
    de, de_tmp = _de_buffers(e, valid, n_valid, chunk_size, weights is not None and want[0])
    dc = db = None
    if weights is not None:
        if want[1]:
            dc = torch.empty_like(c) if n_valid else torch.zeros_like(c)
        if want[2] and bias is not None:
            db = torch.zeros_like(bias)
    k_max = max(1, min(chunk_size, n_valid))
    flat = workspace((k_max * v,), e.dtype, e.device)
    loss._head = (e, c, bias)
    try:
        for s, rows, ek in _row_chunks(e, valid, n_valid, k_max):
            k = ek.shape[0]
            z = chunk_logits(ek, c, bias, flat, loss.transposed)  # (k, V)
            wk = (
                None
                if weights is None
                else tuple(x if x is None else x[s : s + k] for x in weights)
            )
            values, g = loss.chunk(z, rows, wk)
            for out, x in zip(outs, values, strict=True):
                out[rows] = x
            if wk is None:
                continue
            if de is not None:
                _write_de(de, de_tmp, g, c, rows)
            if dc is not None:
                if s == 0:
                    torch.mm(g.T, ek, out=dc)  # the first chunk initialises dC: no zero-fill
                else:
                    dc.addmm_(g.T, ek)
            if db is not None:
                db.add_(g.sum(0))
    finally:
        loss.release()
    return outs, (de, dc, db)


class _HalfGrads:
    """The GEMM gradients of the native half path, one pass over ``v_block``-row vocabulary
    blocks of each chunk's logit gradient g (k, V) (input dtype): dC[blk] += g[:, blk]^T e_k
    into fp32 blocks (allocated at the first chunk, rounded to the input dtype once by
    ``result``) and dE_k = sum_blk g[:, blk] c[blk] summed in fp32 (``add`` returns it), both
    as half GEMMs with fp32 accumulation inside. Blocking dE this way keeps each g block in
    cache for its two GEMMs and avoids oneDNN's slower K = V reduction (kernels/README.md)."""

    def __init__(
        self, c: torch.Tensor, v_block: int = V_BLOCK, k_max: int = 0, dc: bool = True
    ) -> None:
        v, d = c.shape
        self.c, self.dc = c, dc
        self.blocks = [(lo, min(lo + v_block, v)) for lo in range(0, v, v_block)]
        self.acc: list = [None] * len(self.blocks)
        vb = min(v_block, v) if dc else 0
        self.part = workspace((vb, d), c.dtype, c.device)  # a dC GEMM's half output
        self.stage = workspace((vb, d), torch.float32, c.device)  # fp32 copy: same-dtype add_
        # dE_k: the half GEMM output, its fp32 copy and the fp32 sum ((k_max, D) each)
        self.de = [
            workspace((k_max, d), dt, c.device) for dt in (c.dtype, torch.float32, torch.float32)
        ]

    def add(self, g: torch.Tensor, ek: torch.Tensor) -> torch.Tensor | None:
        """dC += g^T ek for one chunk (g (k, V), ek (k, D), input dtype); returns its dE_k
        (k, D) in fp32 (a work buffer, valid until the next call), or None if k_max was 0."""
        k = g.shape[0]
        want_de = self.de[0].shape[0] >= k > 0
        part_de, stage_de, de = (x[:k] for x in self.de)
        for b, (lo, hi) in enumerate(self.blocks):
            gb = g[:, lo:hi]
            if self.dc:
                p = torch.mm(gb.T, ek, out=self.part[: hi - lo])
                if self.acc[b] is None:
                    self.acc[b] = workspace(p.shape, torch.float32, p.device).copy_(p)
                else:  # a mixed-dtype add_ would allocate a converted temporary per block
                    self.acc[b].add_(self.stage[: hi - lo].copy_(p))
            if want_de:
                q = torch.mm(gb, self.c[lo:hi], out=part_de)
                if b == 0:
                    de.copy_(q)
                else:
                    de.add_(stage_de.copy_(q))
        return de if want_de else None

    def result(self, scale: float = 1.0) -> torch.Tensor:
        """scale x dC in the input dtype; the fp32 blocks are freed as they are rounded."""
        self.part = self.stage = self.de = None
        out = torch.empty_like(self.c)
        for b, (lo, hi) in enumerate(self.blocks):
            acc, self.acc[b] = self.acc[b], None
            if acc is None:
                out[lo:hi].zero_()
            else:
                out[lo:hi].copy_(acc.mul_(scale) if scale != 1.0 else acc)
        return out


def _sweep_half(e, c, bias, loss: ChunkLoss, valid, n_valid, chunk_size, weights, want):
    """``_sweep`` for fp16/bf16 e, c kept in their dtype (no fp32 copies): per chunk one half
    GEMM into a (k, V) half buffer; ``loss.sub_rows`` rows at a time are copied into an fp32 (s, V)
    work buffer (cache-sized), go through ``loss.chunk`` in fp32 (with the bias added in fp32)
    and their logit gradient is rounded once back into the half buffer; then one pass over the
    vocabulary blocks of g gives dE_k = g c and dC += g^T e_k, both summed in fp32
    (``_HalfGrads``), dbias summed in fp32 from the unrounded gradient. Outputs fp32; dC returned
    as a ``_HalfGrads``."""
    n, v = e.shape[0], c.shape[0]
    f32 = torch.float32
    outs = [e.new_zeros(n, dtype=f32) for _ in range(loss.n_outputs)]
    de, de_tmp = _de_buffers(e, valid, n_valid, chunk_size, weights is not None and want[0])
    grads = db = None
    if weights is not None and want[2] and bias is not None:
        db = bias.new_zeros(v, dtype=f32)
    b32 = None if bias is None else bias.to(f32)
    k_max = max(1, min(chunk_size, n_valid))
    if weights is not None and (want[0] or want[1]):
        grads = _HalfGrads(c, loss.v_block, k_max if de is not None else 0, dc=want[1])
    sub = min(loss.sub_rows, k_max)
    flat = workspace((k_max * v,), e.dtype, e.device)
    work = workspace((sub * v,), f32, e.device)
    loss._head = (e, c, b32)
    try:
        for s, rows, ek in _row_chunks(e, valid, n_valid, k_max):
            k = ek.shape[0]
            z16 = chunk_logits(ek, c, None, flat, False)  # (k, V), input dtype
            loss.begin_chunk(rows)
            for j in range(0, k, sub):
                m = min(sub, k - j)
                loss.sub_block = slice(j, j + m)  # its place in the chunk (KD's teacher rows)
                rj = slice(s + j, s + j + m) if valid is None else rows[j : j + m]
                z = work[: m * v].view(m, v).copy_(z16[j : j + m])
                if b32 is not None:
                    z.add_(b32)
                wj = (
                    None
                    if weights is None
                    else tuple(x if x is None else x[s + j : s + j + m] for x in weights)
                )
                values, g = loss.chunk(z, rj, wj)
                for out, x in zip(outs, values, strict=True):
                    out[rj] = x
                if wj is not None:
                    z16[j : j + m].copy_(g)  # the one rounding of the logit gradient
                    if db is not None:
                        db.add_(g.sum(0))
            if weights is None:
                continue
            if grads is not None:
                de_k = grads.add(z16, ek)
                if de is not None:
                    _store_de(de, de_tmp, de_k, rows)
    finally:
        loss.release()
        loss.__dict__.pop("sub_block", None)
    return outs, (de, grads if want[1] else None, db)


def _half_grads(grads: tuple, scale: float = 1.0) -> tuple:
    """(dE, dC, dbias) with a native sweep's fp32 dC blocks rounded (scale folded in first)."""
    de, dc, db = grads
    return de, (dc.result(scale) if isinstance(dc, _HalfGrads) else dc), db


def _reduce_de(loss: ChunkLoss, grads: tuple) -> None:
    """On a vocabulary shard, dE holds this shard's part sum_j g_ij c_j: all-reduce it here,
    inside the autograd Function, so every rank's e (and what produced it) gets the full
    gradient; dC and dbias stay local."""
    if loss.vocab is not None and grads[0] is not None:
        loss.vocab.all_reduce_(grads[0])


class _FusedLinear(torch.autograd.Function):
    """Gradients during the forward (scalar loss) or recomputed in backward (per-row outputs)."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, ignore_index, loss, reduction, chunk_size):
        acc, native = acc_dtype(e.dtype), loss.native  # native: no fp32 copies of e, c
        e_a, c_a = (e, c) if native else (e.to(acc), c.to(acc))
        b_a = bias if native or bias is None else bias.to(acc)
        valid, n_valid = valid_rows(targets, e.shape[0], ignore_index)
        want = tuple(ctx.needs_input_grad[:3])
        eager = any(want) and reduction != "none" and loss.n_outputs == 1
        scale = 1.0 / max(n_valid, 1) if reduction == "mean" else 1.0
        weights = (e.new_full((n_valid,), scale, dtype=acc),) if eager else None
        outs, grads = _sweep(
            e_a, c_a, b_a, loss, valid, n_valid, chunk_size, weights, want, native=native
        )
        if eager:
            _reduce_de(loss, grads)
        ctx.eager, ctx.grads, ctx.dtypes = eager, grads, (e.dtype, c.dtype)
        ctx.opts = (ignore_index, loss, reduction, chunk_size, scale, want)
        if any(want) and not eager:
            ctx.save_for_backward(e, c, bias, targets)
        first = outs[0] if reduction == "none" else outs[0].sum() * scale
        return (first, *outs[1:])

    @staticmethod
    @first_order
    def backward(ctx, g_loss, *g_extra):
        ignore_index, loss, reduction, chunk_size, scale, want = ctx.opts
        if ctx.eager:
            if ctx.grads is None:
                raise RuntimeError("fused linear loss (chunked): backward called twice")
            grads, ctx.grads = ctx.grads, None  # hand the buffers over without a copy
            g = float(g_loss)
            scaled = isinstance(grads[1], _HalfGrads)  # native: g folded in before rounding
            grads = _half_grads(grads, g)
            if g != 1.0:
                for i, buf in enumerate(grads):
                    if buf is not None and not (i == 1 and scaled):
                        buf.mul_(g)
        else:
            e, c, bias, targets = ctx.saved_tensors
            acc = acc_dtype(e.dtype)
            valid, n_valid = valid_rows(targets, e.shape[0], ignore_index)
            w = [
                g_loss.to(acc)
                if reduction == "none"
                else (g_loss.to(acc) * scale).expand(e.shape[0])
            ]
            w += [None if g is None else g.to(acc) for g in g_extra]
            if valid is not None:
                w = [x if x is None else x.index_select(0, valid) for x in w]
            if loss.native:
                _, grads = _sweep(e, c, bias, loss, valid, n_valid, chunk_size, w, want, True)
                grads = _half_grads(grads)
            else:
                b_a = bias.to(acc) if bias is not None else None
                e_a, c_a = e.to(acc), c.to(acc)
                _, grads = _sweep(e_a, c_a, b_a, loss, valid, n_valid, chunk_size, w, want)
            _reduce_de(loss, grads)
        de, dc, db = grads
        return (
            de.to(ctx.dtypes[0]) if de is not None else None,
            dc.to(ctx.dtypes[1]) if dc is not None else None,
            db.to(ctx.dtypes[1]) if db is not None else None,
            *([None] * 5),
        )


def fused_linear_loss(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor | None,
    loss: ChunkLoss,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    memory_target: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """The chunked fused loss of ``loss``'s per-chunk maths on validated inputs.

    e (N, D), c (V, D), bias (V,) or None, targets (N,) int64 or None (every row counts).
    Returns (loss, *extras) in the accumulation dtype: loss a scalar (mean over the valid rows,
    0 if none; or sum) or (N,) for "none" (0 on ignored rows); extras (N,). ``chunk_size`` (rows
    per chunk) overrides ``memory_target`` (default MEMORY_TARGET), from which it is derived. On a
    vocabulary shard (``loss.vocab``) every rank sizes its chunks for the largest shard, so all
    ranks run the same chunks and their collectives pair up. fp16/bf16 CPU inputs take the
    native half path or the upcast one as ``half_path`` chooses (logged once; vocabulary shards
    and mixed dtypes always upcast); either way the loss comes back in fp32, gradients in the
    inputs' dtypes.
    """
    loss.native = half_path(e, c, bias, loss)[0] == "native"
    if chunk_size is None:
        target = MEMORY_TARGET if memory_target is None else memory_target
        n, (v, d) = e.shape[0], c.shape
        v = v if loss.vocab is None else max(loss.vocab.sizes)
        if loss.native:  # half (chunk, V) buffers, after the fp32 sub-block and dC staging ones
            plan = native_plan(n, v, d, loss.n_buffers, loss.n_half_buffers, target)
            chunk_size, loss.sub_rows, loss.v_block = plan
        else:
            chunk_size = pick_chunk_size(n, v, d, e.dtype, loss.n_buffers, target)
    return _FusedLinear.apply(e, c, bias, targets, ignore_index, loss, reduction, int(chunk_size))
