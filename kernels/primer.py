"""Lesson 00's first Triton kernels: a fused scale-and-add, then a row softmax.

What this teaches (everything the attention kernel of lesson 01 builds on):
    * a kernel is a function run by many *programs* at once; ``tl.program_id(0)`` says which one I am;
    * each program handles one *block* of ``BLOCK`` elements (a compile-time constant, a power of two);
    * the last block usually sticks out past the end of the data (the *ragged edge*): a boolean ``mask``
      on every load and store keeps it from reading or writing memory that is not ours;
    * the launch *grid* is the number of programs: ``cdiv(n, BLOCK)`` of them.

    scale_add(x, b, a)   y = a * x + b, elementwise (1-D grid; one program per block of elements)
    row_softmax(x)       softmax over the last dim (one program per row; masked lanes load -inf)

Each has a plain-torch reference (``scale_add_reference``, ``row_softmax_reference``) and takes an
optional ``out=`` tensor, so tests can hand it a NaN-poisoned buffer: an element the kernel forgets to
write stays NaN and the comparison fails. Without CUDA, importing ``glmkit.kernels`` switched Triton to
its CPU interpreter, so the same code runs on a laptop (slowly, in numpy) and natively on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program for scale_add. A power of two (tl.arange needs one); 1024 keeps a GPU's
# memory pipe busy and stays cheap under the interpreter, which runs each program as numpy ops.
SCALE_ADD_BLOCK = 1024


@triton.jit
def _scale_add_kernel(x_ptr, b_ptr, y_ptr, a, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # which block am I? 0 .. cdiv(n, BLOCK) - 1
    offs = pid * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] element indices of my block
    mask = offs < n  # False past the end (only in the last block)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # fp16/bf16 in memory, fp32 maths
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = a * x + b  # in registers: one read of x and b, one write of y
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_softmax_kernel(x_ptr, y_ptr, n_cols, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # one program per row
    cols = tl.arange(0, BLOCK)  # BLOCK >= n_cols: the whole row fits in one block
    mask = cols < n_cols
    # Masked lanes load -inf: exp(-inf) = 0, so they add nothing to the sum and never win the max.
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)  # subtract the row max: exp never overflows
    e = tl.exp(x)
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def scale_add_reference(x: torch.Tensor, b: torch.Tensor, a: float) -> torch.Tensor:
    """y = a * x + b in plain torch (the reference the kernel is tested against)."""
    return a * x + b


def row_softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, computed in fp32, returned in x's dtype."""
    return torch.softmax(x.float(), dim=-1).to(x.dtype)


def _check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(like)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != like.shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must match the input: shape {tuple(like.shape)}, {like.dtype} on {like.device}; "
            f"got {tuple(out.shape)}, {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def scale_add(
    x: torch.Tensor, b: torch.Tensor, a: float = 1.0, *, out: torch.Tensor | None = None, block: int = SCALE_ADD_BLOCK
) -> torch.Tensor:
    """y = a * x + b with the Triton kernel. x, b: same shape, dtype and device (any shape; flattened).

    a: a Python number. out: optional contiguous tensor like x to write into (returned).
    block: elements per program (a power of two); the grid is cdiv(x.numel(), block) programs.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError("x and b must be torch tensors")
    if x.shape != b.shape:
        raise ValueError(f"x and b must have the same shape, got {tuple(x.shape)} and {tuple(b.shape)}")
    if x.dtype != b.dtype or x.device != b.device:
        raise ValueError(f"x and b must share dtype and device, got {x.dtype}/{x.device} and {b.dtype}/{b.device}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(a, torch.Tensor) or not isinstance(a, (int, float)):
        raise TypeError(f"a must be a Python number, got {type(a).__name__}")
    if block <= 0 or block & (block - 1):
        raise ValueError(f"block must be a positive power of two, got {block}")
    x, b = x.contiguous(), b.contiguous()
    y = _check_out(out, x)
    n = x.numel()
    if n == 0:
        return y
    grid = (triton.cdiv(n, block),)
    _scale_add_kernel[grid](x, b, y, float(a), n, BLOCK=block)
    return y


def row_softmax(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the last dim of a 2-D tensor [rows, cols] with the Triton kernel (one program per row).

    out: optional contiguous [rows, cols] tensor like x to write into (returned).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError("x must be a torch tensor")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    x = x.contiguous()
    y = _check_out(out, x)
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return y
    block = triton.next_power_of_2(cols)  # the whole row in one block; the tail lanes are masked
    _row_softmax_kernel[(rows,)](x, y, cols, x.stride(0), y.stride(0), BLOCK=block)
    return y


__all__ = ["scale_add", "scale_add_reference", "row_softmax", "row_softmax_reference", "SCALE_ADD_BLOCK"]
