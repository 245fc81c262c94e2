"""Fused RMSNorm, forward and backward (lesson 03's kernel).

What it computes: ``glmkit.ops.rmsnorm.rmsnorm_reference`` — y = x · rstd · w with rstd = 1 / sqrt(mean(x²) + eps)
per row — and its gradients. It replaces LayerNorm, the norm of GLM-2021 and ChatGLM-6B, from ChatGLM2 on:
no mean to subtract and no bias, so a row needs one reduction (Σx²) instead of two.

Forward: one program per row. The whole row (N ≤ MAX_HIDDEN elements, padded to BLOCK_N = the next power
of two) is loaded once, squared and summed in fp32, scaled and written back in the input dtype. It also
stores rstd (one fp32 per row) so the backward need not recompute the reduction.

Backward. With x̂ = x · rstd and g = dy · w (per row),

    dx = rstd · (g - x̂ · mean(g · x̂))          (the mean over the row's N elements)
    dw = Σ_rows dy · x̂

dx is per row, like the forward. dw is a sum over *all* rows, which no single program may own without a
race: each of P programs takes a contiguous chunk of rows, accumulates its share of dw in fp32 registers,
and writes one partial row to a [P, N] fp32 buffer; a second step (``sum(0)`` over P ≤ a few hundred
rows) finishes the reduction. No atomics, so the result is deterministic.

Runs natively on CUDA, and on CPU tensors under the Triton interpreter (``glmkit.kernels`` sets
TRITON_INTERPRET=1 on machines without CUDA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

MAX_HIDDEN = 65536  # a whole row lives in registers: beyond this the single-pass design spills badly


@triton.jit
def _rmsnorm_fwd_kernel(
    X,
    W,
    Y,
    RSTD,
    stride_x,
    stride_y,  # row strides (elements); the last dim is contiguous
    N,
    eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)  # padding lanes are 0: they add nothing
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DW_PART,
    stride_dy,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    BLOCK_N: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(rows_per_program, M - row_start)  # the last program may get fewer rows
    for i in range(0, n_rows):
        row = row_start + i
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        g = dy * w
        c = tl.sum(g * xhat, axis=0) / N
        dx = (g - xhat * c) * rstd
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw_acc, mask=mask)


def _fwd_launch_opts(block_n: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    # one row per program, thousands of programs: few warps per row (~64 elements per thread) let more
    # rows be in flight per SM. Measured on one H200, bf16, 16384 rows (benchmarks/sweep_kernels.py):
    # N = 5120 (block 8192) 3.86 TB/s with 4 warps against 3.11 with 16; N = 8192 4.00 against 3.91;
    # N = 4096 within 1.5% for 4 and 8 warps; 32 warps was the slowest everywhere.
    return {"num_warps": min(32, max(4, block_n // 2048))}


def _launch_opts(block_n: int, device: torch.device) -> dict:
    """Backward: few programs, each looping over many rows, so wide programs (more warps per row)."""
    if device.type != "cuda":
        return {}
    warps = 4 if block_n <= 1024 else 8 if block_n <= 4096 else 16 if block_n <= 16384 else 32
    return {"num_warps": warps}


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """[..., N] → [M, N] with a contiguous last dim (a view when the layout allows, else a copy)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, N)


def rmsnorm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """x [..., N] (N ≤ MAX_HIDDEN), weight [N] → (y in x's shape and dtype, rstd [M] fp32 = 1/sqrt(mean(x²)+eps)
    per row, which the backward reuses)."""
    require_kernel_device(x)
    N = x.shape[-1]
    x2 = _rows(x, N)
    M = x2.shape[0]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M > 0:
        y2 = out.view(-1, N)
        block_n = triton.next_power_of_2(N)
        _rmsnorm_fwd_kernel[(M,)](
            x2,
            weight.contiguous(),
            y2,
            rstd,
            x2.stride(0),
            y2.stride(0),
            N,
            float(eps),
            BLOCK_N=block_n,
            **_fwd_launch_opts(block_n, x.device),
        )
    return out, rstd


def _default_programs(M: int, device: torch.device, block_n: int = 0) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # measured on one H200 (bf16, 16384 rows): one program per SM for rows padded to 8192 lanes
        # (N = 5120 and 8192: +3-4% over two per SM), two per SM otherwise (N = 4096: 2.95 TB/s against
        # 2.17 with one; longer rows were not swept, so they keep the earlier default of two)
        return max(1, min(M, (1 if block_n == 8192 else 2) * sms))
    return max(1, min(M, 4))  # interpreter: few programs, each looping over its rows


def rmsnorm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, compute_dw: bool = True):
    """Gradients of ``rmsnorm_fwd``: dy, x [..., N], weight [N], rstd [M] from the forward → (dx in x's shape
    and dtype, dw [N] in weight's dtype or None without ``compute_dw``)."""
    require_kernel_device(x)
    N = x.shape[-1]
    x2, dy2 = _rows(x, N), _rows(dy, N)
    M = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if M == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    block_n = triton.next_power_of_2(N)
    P = _default_programs(M, x.device, block_n)
    rows_per_program = triton.cdiv(M, P)
    P = triton.cdiv(M, rows_per_program)  # drop programs that would get no rows
    dw_part = torch.empty((P, N) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    dx2 = dx.view(-1, N)
    _rmsnorm_bwd_kernel[(P,)](
        dy2,
        x2,
        weight.contiguous(),
        rstd.contiguous(),
        dx2,
        dw_part,
        dy2.stride(0),
        x2.stride(0),
        dx2.stride(0),
        M,
        N,
        rows_per_program,
        BLOCK_N=block_n,
        COMPUTE_DW=compute_dw,
        **_launch_opts(block_n, x.device),
    )
    dw = dw_part.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw
