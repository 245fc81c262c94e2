"""Timing helpers shared by the GPU benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import traceback

import torch
import triton.testing


def bench(fn, rep: int = 300, warmup: int = 50) -> float:
    """Median milliseconds of ``fn()`` by triton's do_bench, after one call for compilation/autotuning."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def matmul_ceiling() -> float:
    """bf16 8192³ matmul TFLOP/s on this GPU now: the compute ceiling the run's figures are read against."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / bench(lambda: a @ b, rep=200) / 1e9


def graph_bench(fn, rep: int = 300, warmup: int = 50) -> float:
    """Median milliseconds of ``fn()`` replayed from a CUDA graph: the GPU time without the host's launch
    and autograd overhead (which dominates a fused op's forward+backward below ~0.5 ms on a busy host).
    ``fn`` is warmed up on a side stream, captured once (its allocations come from the graph's pool) and
    replayed; it must not synchronize with the host. Raises whatever capture raises."""
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
    skipped, so one failure does not lose the other rows."""
    for D in Ds:
        for T in Ts:
            try:
                yield run_shape(T, D, log)
            except Exception as e:  # noqa: BLE001
                log(f"T={T} D={D} failed: {e!r}")
                traceback.print_exc()
