"""Exercise 09 — mHC: Sinkhorn-Knopp, one hyper-connection around a branch, a stack of them, and the pre-mix as a
Triton kernel.

Lesson 09 introduced GLM-5.3-Flash's manifold-constrained hyper-connections (mHC; HF ``glm5_next``): the residual
stream widened into N = ``hc_mult`` parallel streams X [B, T, N, d]. Around each branch F (a mixer, an FFN) the
hyper-connection computes, per token and from the token's own streams, three sets of weights:

    z             = rmsnorm(flatten(X))                      [B, T, N·d]  fp32, no gain, eps = norm_eps
    a             = z @ fnᵀ                                  [B, T, (2 + N)·N]   fn [(2 + N)·N, N·d]
    a_pre, a_post, a_comb = the first N, the next N, the last N·N entries of a   (base split the same way)
    pre  = sigmoid(scale[0] · a_pre  + base_pre) + eps       [B, T, N]     how much each stream feeds F
    post = 2 · sigmoid(scale[1] · a_post + base_post)        [B, T, N]     how much of F's output each stream gets
    comb = sinkhorn(softmax_rows(scale[2] · a_comb + base_comb) + eps)   [B, T, N, N]  (a_comb read row by row)

and then

    x     = Σ_i pre_i · X_i                                  [B, T, d]     the pre-mix: a weighted SUM of streams
    X'_j  = Σ_i comb_ij · X_i  +  post_j · F(x)              [B, T, N, d]  comb mixes, post writes F(x) back

1. ``sinkhorn(m, iters, eps)`` — Sinkhorn-Knopp in glm5_next's order: divide by the column sums (+ eps) first, then
   ``iters − 1`` rounds of (row sums + eps, column sums + eps). m [..., N, N] positive (or zero), any N >= 1.
2. ``hc_weights(streams, fn, base, scale, iters, eps, norm_eps)`` — (pre, post, comb) as above, in float32.
3. ``hyper_connection(streams, w, fn, base, scale, iters, eps, norm_eps)`` — X' above, with the given ``branch``
   (``branch(x, w)``: a stand-in for the mixer or FFN) as F.
4. ``hc_stack(x, ws, fns, bases, scales, n, iters, eps, norm_eps)`` — a decoder's residual path: x [B, T, d] expanded
   into n identical streams, one hyper-connection per layer, and the streams merged back into one [B, T, d] by
   their MEAN (glm5_next's ``hc_head``: the mean is what a plain residual would carry if every post_j were 1).
5. The pre-mix in Triton: ``premix_kernel`` computes x = Σ_i pre_i · X_i for one token and one block of columns per
   program, and ``premix_triton`` launches it.

The notebook ex09.ipynb walks through each part; write the functions here, then run ``self_check()`` there (or
``python -m glmkit.grading check`` in this folder). Do not import ``glmkit.mhc`` or ``glmkit.models``: they are the
references you are re-implementing, and the grader does not make them importable (such a submission scores zero).
torch, triton and plain Python are fine.

Without a GPU the kernel runs under the Triton interpreter (exact, slow: keep test shapes small). The lines below
select it before triton is imported; on a CUDA machine the same code compiles natively.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BLOCK_D = 32  # columns of the pre-mix per kernel program


def branch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Given: the branch F of parts 3 and 4, x [..., d] → [..., d] (a stand-in for a mixer or an FFN)."""
    return torch.tanh(x @ w)


# ----------------------------------------------------------------------------------------------------
# Part 1 — Sinkhorn-Knopp
# ----------------------------------------------------------------------------------------------------


def sinkhorn(m: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """Sinkhorn-Knopp in glm5_next's order. m [..., N, N] non-negative (a softmax over rows plus eps, in mHC);
    iters >= 1. First divide every column by its sum + eps; then, ``iters - 1`` times, every row by its sum + eps
    and every column by its sum + eps. Returns [..., N, N] (a new tensor; m is left unchanged). A column or row of
    zeros must stay zeros (that is what eps is for), never NaN."""
    # BEGIN SOLUTION
    out = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns first
    for _ in range(1, iters):
        out = out / (out.sum(dim=-1, keepdim=True) + eps)  # rows
        out = out / (out.sum(dim=-2, keepdim=True) + eps)  # columns
    return out
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 2 — the weights of one hyper-connection
# ----------------------------------------------------------------------------------------------------


def hc_weights(
    streams: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """streams [..., N, d]; fn [(2 + N)·N, N·d]; base [(2 + N)·N]; scale [3] (pre, post, comb).
    Returns (pre [..., N], post [..., N], comb [..., N, N]), all float32 whatever the streams' dtype: the module
    docstring's equations. The RMSNorm has no gain: z · rsqrt(mean(z²) + norm_eps) over the N·d entries."""
    # BEGIN SOLUTION
    n = streams.shape[-2]
    z = streams.flatten(-2).float()
    z = z * torch.rsqrt(z.pow(2).mean(dim=-1, keepdim=True) + norm_eps)  # RMSNorm without a gain
    logits = z @ fn.float().t()  # [..., (2 + N)·N]
    a_pre, a_post, a_comb = logits.split([n, n, n * n], dim=-1)
    b_pre, b_post, b_comb = base.float().split([n, n, n * n])
    pre = torch.sigmoid(scale[0] * a_pre + b_pre) + eps
    post = 2.0 * torch.sigmoid(scale[1] * a_post + b_post)
    comb = torch.softmax((scale[2] * a_comb + b_comb).unflatten(-1, (n, n)), dim=-1) + eps
    return pre, post, sinkhorn(comb, iters, eps)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 3 — one hyper-connection around a branch
# ----------------------------------------------------------------------------------------------------


def hyper_connection(
    streams: torch.Tensor,
    w: torch.Tensor,
    fn: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """streams [B, T, N, d] float32 → the new streams [B, T, N, d]: pre-mix the streams into the branch's input x,
    run ``branch(x, w)`` (w [d, d]), mix the streams with comb and write the branch's output back with post
    (X'_j = Σ_i comb_ij X_i + post_j · F(x): mind which index of comb runs over the OLD streams)."""
    # BEGIN SOLUTION
    pre, post, comb = hc_weights(streams, fn, base, scale, iters, eps, norm_eps)
    x = torch.einsum("...i,...id->...d", pre, streams)  # the pre-mix: a weighted SUM over the streams
    h = branch(x, w)
    mixed = torch.einsum("...ij,...id->...jd", comb, streams)  # X'_j = Σ_i comb_ij X_i
    return mixed + post[..., :, None] * h[..., None, :]
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 4 — the residual path of a decoder: expand, L hyper-connections, merge
# ----------------------------------------------------------------------------------------------------


def hc_stack(
    x: torch.Tensor,
    ws: list[torch.Tensor],
    fns: list[torch.Tensor],
    bases: list[torch.Tensor],
    scales: list[torch.Tensor],
    n: int,
    iters: int = 20,
    eps: float = 1e-6,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """x [B, T, d] float32 (the embeddings) → [B, T, d]: n identical copies of x as the streams, then layer l's
    hyper-connection (ws[l], fns[l], bases[l], scales[l]) for l = 0, 1, …, then the streams merged by their mean."""
    # BEGIN SOLUTION
    streams = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
    for w, fn, base, scale in zip(ws, fns, bases, scales):
        streams = hyper_connection(streams, w, fn, base, scale, iters, eps, norm_eps)
    return streams.mean(dim=-2)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 5 — the pre-mix in Triton
# ----------------------------------------------------------------------------------------------------


@triton.jit
def premix_kernel(
    X,  # pointer: the streams [M, N, D], contiguous, float32 or float16 (M = B·T tokens)
    PRE,  # pointer: pre [M, N] float32, contiguous
    OUT,  # pointer: out [M, D] in the streams' dtype (arbitrary values on entry)
    N,  # streams per token (any N >= 1, not a power of two)
    D,  # hidden size (any D >= 1)
    BLOCK_D: tl.constexpr,  # columns per program (a power of two)
):
    """Program (t, c) writes OUT[t, c·BLOCK_D : (c + 1)·BLOCK_D] (the columns < D) = Σ_i PRE[t, i] · X[t, i, cols],
    accumulated in float32 and stored in OUT's dtype. Element (t, i, j) of X is at (t·N + i)·D + j."""
    # BEGIN SOLUTION
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    live = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(N):
        weight = tl.load(PRE + t * N + i)
        row = tl.load(X + (t * N + i) * D + cols, mask=live, other=0.0)
        acc += weight * row.to(tl.float32)
    tl.store(OUT + t * D + cols, acc.to(OUT.dtype.element_ty), mask=live)
    # END SOLUTION


def premix_triton(streams: torch.Tensor, pre: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The pre-mix x = Σ_i pre_i · X_i on the kernel: streams [..., N, d] float32 or float16, pre [..., N] float32
    → x [..., d] in the streams' dtype. out: an optional buffer of that shape and dtype to write into (the checks
    pass one full of NaN: every element must be written).

    Given: the checks of the arguments and the buffer. Yours: the launch — one program per token and per block of
    BLOCK_D columns.
    """
    if streams.dtype not in (torch.float32, torch.float16) or pre.dtype != torch.float32:
        raise TypeError(f"streams must be float32/float16 and pre float32, got {streams.dtype} and {pre.dtype}")
    if streams.dim() < 2 or pre.shape != streams.shape[:-1]:
        raise ValueError(
            f"streams [..., N, d] and pre [..., N] do not match: {tuple(streams.shape)}, {tuple(pre.shape)}"
        )
    streams, pre = streams.contiguous(), pre.contiguous()
    N, D = streams.shape[-2:]
    M = pre.numel() // N
    shape = (*streams.shape[:-2], D)
    if out is None:
        out = torch.empty(shape, dtype=streams.dtype, device=streams.device)
    if tuple(out.shape) != shape or out.dtype != streams.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {list(shape)} {streams.dtype} tensor")
    # BEGIN SOLUTION
    premix_kernel[(M, triton.cdiv(D, BLOCK_D))](streams, pre, out, N, D, BLOCK_D=BLOCK_D)
    # END SOLUTION
    return out
