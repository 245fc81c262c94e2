"""Fused SwiGLU on the gate‖up layout, forward and backward (lesson 03's kernel).

What it computes: ``glmkit.mlp.swiglu_reference`` — for gate_up [..., 2I] (gate = first I columns,
up = last I, the ChatGLM2/GLM-4 layout), y = silu(gate) · up [..., I] with silu(g) = g · sigmoid(g).
It replaces the GeLU MLP of GLM-2021/ChatGLM-6B and GLM-130B's GeGLU (which gated with gelu on the
*second* half); only the activation changes, the kernel shape is the same for any GLU.

Forward: an elementwise map, memory bound: read 2I values per row, write I. Each program owns one row
and a BLOCK-wide column slice, computes in fp32 and rounds once.

Backward: nothing is saved but gate_up itself (recomputing sigmoid is cheaper than storing it). With
s = sigmoid(g):

    d up   = dy · silu(g) = dy · g · s
    d gate = dy · up · silu'(g),   silu'(g) = s · (1 + g · (1 - s))

written into the two halves of one d gate_up [..., 2I] tensor — the gradient the fused projection's
weight needs, without a torch.cat.

Clamped (``LIMIT`` = L, glm5_next's ``swiglu_limit``; a compile-time constant, None = no clamp): g ← min(g, L),
u ← clamp(u, -L, L) before the formulas above, and d gate (d up) is zeroed where g > L (|u| > L), as torch's clamp
does.

Runs natively on CUDA and under the Triton interpreter on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device


@triton.jit
def _swiglu_fwd_kernel(
    GU,
    Y,
    stride_gu,
    stride_y,  # row strides; last dims contiguous
    I,
    BLOCK: tl.constexpr,
    LIMIT: tl.constexpr = None,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    base = GU + row * stride_gu
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + I + cols, mask=mask, other=0.0).to(tl.float32)
    if LIMIT is not None:
        g = tl.minimum(g, LIMIT)
        u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY,
    GU,
    DGU,
    stride_dy,
    stride_gu,
    stride_dgu,
    I,
    BLOCK: tl.constexpr,
    LIMIT: tl.constexpr = None,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    base = GU + row * stride_gu
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + I + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    if LIMIT is not None:
        g_kept = g <= LIMIT
        u_kept = (u >= -LIMIT) & (u <= LIMIT)
        g = tl.minimum(g, LIMIT)
        u = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
    s = tl.sigmoid(g)
    silu = g * s
    d_gate = dy * u * s * (1.0 + g * (1.0 - s))
    d_up = dy * silu
    if LIMIT is not None:
        d_gate = tl.where(g_kept, d_gate, 0.0)
        d_up = tl.where(u_kept, d_up, 0.0)
    out = DGU + row * stride_dgu
    tl.store(out + cols, d_gate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(out + I + cols, d_up.to(DGU.dtype.element_ty), mask=mask)


def _block(I: int, device: torch.device) -> tuple[int, dict]:
    if device.type != "cuda":
        return min(triton.next_power_of_2(I), 128), {}
    # Column block 2048 or 4096, whichever pads the row less (ties: 4096, fewer programs), 8 warps.
    # Measured on one H200, bf16, 16384 rows (benchmarks/sweep_kernels.py): I = 10944 4.06 TB/s with
    # 4096 against 3.93 with 2048 (same padding); I = 13696 4.16 with 2048 against 4.02 with 4096 (which
    # pads to 16384); smaller blocks (512, 1024) were slower.
    if I <= 2048:
        block = triton.next_power_of_2(I)
    else:
        block = 4096 if triton.cdiv(I, 4096) * 4096 <= triton.cdiv(I, 2048) * 2048 else 2048
    return block, {"num_warps": 4 if block <= 1024 else 8}


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def swiglu_fwd(gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """gate_up [..., 2I] (gate first) → silu(gate) · up [..., I] in gate_up's dtype; with ``limit`` L the gate is
    clamped to ≤ L and up to [-L, L] first."""
    require_kernel_device(gate_up)
    I = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], I), dtype=gate_up.dtype, device=gate_up.device)
    gu = _rows(gate_up)
    M = gu.shape[0]
    if M:
        y = out.view(-1, I)
        block, opts = _block(I, gate_up.device)
        _swiglu_fwd_kernel[(M, triton.cdiv(I, block))](
            gu, y, gu.stride(0), y.stride(0), I, BLOCK=block, LIMIT=limit, **opts
        )
    return out


def swiglu_bwd(dy: torch.Tensor, gate_up: torch.Tensor, limit: float | None = None) -> torch.Tensor:
    """Gradient of ``swiglu_fwd`` w.r.t. gate_up: dy [..., I], gate_up [..., 2I] → [..., 2I] (d gate first); zero
    where ``limit`` clamped the value."""
    require_kernel_device(gate_up)
    I = gate_up.shape[-1] // 2
    out = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    gu, dy2 = _rows(gate_up), _rows(dy)
    M = gu.shape[0]
    if M:
        dgu = out.view(-1, 2 * I)
        block, opts = _block(I, gate_up.device)
        _swiglu_bwd_kernel[(M, triton.cdiv(I, block))](
            dy2, gu, dgu, dy2.stride(0), gu.stride(0), dgu.stride(0), I, BLOCK=block, LIMIT=limit, **opts
        )
    return out
