"""Fused RMSNorm, forward and backward (lesson 03's kernel).

What it computes: ``glmkit.norms.rms_norm_reference`` — y = x · rstd · w with rstd = 1 / sqrt(mean(x²) + eps)
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
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)



@triton.jit
def _rmsnorm_fwd_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y,          # row strides (elements); the last dim is contiguous
    N, eps,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)   # padding lanes are 0: they add nothing
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PART,
    stride_dy, stride_x, stride_dx,
    M, N, rows_per_program,
    BLOCK_N: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(rows_per_program, M - row_start)   # the last program may get fewer rows
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


def _check_common(x: torch.Tensor, weight: torch.Tensor) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"x must be a tensor [..., N], got {getattr(x, 'shape', type(x))}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    N = x.shape[-1]
    if N == 0 or N > MAX_HIDDEN:
        raise ValueError(f"hidden size N = x.shape[-1] = {N} must lie in [1, {MAX_HIDDEN}]")
    if not isinstance(weight, torch.Tensor) or weight.shape != (N,):
        raise ValueError(f"weight must be a tensor of shape [N] = [{N}], got {getattr(weight, 'shape', type(weight))}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    require_kernel_device(x)
    return N


def _rows(t: torch.Tensor, N: int) -> torch.Tensor:
    """[..., N] → [M, N] with a contiguous last dim (a view when the layout allows, else a copy)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, N)


def rmsnorm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    *,
    return_rstd: bool = False,
    rstd: torch.Tensor | None = None,
):
    """RMSNorm forward. x [..., N] fp32/fp16/bf16 (N ≤ MAX_HIDDEN), weight [N] (any float dtype).
    out: optional contiguous buffer of x's shape and dtype (tests pass a NaN-poisoned one).
    return_rstd: also return rstd [M] fp32 (M = number of rows), 1/sqrt(mean(x²)+eps) per row, which the
    backward uses; ``rstd=`` may pass its buffer. Returns y (x's shape and dtype), or (y, rstd)."""
    N = _check_common(x, weight)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    x2 = _rows(x, N)
    M = x2.shape[0]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(x.shape)} tensor of {x.dtype} on {x.device}")
    if rstd is None:
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    elif rstd.shape != (M,) or rstd.dtype != torch.float32 or not rstd.is_contiguous() or rstd.device != x.device:
        raise ValueError(f"rstd must be a contiguous fp32 [M] = [{M}] tensor on {x.device}")
    if M > 0:
        y2 = out.view(-1, N)
        block_n = triton.next_power_of_2(N)
        _rmsnorm_fwd_kernel[(M,)](
            x2, weight.contiguous(), y2, rstd, x2.stride(0), y2.stride(0), N, float(eps),
            BLOCK_N=block_n, **_fwd_launch_opts(block_n, x.device),
        )
    return (out, rstd) if return_rstd else out


def _default_programs(M: int, device: torch.device, block_n: int = 0) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        # measured on one H200 (bf16, 16384 rows): one program per SM for rows padded to 8192 lanes
        # (N = 5120 and 8192: +3-4% over two per SM), two per SM otherwise (N = 4096: 2.95 TB/s against
        # 2.17 with one; longer rows were not swept, so they keep the earlier default of two)
        return max(1, min(M, (1 if block_n == 8192 else 2) * sms))
    return max(1, min(M, 4))  # interpreter: few programs, each looping over its rows


def rmsnorm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dx: torch.Tensor | None = None,
    *,
    compute_dw: bool = True,
    num_programs: int | None = None,
):
    """RMSNorm backward. dy, x [..., N] (one dtype), weight [N], rstd [M] fp32 from ``rmsnorm_fwd``.
    dx: optional contiguous buffer of x's shape and dtype. num_programs: how many programs split the rows
    (each writes one fp32 partial row of dw; default 1-2 per SM on CUDA, ≤ 4 under the interpreter).
    Returns (dx, dw) with dw [N] in weight's dtype, or None when ``compute_dw`` is False."""
    N = _check_common(x, weight)
    if not isinstance(dy, torch.Tensor) or dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"dy must match x: {tuple(x.shape)} {x.dtype} on {x.device}, got {getattr(dy, 'shape', type(dy))}")
    x2, dy2 = _rows(x, N), _rows(dy, N)
    M = x2.shape[0]
    if not isinstance(rstd, torch.Tensor) or rstd.shape != (M,) or rstd.dtype != torch.float32 or rstd.device != x.device:
        raise ValueError(f"rstd must be the fp32 [M] = [{M}] tensor returned by rmsnorm_fwd")
    if dx is None:
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif dx.shape != x.shape or dx.dtype != x.dtype or dx.device != x.device or not dx.is_contiguous():
        raise ValueError(f"dx must be a contiguous {tuple(x.shape)} tensor of {x.dtype} on {x.device}")
    if M == 0:
        return dx, (torch.zeros_like(weight) if compute_dw else None)
    P = num_programs or _default_programs(M, x.device, triton.next_power_of_2(N))
    if not isinstance(P, int) or P < 1:
        raise ValueError(f"num_programs must be a positive int, got {num_programs!r}")
    P = min(P, M)
    rows_per_program = triton.cdiv(M, P)
    P = triton.cdiv(M, rows_per_program)  # drop programs that would get no rows
    dw_part = torch.empty((P, N) if compute_dw else (1,), dtype=torch.float32, device=x.device)
    dx2 = dx.view(-1, N)
    block_n = triton.next_power_of_2(N)
    _rmsnorm_bwd_kernel[(P,)](
        dy2, x2, weight.contiguous(), rstd.contiguous(), dx2, dw_part,
        dy2.stride(0), x2.stride(0), dx2.stride(0), M, N, rows_per_program,
        BLOCK_N=block_n, COMPUTE_DW=compute_dw, **_launch_opts(block_n, x.device),
    )
    dw = dw_part.sum(0).to(weight.dtype) if compute_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper: forward saves (x, weight, rstd); backward runs ``rmsnorm_bwd``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rmsnorm_fwd(x, weight, eps, return_rstd=True)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dx or need_dw):
            return None, None, None
        dx, dw = rmsnorm_bwd(dy.contiguous(), x, weight, rstd, compute_dw=need_dw)
        return (dx if need_dx else None), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Differentiable fused RMSNorm (x [..., N], weight [N]) → [..., N] in x's dtype."""
    return RMSNormFunction.apply(x, weight, eps)
