"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`): timing, and launching a kernel
at a fixed tile configuration (what the autotuner does with each of its candidates), for the sweeps.

Smoke mode (``SMOKE = True``, set by each script's ``--smoke``): ``bench`` times one call with the wall clock
instead of triton's do_bench, so the scripts run end to end on any device, CPU included (kernels under the Triton
interpreter); the figures then mean nothing.
"""

from __future__ import annotations

import math
import os
import time
import traceback

import torch

# Without CUDA the kernels run under Triton's interpreter, which has to be switched on before triton is imported
# (glmkit does the same, but the scripts import this module first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

SMOKE = False


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fn, rep: int = 300, warmup: int = 50) -> float:
    """Median milliseconds of ``fn()`` by triton's do_bench, after one call for compilation/autotuning.
    Smoke mode or no CUDA: the wall-clock time of one call."""
    if SMOKE or not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def matmul_ceiling() -> float:
    """bf16 8192³ matmul TFLOP/s on this GPU now: the compute ceiling the run's figures are read against
    (smoke mode: 256³ on whatever device runs)."""
    n = 256 if SMOKE else 8192
    a = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device(), dtype=torch.bfloat16)
    return 2 * n**3 / bench(lambda: a @ b, rep=200) / 1e9


def graph_bench(fn, rep: int = 300, warmup: int = 50) -> float:
    """Median milliseconds of ``fn()`` replayed from a CUDA graph: the GPU time without the host's launch
    and autograd overhead (which dominates a fused op's forward+backward below ~0.5 ms on a busy host).
    ``fn`` is warmed up on a side stream, captured once (its allocations come from the graph's pool) and
    replayed; it must not synchronize with the host. Raises whatever capture raises (and, without CUDA,
    a RuntimeError)."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA device")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay, rep=rep, warmup=warmup)


def each_shape(Ds, Ts, run_shape, log):
    """Yield ``run_shape(T, D, log)`` for every (D, T); a shape that raises is logged with its traceback and
    skipped, so one failure does not lose the other rows (smoke mode: re-raised)."""
    for D in Ds:
        for T in Ts:
            try:
                yield run_shape(T, D, log)
            except Exception as e:  # noqa: BLE001
                reraise_if_smoke()
                log(f"T={T} D={D} failed: {e!r}")
                traceback.print_exc()


def attention_fwd_fixed(q, k, v, sep, block_m, block_n, num_warps, num_stages, return_lse=False):
    """``glmkit.kernels.attention.attention_fwd`` at one fixed tile configuration: the raw jit kernel launched
    with the arguments the launcher passes, and BLOCK_M, BLOCK_N, num_warps, num_stages given (the launcher
    autotunes them). Returns o, or (o, lse) with ``return_lse``."""
    from glmkit.kernels import attention as kmod

    B, H, T, D = q.shape
    H_kv = k.shape[1]
    scale = 1.0 / math.sqrt(D)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    sep = kmod._sep_or_full(sep, B, T, q.device)
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device) if return_lse else out
    kmod._attn_fwd_kernel[(triton.cdiv(T, block_m), B * H)](
        q, k, v, sep, out, lse, scale * kmod.LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        H, T, H // H_kv, kmod._t_bucket(T),
        HEAD_DIM=D, HEAD_DIM_V=D, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=kmod._precision(q.dtype),
        STORE_LSE=return_lse, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def reraise_if_smoke() -> None:
    """Call inside an ``except`` block that logs a failure and goes on (so one failing shape or baseline does not
    lose a GPU run's other rows): in smoke mode the exception is re-raised instead, so that a broken code path
    fails the check rather than leaving a NaN in a table nobody reads."""
    if SMOKE:
        raise  # noqa: PLE0704 (called from an except block: re-raises the exception being handled)
