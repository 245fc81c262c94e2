"""Compile every DSA kernel configuration (lightning indexer, sparse MLA forward/backward/combine) for sm_90 without a
GPU and report registers, spill stores and shared memory, as compile_report_delta_rule.py does for lesson 07.

A tuning aid, not a benchmark: the autotune candidates of ``glmkit.kernels.lightning_indexer`` and
``glmkit.kernels.sparse_mla`` at GLM-5's dimensions (index heads 32 × 128; 64 heads, R = 512, DR = 64), compiled by
triton for an H100/H200 target and assembled by the ptxas triton ships. A config that spills (or needs more than the
227 KiB of shared memory per block) is one to drop from its list. Pointer arguments are assumed 16-byte aligned, as a
real launch specialises them.

    python benchmarks/compile_report_dsa.py          # bf16
    python benchmarks/compile_report_dsa.py fp32     # the fixed fp32 configurations
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, do not interpret (set before triton is imported)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import glmkit.kernels.lightning_indexer as li  # noqa: E402
import glmkit.kernels.sparse_mla as sm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 128)  # sm_90: H100 / H200
FP32_PTRS = {"OUT", "LSE", "LP", "OP", "DC", "DKR", "W"}
INT32_PTRS = {"IDX"}
UINT8_PTRS = {"KEY_MASK"}
FLOAT_ARGS = {"scale", "qk_scale"}
INT_ARGS = {"T", "L", "H", "D", "N", "R", "DR", "KEYS_PER_SPLIT", "NUM_SPLITS", "offset"}


def compile_one(kernel, dtype, consts, num_warps, num_stages):
    sig = {}
    for n in kernel.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in FLOAT_ARGS:
            sig[n] = "fp32"
        elif n in INT_ARGS or n.startswith("stride"):
            sig[n] = "i32"
        else:  # the rest are pointers
            sig[n] = (
                "*fp32" if n in FP32_PTRS else "*i32" if n in INT32_PTRS else "*u8" if n in UINT8_PTRS else f"*{dtype}"
            )
    if kernel is sm._sparse_mla_fwd_kernel and consts.get("SPLIT"):
        sig["O"] = "*fp32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if sig[n].startswith("*")}
    src = ASTSource(kernel, sig, {(kernel.arg_names.index(n),): v for n, v in consts.items()}, attrs)
    shown = {k: v for k, v in consts.items() if k.startswith("BLOCK") or k == "SPLIT"}
    label = f"{kernel.__name__} {shown} w{num_warps} s{num_stages}"
    try:
        c = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001
        return f"{label} FAILED {type(e).__name__}: {str(e)[:300]}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    err = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", err)
    spills = re.findall(r"(\d+) bytes spill stores", err)
    return (
        f"{label:110s} regs {regs[0] if regs else '?':>3}  spill stores {spills[0] if spills else '?':>5} B  "
        f"smem {c.metadata.shared // 1024:>3} KiB  mma {'wgmma' if 'wgmma' in c.asm['ptx'] else 'mma.sync'}"
    )


def main():
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    prec = "ieee" if dtype == "fp32" else "tf32"
    base = dict(HAS_KEY_MASK=True, BLOCK_D=128, DOT_PRECISION=prec)
    cfgs = [(32, 32, 4, 1)] if dtype == "fp32" else li._CONFIGS
    for bt, bl, w, s in cfgs:
        print(compile_one(li._indexer_logits_kernel, dtype, {**base, "BLOCK_T": bt, "BLOCK_L": bl}, w, s), flush=True)
    dims = sm._dims(64, 512, 64)
    fwd = [(16, 4, 1)] if dtype == "fp32" else sm._FWD_CONFIGS
    for split in (False, True):
        for bn, w, s in fwd:
            consts = dict(SPLIT=split, DOT_PRECISION=prec, BLOCK_N=bn, **dims)
            print(compile_one(sm._sparse_mla_fwd_kernel, dtype, consts, w, s), flush=True)
    consts = dict(BLOCK_H=dims["BLOCK_H"], BLOCK_R=dims["BLOCK_R"])
    print(compile_one(sm._combine_kernel, dtype, consts, 4, 1), flush=True)
    bwd = [(16, 16, 4, 1)] if dtype == "fp32" else sm._BWD_CONFIGS
    for bh, bn, w, s in bwd:
        consts = dict(DOT_PRECISION=prec, BLOCK_H=bh, BLOCK_N=bn, BLOCK_R=dims["BLOCK_R"], BLOCK_DR=dims["BLOCK_DR"])
        print(compile_one(sm._sparse_mla_bwd_kernel, dtype, consts, w, s), flush=True)


if __name__ == "__main__":
    main()
