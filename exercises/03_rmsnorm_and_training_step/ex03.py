"""Exercise 03 — fused RMSNorm in Triton, forward and backward; and the optimizer side of a training step.

RMSNorm (ChatGLM2 onwards; four of them per layer in GLM-4-0414) normalises each row of x [M, N]:

    y[r, :] = x[r, :] / sqrt(mean(x[r, :]²) + eps) · weight          (weight [N])

Unfused, torch makes several passes over x (square, mean, rsqrt, two multiplies), each reading and
writing a full [M, N] tensor. A fused kernel reads each row once and writes it once: one Triton
*program* per row loads the whole row into a block, reduces Σx² in registers, and stores the result.

You write, in rising order of difficulty:

1. ``rmsnorm_fwd_kernel`` and its launcher ``rms_norm_fwd`` — one program per row: load the row, reduce Σx²
   in registers, store the normalised row;
2. ``rmsnorm_bwd_kernel`` and ``rms_norm_bwd`` — the backward lesson 03 derived but did not write: with
   rstd = 1/sqrt(mean(x²) + eps), x̂ = x·rstd and g = dy·w,

       dx = rstd · (g − x̂ · mean(g · x̂))        per row
       dw = Σ_rows dy · x̂                         a sum over ALL rows

   one program per row writes its dx row and its row of dy·x̂ into a [M, N] fp32 buffer of partial sums,
   which the launcher then sums over rows (no atomics: the result does not depend on the order programs run);
3. ``adamw_step`` — what ``glmkit.train.train`` does after ``loss.backward()`` and lesson 03's short loop left to
   ``torch.optim``: the learning rate of this step (linear warm-up, then cosine decay), clipping the gradients
   by their GLOBAL norm, and the AdamW update with decoupled weight decay on matrices only, written by hand.

The rules of the game (lesson 00, section 4; lesson 03, section 5):
* N (the hidden size) is rarely a power of two: the block is ``BLOCK_N = triton.next_power_of_2(N)`` lanes
  and the lanes at and beyond N are masked — they must load 0 (so they add nothing to Σx²) and store
  nothing.
* Divide Σx² by **N**, the real row length, not by BLOCK_N.
* Compute in fp32 whatever the input dtype (x² of an fp16 value above 256 overflows fp16), and round
  once, when storing, to the output's dtype (``.to(Y.dtype.element_ty)``).
* The expected answers come from ``glmkit.ops.rmsnorm.rmsnorm_reference`` (and autograd through it) and from
  ``torch.optim.AdamW``; do not import glmkit here: the grader refuses it (such a submission scores zero).

Without a GPU the kernel runs under the Triton interpreter (exact, slow: keep test shapes small). The
lines below select it before triton is imported; on a CUDA machine the same code compiles natively.
"""

from __future__ import annotations

import math
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


# ----------------------------------------------------------------------------------------------------
# Part 2 — the backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def rmsnorm_bwd_kernel(
    DY,
    X,
    W,
    DX,
    DW_PARTIAL,  # pointers: dy [M, N], x [M, N], weight [N], dx [M, N], partial dw [M, N] fp32
    stride,  # elements between two consecutive rows (the same for dy, x, dx and the partial buffer)
    N,
    eps,
    BLOCK_N: tl.constexpr,
):
    """One program per row: recompute rstd from x, then store dx[row, :N] (in dx's dtype) and
    DW_PARTIAL[row, :N] = dy · x̂ (fp32). Masked lanes load 0 and store nothing; fp32 arithmetic."""
    # BEGIN SOLUTION
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    xhat = x * rstd
    g = dy * w
    dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / N))
    tl.store(DX + row * stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + row * stride + cols, dy * xhat, mask=mask)
    # END SOLUTION


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``rms_norm_fwd(x, weight, eps)`` given dy = dL/dy.

    dy, x: [M, N] of one float dtype (contiguous), weight [N]; 1 <= N <= MAX_N, M >= 1.
    Returns ``(dx [M, N] in x's dtype, dw [N] float32)``: allocate dx and a [M, N] float32 buffer of partial
    dw rows, launch ``rmsnorm_bwd_kernel`` on one program per row, and return dw as the buffer's sum over rows.
    """
    # BEGIN SOLUTION
    dy, x = dy.contiguous(), x.contiguous()
    M, N = x.shape
    dx = torch.empty_like(x)
    partial = torch.empty(M, N, dtype=torch.float32, device=x.device)
    rmsnorm_bwd_kernel[(M,)](
        dy, x, weight.contiguous(), dx, partial, x.stride(0), N, float(eps), BLOCK_N=triton.next_power_of_2(N)
    )
    return dx, partial.sum(dim=0)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 3 — the optimizer side of a training step (plain torch)
# ----------------------------------------------------------------------------------------------------


def lr_at(step: int, lr: float, warmup: int, total: int, min_lr_ratio: float) -> float:
    """The learning rate of update number ``step`` (0-based): linear warm-up lr·(step + 1)/warmup for
    step < warmup; then cosine decay from lr to lr·min_lr_ratio over the remaining total − warmup updates:
    floor + (lr − floor)·(1 + cos(π·progress))/2, progress = (step − warmup)/(total − warmup), capped at 1."""
    # BEGIN SOLUTION
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # END SOLUTION


def adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    step: int,
    *,
    lr: float,
    warmup: int,
    total: int,
    min_lr_ratio: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    max_grad_norm: float = 1.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], float, float]:
    """One optimizer update of ``params`` (float32 tensors) from their ``grads``, as glmkit's trainer does it.

    1. lr_t = lr_at(step, lr, warmup, total, min_lr_ratio).
    2. Clip: total = sqrt(Σ over ALL grads of Σ g²); if total > max_grad_norm, every gradient is multiplied
       by max_grad_norm / (total + 1e-6) (the same factor for all, as torch.nn.utils.clip_grad_norm_).
    3. AdamW for each parameter p with (clipped) gradient g, with t = step + 1:
         p ← p · (1 − lr_t · wd)      wd = weight_decay for matrices (p.dim() >= 2), 0 for vectors (biases,
                                        norm gains): decoupled decay, applied to p, never added to g
         m ← β1·m + (1 − β1)·g ;  v ← β2·v + (1 − β2)·g²
         p ← p − lr_t · (m / (1 − β1^t)) / (sqrt(v / (1 − β2^t)) + eps)
    exp_avg, exp_avg_sq: m and v before this update (zeros before the first one).
    Returns ``(new params, new exp_avg, new exp_avg_sq, lr_t, total)`` — new tensors (lists in the same
    order), the learning rate used and the gradient norm BEFORE clipping.
    """
    # BEGIN SOLUTION
    lr_t = lr_at(step, lr, warmup, total, min_lr_ratio)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    scale = max_grad_norm / (norm + 1e-6) if norm > max_grad_norm else 1.0
    b1, b2 = betas
    t = step + 1
    new_p, new_m, new_v = [], [], []
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        g = g * scale
        wd = weight_decay if p.dim() >= 2 else 0.0
        p = p * (1 - lr_t * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        denom = (v / (1 - b2**t)).sqrt() + eps
        p = p - lr_t * (m / (1 - b1**t)) / denom
        new_p.append(p)
        new_m.append(m)
        new_v.append(v)
    return new_p, new_m, new_v, lr_t, norm
    # END SOLUTION
