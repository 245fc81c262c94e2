"""Compile every delta-rule kernel configuration for sm_90 without a GPU and report registers, spills, shared memory.

A tuning aid, not a benchmark: triton compiles the autotune candidates of ``glmkit.kernels.delta_rule`` (and the
fixed fp32 configuration) for an H100/H200 target, ptxas (shipped with triton) reports registers and spill stores,
and the configs that spill or exceed the 227 KiB of shared memory per block are the ones to drop from the lists.
Pointer arguments are assumed 16-byte aligned, as triton specialises them at a real launch (without that
assumption no load vectorises and the report means nothing). Runs on any machine with triton's NVIDIA backend:

    python benchmarks/compile_report_delta_rule.py            # bf16, K = V = 128, both gate kinds
    python benchmarks/compile_report_delta_rule.py fp32       # the fixed fp32 configuration (8 warps, 1 stage)
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

import glmkit.kernels.delta_rule as dr  # noqa: E402

TARGET = GPUTarget("cuda", 90, 128)  # sm_90: H100 / H200
FP32_ARGS = {"G", "g", "aqk", "akk", "h0", "ht", "dht", "dh0", "dvl", "dvn", "dq_p", "dk_p", "db_p", "dg_p", "dakk",
             "daqk", "dg", "state"}  # fmt: skip
INT_ARGS, FLOAT_ARGS = {"T", "NT", "BH"}, {"scale"}
SHAPE = dict(H=16, K=128, V=128, BT=64, BC=dr.SUB_CHUNK, KP=128, D=128, BD=64)
FLAGS = dict(STORE_T=True, HAS_H0=True, STORE_HT=True, HAS_DHT=True, STORE_DH0=True, REVERSE=False)


def report(kernel, dtype, per_channel, meta, num_warps, num_stages):
    prec = "ieee" if dtype == "fp32" else "tf32"
    consts = {n: v for n, v in {**SHAPE, **FLAGS, "PER_CHANNEL": per_channel, "PREC": prec, **meta}.items()
              if n in kernel.arg_names}  # fmt: skip
    sig = {}
    for n in kernel.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in INT_ARGS or n in FLOAT_ARGS:
            sig[n] = "i32" if n in INT_ARGS else "fp32"
        else:
            sig[n] = "*fp32" if n in FP32_ARGS else f"*{dtype}"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if sig[n].startswith("*")}
    src = ASTSource(kernel, sig, {(kernel.arg_names.index(n),): v for n, v in consts.items()}, attrs)
    label = f"{kernel.__name__} {'KDA' if per_channel else 'GDN'} {meta} w{num_warps} s{num_stages}"
    try:
        c = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001
        return f"{label:60s} FAILED {type(e).__name__}: {str(e)[:300]}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(c.asm["ptx"])
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    err = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs = re.findall(r"Used (\d+) registers", err)
    spills = re.findall(r"(\d+) bytes spill stores", err)
    return f"{label:60s} regs {regs[0] if regs else '?':>3}  spill stores {spills[0] if spills else '?':>5} B  " \
           f"smem {c.metadata.shared // 1024:>3} KiB"  # fmt: skip


def main():
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bf16"
    for per_channel in (False, True):
        for kernel, configs in dr._CONFIGS.items():
            if kernel in (dr._kda_intra_kernel, dr._kda_intra_bwd_kernel) and not per_channel:
                continue
            if kernel is dr._intra_bwd_kernel and per_channel:
                continue
            if dtype == "fp32":  # the launcher's fixed fp32 configuration
                meta = {n: 32 for n in ("BK", "BV") if n in kernel.arg_names}
                configs = [triton.Config(meta, num_warps=8, num_stages=1)]
            for cfg in configs:
                print(report(kernel, dtype, per_channel, cfg.kwargs, cfg.num_warps, cfg.num_stages), flush=True)


if __name__ == "__main__":
    main()
