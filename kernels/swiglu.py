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

Runs natively on CUDA and under the Triton interpreter on CPU tensors.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)



@triton.jit
def _swiglu_fwd_kernel(
    GU, Y,
    stride_gu, stride_y,        # row strides; last dims contiguous
    I,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    base = GU + row * stride_gu
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, GU, DGU,
    stride_dy, stride_gu, stride_dgu,
    I,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    base = GU + row * stride_gu
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + I + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    d_gate = dy * u * s * (1.0 + g * (1.0 - s))
    d_up = dy * silu
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


def _check(gate_up: torch.Tensor) -> int:
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() < 1:
        raise ValueError(f"gate_up must be a tensor [..., 2I], got {getattr(gate_up, 'shape', type(gate_up))}")
    if gate_up.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"gate_up must be float32, float16 or bfloat16, got {gate_up.dtype}")
    if gate_up.shape[-1] == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even and non-zero (gate ‖ up), got {tuple(gate_up.shape)}")
    require_kernel_device(gate_up)
    return gate_up.shape[-1] // 2


def _rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, t.shape[-1])


def swiglu_fwd(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2I] (gate first) → silu(gate) · up [..., I] in gate_up's dtype.
    out: optional contiguous [..., I] buffer of gate_up's dtype (tests pass a NaN-poisoned one)."""
    I = _check(gate_up)
    shape = (*gate_up.shape[:-1], I)
    if out is None:
        out = torch.empty(shape, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != shape or out.dtype != gate_up.dtype or out.device != gate_up.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {shape} tensor of {gate_up.dtype} on {gate_up.device}")
    gu = _rows(gate_up)
    M = gu.shape[0]
    if M:
        y = out.view(-1, I)
        block, opts = _block(I, gate_up.device)
        _swiglu_fwd_kernel[(M, triton.cdiv(I, block))](gu, y, gu.stride(0), y.stride(0), I, BLOCK=block, **opts)
    return out


def swiglu_bwd(dy: torch.Tensor, gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of ``swiglu_fwd`` w.r.t. gate_up: dy [..., I], gate_up [..., 2I] → d gate_up [..., 2I]
    (d gate in the first half, d up in the second), in gate_up's dtype. out: optional contiguous buffer."""
    I = _check(gate_up)
    shape = (*gate_up.shape[:-1], I)
    if not isinstance(dy, torch.Tensor) or dy.shape != shape or dy.device != gate_up.device:
        raise ValueError(f"dy must be a {shape} tensor on {gate_up.device}, got {getattr(dy, 'shape', type(dy))}")
    if dy.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dy must be float32, float16 or bfloat16, got {dy.dtype}")
    if out is None:
        out = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != gate_up.shape or out.dtype != gate_up.dtype or out.device != gate_up.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(gate_up.shape)} tensor of {gate_up.dtype} on {gate_up.device}")
    gu, dy2 = _rows(gate_up), _rows(dy)
    M = gu.shape[0]
    if M:
        dgu = out.view(-1, 2 * I)
        block, opts = _block(I, gate_up.device)
        _swiglu_bwd_kernel[(M, triton.cdiv(I, block))](
            dy2, gu, dgu, dy2.stride(0), gu.stride(0), dgu.stride(0), I, BLOCK=block, **opts
        )
    return out


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves gate_up only; the backward recomputes the sigmoid."""

    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return swiglu_fwd(gate_up)

    @staticmethod
    def backward(ctx, dy):
        (gate_up,) = ctx.saved_tensors
        return swiglu_bwd(dy, gate_up)


def swiglu_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Differentiable fused SwiGLU: gate_up [..., 2I] → [..., I]."""
    return SwiGLUFunction.apply(gate_up)
