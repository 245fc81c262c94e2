"""Fused partial RoPE on q and k, both pairings, in place or out of place, forward and backward
(lesson 02's kernel).

What it computes: ``glmkit.ops.rope.rope_reference`` for q [B, H, T, D] and k [B, H_kv, T, D] in one
launch: the first R = rotary_dim dims of every head are rotated pairwise by the angles whose cos/sin
are given ([T, R/2] or [B, T, R/2], one entry per frequency), the last D - R dims pass through.
Compared with its predecessors in the lineage: GLM-2021 *added* learned position embeddings once, at
the input; ChatGLM-6B rotated both halves of each head (by position and by block position); ChatGLM2
onwards rotates only the first half, which is what this kernel is for (R = D recovers full RoPE).

Pairings (``INTERLEAVED`` constexpr): plane i is (x[2i], x[2i+1]) — ChatGLM2/3, GLM-4 — or
(x[i], x[i + R/2]) — GLM-4.5, GPT-NeoX. Rotation of a plane by angle a:

    x1' = x1·cos a - x2·sin a,      x2' = x2·cos a + x1·sin a

Grid: (T blocks, B, H + H_kv). A program loads one [BLOCK_T, R/2] tile of cos/sin, then rotates one
head's [BLOCK_T, R] slice of q (program head index < H) or of k (the rest) — q and k share the tile
loads, and one launch serves both (``HEADS`` > 1 lets a program rotate several heads with one cos/sin
tile). Each row's R rotary dims are read and written as one contiguous run (16-byte vector
accesses): the interleaved pairs are separated in registers, not by stride-2 loads — those ran 7× slower
on an H200 (0.5 TB/s against 3.5). Out of place, the program also copies the pass-through dims; in
place it leaves them alone, so in-place RoPE touches only R/D of the tensor.

Backward: a rotation is orthogonal, so its transpose is its inverse — the rotation by -a. dq and dk are
the same kernel with sin negated (``INVERSE``); the pass-through dims' gradient passes through.

Inputs may be strided views (e.g. q = qkv.view(B, T, H, D).transpose(1, 2)) as long as the last dim is
contiguous. Runs natively on CUDA and under the Triton interpreter on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

# CUDA launch defaults (rows of T per program, warps, heads per program). Measured on one H200, bf16,
# out of place, B·T = 16K, D = 128, R = 64 (benchmarks/sweep_kernels.py): every block_t in 16-128 with 4-8
# warps ran at 3.3-3.9 TB/s (copy: 4.16 TB/s); more heads per program (sharing the cos/sin tile) was
# 1-6% slower. 64 rows × 8 warps was at the top for both pairings.
_DEFAULT_BLOCK_T, _DEFAULT_WARPS, _DEFAULT_HEADS = 64, 8, 1


@triton.jit
def _rotate_head(
    X,
    O,
    stride_xt,
    stride_ot,
    c,
    s,
    offs_t,
    T,
    D,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_PASS: tl.constexpr,
):
    """Rotate one head's [BLOCK_T, R] tile of X (base pointer of that (b, h)) into O.

    Every load and store is a contiguous run of each row (16-byte vector accesses on the GPU): the
    interleaved planes (x[2i], x[2i+1]) are split apart in registers (reshape to [.., R/2, 2] + split),
    not gathered with a stride-2 access, and joined back the same way before the store."""
    tmask = offs_t[:, None] < T
    rows_x = X + offs_t[:, None] * stride_xt
    rows_o = O + offs_t[:, None] * stride_ot
    if INTERLEAVED:
        offs_r = tl.arange(0, 2 * BLOCK_HALF)
        rmask = tmask & (offs_r[None, :] < 2 * HALF)
        x = tl.load(rows_x + offs_r[None, :], mask=rmask, other=0.0).to(tl.float32)  # [BT, R] as stored
        x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, BLOCK_HALF, 2]))  # even, odd dims
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        o = tl.reshape(tl.join(o1, o2), [BLOCK_T, 2 * BLOCK_HALF])
        tl.store(rows_o + offs_r[None, :], o.to(O.dtype.element_ty), mask=rmask)
    else:
        offs_h = tl.arange(0, BLOCK_HALF)
        hmask = tmask & (offs_h[None, :] < HALF)
        x1 = tl.load(rows_x + offs_h[None, :], mask=hmask, other=0.0).to(tl.float32)
        x2 = tl.load(rows_x + HALF + offs_h[None, :], mask=hmask, other=0.0).to(tl.float32)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        tl.store(rows_o + offs_h[None, :], o1.to(O.dtype.element_ty), mask=hmask)
        tl.store(rows_o + HALF + offs_h[None, :], o2.to(O.dtype.element_ty), mask=hmask)
    if COPY_PASS:
        offs_p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = tmask & (offs_p[None, :] < D)
        xp = tl.load(rows_x + offs_p[None, :], mask=pmask, other=0.0)
        tl.store(rows_o + offs_p[None, :], xp.to(O.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sqo_b,
    sqo_h,
    sqo_t,
    sko_b,
    sko_h,
    sko_t,
    sc_b,
    sc_t,  # cos/sin strides; sc_b = 0 when one table serves the whole batch
    T,
    H,
    H_KV,
    D,
    HALF: tl.constexpr,  # R / 2: rotated planes per head
    BLOCK_HALF: tl.constexpr,  # next power of two >= HALF
    BLOCK_T: tl.constexpr,
    BLOCK_PASS: tl.constexpr,  # next power of two >= D - R (unused unless COPY_PASS)
    HEADS: tl.constexpr,  # heads per program: the cos/sin tile is loaded once for all of them
    INTERLEAVED: tl.constexpr,
    COPY_PASS: tl.constexpr,
    INVERSE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h0 = tl.program_id(2) * HEADS
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.arange(0, BLOCK_HALF)
    mask = (offs_t[:, None] < T) & (offs_h[None, :] < HALF)
    cs_off = b * sc_b + offs_t[:, None] * sc_t + offs_h[None, :]
    c = tl.load(COS + cs_off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + cs_off, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    for i in tl.static_range(HEADS):
        h = (h0 + i).to(tl.int64)
        if h < H:
            _rotate_head(
                Q + b * sq_b + h * sq_h,
                QO + b * sqo_b + h * sqo_h,
                sq_t,
                sqo_t,
                c,
                s,
                offs_t,
                T,
                D,
                HALF,
                BLOCK_HALF,
                BLOCK_T,
                BLOCK_PASS,
                INTERLEAVED,
                COPY_PASS,
            )
        elif h < H + H_KV:
            hk = h - H
            _rotate_head(
                K + b * sk_b + hk * sk_h,
                KO + b * sko_b + hk * sko_h,
                sk_t,
                sko_t,
                c,
                s,
                offs_t,
                T,
                D,
                HALF,
                BLOCK_HALF,
                BLOCK_T,
                BLOCK_PASS,
                INTERLEAVED,
                COPY_PASS,
            )


def rope_fwd(
    q, k, cos, sin, rotary_dim: int, pairing: str = "interleaved", inplace: bool = False, inverse: bool = False
):
    """Partial RoPE on q [B, H, T, D] and k [B, H_kv, T, D] (or None) in one launch. cos, sin [T, R/2] or
    [B, T, R/2] (read as fp32), R = rotary_dim. inplace: rotate q and k where they are (last dim contiguous)
    and return them; otherwise new tensors. inverse: rotate by -angle (the backward). Returns (q', k')."""
    require_kernel_device(q)
    B, H, T, D = q.shape
    R = rotary_dim
    if cos.dtype == torch.float64:
        cos, sin = cos.float(), sin.float()
    cos, sin = cos.contiguous(), sin.contiguous()  # small tables; one stride set serves both
    sc_b = cos.stride(0) if cos.dim() == 3 else 0
    if inplace:
        qo, ko = q, k
    else:
        q = q if q.stride(-1) == 1 else q.contiguous()
        k = k if k is None or k.stride(-1) == 1 else k.contiguous()
        qo = torch.empty_like(q, memory_format=torch.contiguous_format)
        ko = None if k is None else torch.empty_like(k, memory_format=torch.contiguous_format)
    H_kv = 0 if k is None else k.shape[1]
    if B * T * (H + H_kv) == 0:
        return qo, ko
    kk, kko = (q, qo) if k is None else (k, ko)  # unused pointers when H_kv = 0
    half = R // 2
    interp = q.device.type != "cuda"
    block_t = min(16 if interp else _DEFAULT_BLOCK_T, triton.next_power_of_2(T))
    heads = min(1 if interp else _DEFAULT_HEADS, H + H_kv)
    grid = (triton.cdiv(T, block_t), B, triton.cdiv(H + H_kv, heads))
    _rope_kernel[grid](
        q,
        kk,
        qo,
        kko,
        cos,
        sin,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        kk.stride(0),
        kk.stride(1),
        kk.stride(2),
        qo.stride(0),
        qo.stride(1),
        qo.stride(2),
        kko.stride(0),
        kko.stride(1),
        kko.stride(2),
        sc_b,
        cos.stride(-2),
        T,
        H,
        H_kv,
        D,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_T=block_t,
        BLOCK_PASS=triton.next_power_of_2(D - R) if R < D else 1,
        HEADS=heads,
        INTERLEAVED=(pairing == "interleaved"),
        COPY_PASS=(not inplace) and R < D,
        INVERSE=inverse,
        **({} if interp else {"num_warps": _DEFAULT_WARPS}),
    )
    return qo, ko
