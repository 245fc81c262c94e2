"""Exercise 03 — a fused RMSNorm forward kernel, in Triton.

RMSNorm (ChatGLM2 onwards; four of them per layer in GLM-4-0414) normalises each row of x [M, N]:

    y[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) · weight          (weight [N])

Unfused, torch makes several passes over x (square, mean, rsqrt, two multiplies), each reading and
writing a full [M, N] tensor. A fused kernel reads each row once and writes it once: one Triton
*program* per row loads the whole row into a block, reduces Σx² in registers, and stores the result.

You write two things, in this file:

1. ``rmsnorm_fwd_kernel`` — the body of the ``@triton.jit`` kernel (one program = one row);
2. ``rms_norm_fwd`` — the launcher: checks nothing fancy, allocates the output, picks the block size,
   launches one program per row, returns the output.

The rules of the game (lesson 00, section 4; lesson 03, section 5):
* N (the hidden size) is rarely a power of two: the block is ``BLOCK_N = triton.next_power_of_2(N)`` lanes
  and the lanes at and beyond N are masked — they must load 0 (so they add nothing to Σx²) and store
  nothing.
* Divide Σx² by **N**, the real row length, not by BLOCK_N.
* Compute in fp32 whatever the input dtype (x² of an fp16 value above 256 overflows fp16), and round
  once, when storing, to the output's dtype (``.to(Y.dtype.element_ty)``).
* The expected answers come from ``glmkit.ops.rmsnorm.rmsnorm_reference``; do not import ``glmkit.ops.rmsnorm`` or
  ``glmkit.kernels.rmsnorm`` here: the grader does not make them importable (such a submission scores zero).

Without a GPU the kernel runs under the Triton interpreter (exact, slow: keep test shapes small). The
lines below select it before triton is imported; on a CUDA machine the same code compiles natively.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

MAX_N = 8192  # a whole row lives in one block; longer rows would need a loop over column blocks


@triton.jit
def rmsnorm_fwd_kernel(
    X,
    W,
    Y,  # pointers: x [M, N], weight [N], y [M, N]
    stride_x,
    stride_y,  # elements between the starts of two consecutive rows of x / of y
    N,  # the row length (hidden size)
    eps,  # added to mean(x²) before the square root
    BLOCK_N: tl.constexpr,  # lanes per program: a power of two >= N
):
    """One program normalises one row: row = tl.program_id(0).

    Load x[row, :N] and weight[:N] as fp32 (masked lanes read 0.0), compute
    rstd = 1 / sqrt(Σx² / N + eps), store x · rstd · w into y[row, :N] (masked), in y's dtype.
    """
    # BEGIN SOLUTION
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 on big inputs
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N  # the ragged edge: lanes N..BLOCK_N-1 do nothing
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    # END SOLUTION


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of each row of x with the fused kernel.

    x:      [M, N] float32, float16 or bfloat16, 1 <= N <= MAX_N (M may be 0).
    weight: [N], any float dtype (read as fp32 in the kernel).
    eps:    a float >= 0, passed to the kernel (do not hard-code 1e-5).
    out:    optional [M, N] tensor of x's dtype to write into (the checks pass one filled with NaN: every
            element must be written); None = allocate a new one.
    Returns y [M, N] in x's dtype (``out`` itself when it is given).

    Steps: make x's rows contiguous in memory if they are not (``x.stride(1) != 1``); allocate ``out``;
    BLOCK_N = triton.next_power_of_2(N); launch ``rmsnorm_fwd_kernel[(M,)](...)`` with the row strides
    ``x.stride(0)`` and ``out.stride(0)``; return ``out``.
    """
    # BEGIN SOLUTION
    if x.dim() != 2 or not 1 <= x.shape[1] <= MAX_N:
        raise ValueError(f"x must be [M, N] with 1 <= N <= {MAX_N}, got {tuple(x.shape)}")
    if weight.shape != (x.shape[1],):
        raise ValueError(f"weight must be [N] = [{x.shape[1]}], got {tuple(weight.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    M, N = x.shape
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if M > 0:
        rmsnorm_fwd_kernel[(M,)](
            x, weight.contiguous(), out, x.stride(0), out.stride(0), N, float(eps), BLOCK_N=triton.next_power_of_2(N)
        )
    return out
    # END SOLUTION
