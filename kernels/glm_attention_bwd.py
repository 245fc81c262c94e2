"""Flash attention backward under GLM's blank-infilling mask: dq, dk, dv from dO and the forward's lse.

What it computes: the gradients of ``glmkit.attention.attention_reference`` (the forward is
``glmkit.kernels.glm_attention``) with respect to q, k and v, for the GLM mask "key j is visible to
query i iff j < sep or j <= i" (sep = 0: causal; sep = T or sep=None: no mask), with grouped-query
attention (H_kv divides H). It differs from its predecessor, the forward kernel, in what it keeps on chip:
the forward keeps a running softmax per query row; the backward never rebuilds a softmax at all, it
recomputes each probability exactly from the row's saved log-sum-exp.

The math (FlashAttention-2, Dao 2023), per head, with S = scale · q kᵀ, P = softmax(S) under the mask,
O = P v and dO the incoming gradient:

    P_ij  = exp(S_ij - lse_i)                (lse from the forward: no max/sum pass needed)
    dv_j  = Σ_i P_ij dO_i
    dP_ij = dO_i · v_j
    dS_ij = P_ij (dP_ij - Δ_i)               Δ_i = Σ_j P_ij dP_ij = dO_i · O_i   (one dot per row)
    dq_i  = scale · Σ_j dS_ij k_j
    dk_j  = scale · Σ_i dS_ij q_i

Three kernels:

1. ``_bwd_preprocess``: Δ = rowsum(dO ⊙ O) in fp32, [B, H, T].
2. ``_bwd_dkdv``: one program per (key block, batch, key/value head). It holds k_j, v_j and the fp32
   accumulators dk_j, dv_j on chip and walks over the query blocks that can see its keys (below). Grouped
   query attention: the program loops over the GROUP = H / H_kv query heads that share its k/v head
   *inside* the program, so dk/dv for a k/v head are summed on chip and written once — no atomics, no
   [B, H, T, D] scratch buffer followed by a reduction, and deterministic results. The price is that
   only B·H_kv·(T/BLOCK_N) programs run; at training shapes (H_kv ≥ 2, T ≥ 2K) that still fills an H200.
3. ``_bwd_dq``: one program per (query block, batch, query head); it walks over the same key blocks
   the forward visits and accumulates dq on chip. Kept separate from (2) rather than fused with atomic
   adds to dq: it recomputes q kᵀ and dO vᵀ once more (2 of the 5 matmuls), but it is deterministic and
   needs no fp32 dq buffer.

Every accumulation is fp32; the matmul inputs are the input dtype (P and dS are rounded to it before
their matmuls, as in the forward). Like the forward, the kernels work in base 2: qk_scale = scale·log2(e)
is folded into the score and lse is converted once, lse₂ = lse · log2(e), so P = exp2(qk·qk_scale - lse₂)
equals exp(scale·qk - lse) exactly as the forward normalised it.

Which query blocks a key block visits (the dk/dv kernel's skipping). Key block [n0, n0+BN); query i sees
key j iff j < sep or i >= j. So the block is seen by every query if it starts inside Part A (n0 < sep),
and otherwise only by queries i >= n0. Query blocks of height BM, top to bottom:

    query i ↓   key block entirely in Part B (n0 >= sep)     key block starting in Part A (n0 < sep)
    0           ·                                             M   (M only if the block crosses sep:
    ...         ·    skipped: i < n0 sees none of the keys    M    rows i < n0+BN-1 may miss the keys
    n0          M    diagonal: element mask                   M    in [sep, n0+BN) beyond them)
    n0+BN-1     M                                             F
    ...         F    fully visible: no mask at all             F
    T-1         M    last partial block: row bound T < ...    M

    lo  = 0 if n0 < sep else n0 rounded down to BM           (· = never loaded, never computed)
    mid = 0 if n0+BN <= sep else n0+BN-1 rounded up to BM    ([lo, mid): masked, M)
    [mid, T rounded down to BM): unmasked (F); the rest, up to T: masked (row bound)
    Keys past T (the last key block, when BN does not divide T) are loaded as zeros; they only feed
    their own rows of dk/dv, which are never stored, so the unmasked loop may include them.

The dq kernel visits, for query block [m0, m0+BM), the key blocks of the forward: [0, full) unmasked
with full = max(sep, m0+1) rounded down to BN, then [full, hi) masked with hi = min(max(sep, m0+BM), T);
keys at [hi, T) are invisible to every row of the block and skipped.

Runs natively on CUDA, and on CPU tensors under the Triton interpreter (``glmkit.kernels`` sets
TRITON_INTERPRET=1 on machines without CUDA). ``glmkit.attention.glm_attention`` calls it through a
``torch.autograd.Function`` when gradients are needed.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

from glmkit.kernels.glm_attention import LOG2E, SUPPORTED_HEAD_DIMS, _check_sep, _t_bucket


@triton.jit
def _bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Δ[b, h, i] = Σ_d dO[b, h, i, d] · O[b, h, i, d], in fp32. Grid: (query blocks, B·H)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
    offs_n, offs_m0, offs_d,
    sep, T, lo, hi, qk_scale,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,        # False: fully visible, in-bounds (query, key) tiles; True: boundary tiles
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dk, dv [BN, D] (fp32) of one key block over query blocks [lo, hi), one query head.

    Works with transposed tiles (keys along rows): pᵀ = exp2(k qᵀ · qk_scale - lse₂) is [BN, BM], so
    dv += pᵀ dO and dk += dsᵀ q need no transposes of the accumulators.
    """
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0                                           # [BM] query rows
        if MASKED:
            rmask = offs_m < T
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rmask[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rmask[:, None], other=0.0)
            lse2 = tl.load(lse_base + offs_m, mask=rmask, other=0.0) * 1.4426950408889634  # · log2(e)
            delta = tl.load(delta_base + offs_m, mask=rmask, other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :])
            lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)         # [BN, BM] raw scores, fp32
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            visible = ((offs_n[:, None] < sep) | (offs_n[:, None] <= offs_m[None, :])) \
                & (offs_m[None, :] < T) & (offs_n[:, None] < T)
            pT = tl.where(visible, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)        # [BN, BM] = (dO vᵀ)ᵀ
        dsT = pT * (dpT - delta[None, :])                                   # masked entries: pT = 0
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _glm_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, SEP, DK, DV,
    scale, qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, H_KV, T, GROUP,
    T_BUCKET,                                   # only an autotune key
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grid: (key blocks, B·H_kv). Key blocks first-to-last: early key blocks are seen by more queries
    # (the causal part), so the heaviest programs start first.
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // H_KV).to(tl.int64)
    kvh = (pid_bkv % H_KV).to(tl.int64)

    sep = tl.load(SEP + b).to(tl.int32)
    sep = tl.minimum(tl.maximum(sep, 0), T)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    nmask = offs_n[:, None] < T
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=nmask, other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=nmask, other=0.0)

    # The query ranges (see the module docstring's picture).
    lo = tl.where(n0 < sep, 0, (n0 // BLOCK_M) * BLOCK_M)
    mid = tl.where(n0 + BLOCK_N <= sep, 0, ((n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    mid = tl.maximum(mid, lo)
    # Whole query blocks end at T rounded down to BM. (Keys past T need no mask here: they are loaded as
    # zeros and only ever feed their own rows of dk/dv, which are never stored.)
    tail = tl.maximum((T // BLOCK_M) * BLOCK_M, mid)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Grouped-query attention: the GROUP query heads reading this k/v head are summed here, on chip.
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * T
        delta_base = DELTA + bh * T
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                              offs_n, offs_m0, offs_d, sep, T, lo, mid, qk_scale,
                              BLOCK_M, True, DOT_PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                              offs_n, offs_m0, offs_d, sep, T, mid, tail, qk_scale,
                              BLOCK_M, False, DOT_PRECISION)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                              offs_n, offs_m0, offs_d, sep, T, tail, T, qk_scale,
                              BLOCK_M, True, DOT_PRECISION)

    dk = dk * scale                                 # dS was taken w.r.t. the scaled scores
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=nmask)
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nmask)


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta,
    k_base, v_base, stride_kt, stride_vt,
    offs_m, offs_n0, offs_d,
    sep, T, lo, hi, qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dq [BM, D] (fp32, unscaled) of one query block over key blocks [lo, hi)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        if MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)          # [BM, BN]
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            visible = ((cols[None, :] < sep) | (cols[None, :] <= offs_m[:, None])) & (cols[None, :] < T)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)         # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _glm_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, SEP, DQ,
    scale, qk_scale,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, GROUP,
    T_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grid: (query blocks, B·H); last query blocks (most keys) first, as in the forward.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP

    sep = tl.load(SEP + b).to(tl.int32)
    sep = tl.minimum(tl.maximum(sep, 0), T)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=rmask[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=rmask[:, None], other=0.0)
    row = pid_bh.to(tl.int64) * T + offs_m
    lse2 = tl.load(LSE + row, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=rmask, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    hi = tl.minimum(tl.maximum(sep, m0 + BLOCK_M), T)
    full = (tl.minimum(tl.maximum(sep, m0 + 1), T) // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0, offs_d,
                    sep, T, 0, full, qk_scale, BLOCK_N, False, DOT_PRECISION)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0, offs_d,
                    sep, T, full, hi, qk_scale, BLOCK_N, True, DOT_PRECISION)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rmask[:, None])


# ---- CUDA: a few configurations per kernel, autotuned on (head dim, T size class, dtype) ----
# The dk/dv kernel keeps k, v, dk, dv ([BN, D] each) on chip and streams small query tiles past them; the
# dq kernel keeps q, dO, dq ([BM, D]) and streams key tiles. Hence "wide resident, narrow streamed" tiles
# (as in FlashAttention-2's Triton backward). Lists from a sweep of each kernel alone on one H200 (bf16,
# causal, T = 8K, B·T = 32K; benchmarks/sweep_kernels.py, figures in
# benchmarks/results/glm_attention_bwd_h200.md), best first: D = 128 dk/dv 64×128 w8 s3 4.72 ms
# (64×128 w4 ran 16 ms: 4 warps spill at D = 128), dq 128×64 w8 s3 2.69 ms; D = 64 dk/dv 64×128 w4 s3
# 5.44 ms, dq 64×64 w4 s3 3.01 ms. The rest are the runners-up within ~10%, kept for other T.
_DKDV_CONFIGS = {  # head dim -> (BLOCK_M streamed, BLOCK_N resident, num_warps, num_stages)
    128: [(64, 128, 8, 3), (64, 128, 8, 4), (128, 128, 8, 2), (32, 64, 4, 3)],
    64: [(64, 128, 4, 3), (32, 64, 4, 3), (32, 64, 4, 4), (128, 128, 8, 3)],
}
_DQ_CONFIGS = {  # head dim -> (BLOCK_M resident, BLOCK_N streamed, num_warps, num_stages)
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 4, 3), (64, 128, 4, 3)],
    64: [(64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3)],
}
_SMALL_D = [(32, 64, 4, 3), (64, 64, 4, 3)]  # D = 16, 32: guesses


def _configs(table):
    seen, cfgs = set(), []
    for lst in list(table.values()) + [_SMALL_D]:
        for bm, bn, w, s in lst:
            if (bm, bn, w, s) not in seen:
                seen.add((bm, bn, w, s))
                cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s))
    return cfgs


def _pruner(table):
    def prune(configs, named_args, **kwargs):
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
        wanted = set(table.get(d, _SMALL_D))
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        return keep or configs[:1]
    return prune


_KEY = ["HEAD_DIM", "T_BUCKET", "DOT_PRECISION", "GROUP"]
# Each kernel writes every element of its output exactly once (no accumulation into the output), so the
# autotuner's repeated launches leave correct results behind.
_dkdv_tuned = triton.autotune(configs=_configs(_DKDV_CONFIGS), key=_KEY,
                              prune_configs_by={"early_config_prune": _pruner(_DKDV_CONFIGS)})(_glm_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(configs=_configs(_DQ_CONFIGS), key=_KEY,
                            prune_configs_by={"early_config_prune": _pruner(_DQ_CONFIGS)})(_glm_attn_bwd_dq_kernel)


def _check_out(name, t, shape, dtype, device):
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or t.stride(-1) != 1:
        raise ValueError(f"{name} must be a {list(shape)} tensor of {dtype} on {device} with contiguous last dim, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t


def glm_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    sep: torch.Tensor | None,
    scale: float | None = None,
    *,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    check: bool = True,
):
    """Flash attention backward under the GLM mask: returns (dq, dk, dv).

    do, q, o [B, H, T, D]; k, v [B, H_kv, T, D] (H % H_kv == 0); one dtype among fp32/fp16/bf16; D in
    {16, 32, 64, 128}; last dim contiguous (otherwise copied). lse [B, H, T] fp32: the forward's natural-log
    log-sum-exp (``glm_attention_fwd(..., return_lse=True)``). sep [B] int Part-A lengths in [0, T], or
    None = no mask. scale: the forward's (default 1/sqrt(D)).
    dq / dk / dv: optional output buffers of q's / k's / v's shape and dtype (tests pass NaN-poisoned ones);
    delta: optional fp32 [B, H, T] scratch for rowsum(dO ⊙ O).
    block_m / block_n: fixed tiles for BOTH kernels (dk/dv: BLOCK_M streamed query rows, BLOCK_N resident
    keys; dq: BLOCK_M resident query rows, BLOCK_N streamed keys); default: autotuned on CUDA for
    fp16/bf16, fixed small tiles for fp32, 16×16 under the interpreter.
    check: validate sep's range (one device→host sync).
    Returns dq [B, H, T, D], dk, dv [B, H_kv, T, D] in the input dtype.
    """
    for name, t in (("do", do), ("q", q), ("k", k), ("v", v), ("o", o)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, T, D], got {getattr(t, 'shape', type(t))}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or any(t.dtype != q.dtype for t in (k, v, o, do)):
        raise TypeError(f"q, k, v, o, do must share one dtype among float32/float16/bfloat16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}, {o.dtype}, {do.dtype}")
    B, H, T, D = q.shape
    if o.shape != q.shape or do.shape != q.shape:
        raise ValueError(f"o and do must have q's shape {tuple(q.shape)}, got {tuple(o.shape)}, {tuple(do.shape)}")
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, H_kv, T, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    H_kv = k.shape[1]
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"q's heads H={H} must be a multiple of k/v's heads H_kv={H_kv}")
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D={D} not supported by the kernel: use one of {SUPPORTED_HEAD_DIMS}")
    if any(t.device != q.device for t in (k, v, o, do, lse)):
        raise ValueError("q, k, v, o, do and lse must be on one device")
    if T == 0 or B == 0 or H == 0:
        raise ValueError(f"empty input: q has shape {tuple(q.shape)}")
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H, T) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be the forward's fp32 [B, H, T] = {(B, H, T)} log-sum-exp, got "
                         f"{getattr(lse, 'dtype', type(lse))} {tuple(getattr(lse, 'shape', ()))}")
    sep = _check_sep(sep, B, T, q.device, check)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    require_kernel_device(q)

    q, k, v, o, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, o, do))
    lse, sep = lse.contiguous(), sep.contiguous()
    dq = _check_out("dq", dq, (B, H, T, D), q.dtype, q.device)
    dk = _check_out("dk", dk, (B, H_kv, T, D), q.dtype, q.device)
    dv = _check_out("dv", dv, (B, H_kv, T, D), q.dtype, q.device)
    if delta is None:
        delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    elif delta.shape != (B, H, T) or delta.dtype != torch.float32 or not delta.is_contiguous():
        raise ValueError(f"delta must be a contiguous fp32 [B, H, T] = {(B, H, T)} tensor")

    interp = q.device.type != "cuda"
    pre_bm = 16 if interp else 128
    _bwd_preprocess[(triton.cdiv(T, pre_bm), B * H)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        H, T, HEAD_DIM=D, BLOCK_M=pre_bm, **({} if interp else dict(num_warps=4)),
    )

    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact fp32 dots, not TF32
    common = (scale, scale * LOG2E,
              q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              do.stride(0), do.stride(1), do.stride(2))
    dkdv_args = (q, k, v, do, lse, delta, sep, dk, dv, *common,
                 dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                 H, H_kv, T, H // H_kv, _t_bucket(T))
    dq_args = (q, k, v, do, lse, delta, sep, dq, *common,
               dq.stride(0), dq.stride(1), dq.stride(2), H, T, H // H_kv, _t_bucket(T))

    fixed = block_m is not None or block_n is not None or num_warps is not None or num_stages is not None
    if not interp and not fixed and q.dtype != torch.float32:
        _dkdv_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_kv)](
            *dkdv_args, HEAD_DIM=D, DOT_PRECISION=precision)
        _dq_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
            *dq_args, HEAD_DIM=D, DOT_PRECISION=precision)
        return dq, dk, dv

    if interp:
        kd = dict(bm=block_m or 16, bn=block_n or 16)
        kq = dict(kd)
        kw = {}
    else:
        if fixed:
            kd = dict(bm=block_m or 32, bn=block_n or 64)
            kq = dict(bm=block_m or 64, bn=block_n or 32)
        else:  # fp32 on CUDA: small tiles, the checking dtype
            kd, kq = dict(bm=16, bn=32), dict(bm=32, bn=16)
        kw = dict(num_warps=num_warps or 4, num_stages=num_stages or (1 if q.dtype == torch.float32 else 3))
    for cfg in (kd, kq):
        for name, val in (("block_m", cfg["bm"]), ("block_n", cfg["bn"])):
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {val}")
    _glm_attn_bwd_dkdv_kernel[(triton.cdiv(T, kd["bn"]), B * H_kv)](
        *dkdv_args, HEAD_DIM=D, BLOCK_M=kd["bm"], BLOCK_N=kd["bn"], DOT_PRECISION=precision, **kw)
    _glm_attn_bwd_dq_kernel[(triton.cdiv(T, kq["bm"]), B * H)](
        *dq_args, HEAD_DIM=D, BLOCK_M=kq["bm"], BLOCK_N=kq["bn"], DOT_PRECISION=precision, **kw)
    return dq, dk, dv


def bwd_flops(T: int, D: int, sep: int, B: int = 1, H: int = 1) -> int:
    """FLOPs charged to the backward by convention: 2.5 × the forward's 4·D·(visible pairs) per head
    (five T×T×D matmuls against the forward's two)."""
    from glmkit.kernels.glm_attention import visible_pairs

    return int(2.5 * 4 * D * visible_pairs(T, sep) * B * H)
