"""Ahead-of-time compile of the Cut Cross-Entropy Triton kernels for an H100 (sm_90) target.

No GPU needed: catches frontend/lowering errors that the interpreter cannot (constexpr branches,
early return, dot operand types) down to a cubin. Must run without TRITON_INTERPRET.
Wijmans et al. 2024, arXiv 2411.09009.
"""

from __future__ import annotations

import os

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles real kernels"),
]

BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 32}
STRIDES = dict.fromkeys(["stride_en", "stride_ed", "stride_cv", "stride_cd"], "i32")


def _compile(fn, signature, constexprs):
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **STRIDES, **dict.fromkeys(constexprs, "constexpr")}
    sig = {name: sig[name] for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert kernel.asm["cubin"]


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("on", [False, True])
def test_kernels_compile_for_sm90(dt, on):
    from kernels.cce.triton_bwd import _cce_bwd_kernel
    from kernels.cce.triton_fwd import _lse_fwd_kernel, _target_logit_kernel

    ptrs = {"E": f"*{dt}", "C": f"*{dt}", "Bias": f"*{dt}", "Rows": "*i64", "Targets": "*i64"}
    fp32_ptrs = ["LsePart", "LogitSum", "RowSumPart", "Out", "Lse", "WLoss", "WLse"]
    ptrs |= dict.fromkeys(fp32_ptrs, "*fp32")
    ptrs |= dict.fromkeys(["DE", "DC", "DBias"], "*fp32") | {"VPerm": "*i64"}
    scalars = dict.fromkeys(["n_rows", "V", "D", "V_BLOCKS_PER_SPLIT"], "i32")
    scalars |= dict.fromkeys(["softcap", "filter_eps", "smoothing", "smooth_per_class"], "fp32")
    sig = ptrs | scalars
    flags = {"HAS_BIAS": on, "HAS_SOFTCAP": on, "UPCAST_DOT": False, "DOT_PRECISION": "ieee"}
    _compile(_lse_fwd_kernel, sig, flags | {"HAS_LOGIT_SUM": on, "HAS_ROW_SUM": on} | BLOCKS)
    _compile(
        _target_logit_kernel,
        sig,
        {"HAS_BIAS": on, "HAS_SOFTCAP": on, "BLOCK_N": 64, "BLOCK_D": 32},
    )
    bwd_flags = {"HAS_LSE_GRAD": on, "HAS_PERM": on, "FILTER": True, "SMOOTH": on}
    _compile(_cce_bwd_kernel, sig, flags | bwd_flags | BLOCKS)
