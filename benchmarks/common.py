"""Timing helpers shared by the GPU benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

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
