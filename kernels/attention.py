"""Flash attention under GLM's blank-infilling mask, forward and backward (lessons 01-03): the kernels of
``glmkit.ops.attention``, whose ``attention_reference`` is the definition they are tested against.

What it computes: softmax(scale · q kᵀ + mask) v with the GLM mask "key j is visible to query i iff j < sep
(Part A) or j <= i (causal Part B)", ``sep`` being each sample's Part-A length (0: causal; T: no mask), with
grouped-query attention (query head h reads k/v head h // (H / H_kv)). It differs from the causal flash
attention of GPT-style models in one place: the visible region of a query block is not a triangle but a
triangle *plus a rectangle* (all of Part A), whose width changes from sample to sample, so each program loads
its sample's ``sep``.

Forward. How (FlashAttention, Dao et al. 2022): one program owns BLOCK_M query rows of one (batch, head). It
walks over key/value blocks of BLOCK_N columns, keeping for each row a running max ``m``, a running
softmax denominator ``l`` and an unnormalised output ``acc``; when a new block raises the max, the old
``l`` and ``acc`` are rescaled by exp(m_old - m_new). Scores never leave the chip: memory traffic is
O(T·D) per head instead of O(T²).

Which key blocks a query block visits (the point of the lesson). Query rows [m0, m0+BM), one sample with
Part-A length sep; key blocks of width BN, left to right:

        key j →   0        sep                      T
                  |        |                        |
    rows in A     FFFFFFFFFP.........................     visit [0, sep):   full blocks, then one partial
    (m0+BM<=sep)                                          block if sep is not a multiple of BN
    rows in B     FFFFFFFFFFFFFFFFFFFFDD..............    visit [0, m0+BM): full blocks up to the
    (m0 >= sep)                       ^ diagonal          diagonal, then the diagonal blocks (masked)

    F = fully visible block: no mask computed at all (phase 1, the fast loop)
    P, D = boundary blocks (Part-A edge, diagonal, or the end of the sequence): element mask applied
    . = fully masked blocks: never loaded, never computed. Skipping them is what makes the kernel do
        only the ~(sep² + (T² - sep²)/2) / T² share of dense work the mask allows.

So for query block [m0, m0+BM): keys visible to some row = [0, hi) with hi = min(max(sep, m0+BM), T);
keys visible to every row (fully visible blocks) = [0, full) with full = max(sep, m0+1) rounded down to a
multiple of BN (and never past the last whole block of T). Phase 1 loops over [0, full) without masks;
phase 2 loops over [full, hi) with the element mask (j < sep or j <= i) and the j < T bound.

No row ever has all of its keys masked: key j = 0 satisfies j <= i for every row, and phase 1 or 2
always starts at key 0, so after the first block every row's running max is finite, and later fully
masked entries contribute exp2(-inf) = 0. There is no 0/0 to guard against.

Backward. The math (FlashAttention-2, Dao 2023), per head, with S = scale · q kᵀ, P = softmax(S) under the mask,
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

Head dims: q and k share ``HEAD_DIM``; v and the output have their own ``HEAD_DIM_V``. Equal for every GQA model
of the lineage; MLA (GLM-4.7-Flash, GLM-5: q·k = 192 + 64, v = 256; DeepSeek-V3: 128 + 64 and 128) lets them
differ, so the kernels carry two sizes rather than a second copy of themselves for MLA: the score matmuls run
over HEAD_DIM, the P·V matmul, the output, dO and Δ over HEAD_DIM_V. Each must be a power of two (16 to 256;
``SUPPORTED_HEAD_DIMS``); 192 is not one, so DeepSeek-V3's shape runs the torch path.

Launchers: ``attention_fwd`` (o, and the log-sum-exp the backward needs) and ``attention_bwd`` (dq, dk, dv).
They expect arguments ``glmkit.ops.attention`` has validated. Runs natively on CUDA (autotuned tiles for
fp16/bf16, fixed small tiles for fp32, the checking dtype) and on CPU tensors under the Triton interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

# exp(x) = 2^(x · log2(e)): the kernels work with exp2 (one MUFU.EX2 instruction on NVIDIA GPUs), so
# log2(e) is folded into the softmax scale once, on the host, instead of multiplying every score.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453  # converts the kernel's log2-domain log-sum-exp back to natural log

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)  # of q·k and of v, each (they may differ: MLA)


# ================================================ forward ================================================
@triton.jit
def _attend_blocks(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_n,
    offs_d,
    offs_dv,
    sep,
    T,
    lo,
    hi,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # False: fully visible, in-bounds blocks (phase 1); True: boundary blocks
    DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) over key blocks [lo, hi), in steps of BLOCK_N.

    Scores stay raw (q·k) until one fused multiply-add turns them into the exp2 argument:
    p = exp2(qk · qk_scale - m), with m kept in the scaled (log2) domain. The max of the raw scores times
    qk_scale is the max of the scaled ones because qk_scale > 0.
    """
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n  # [BN] key indices
        if MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN] raw scores, fp32
        if MASKED:
            visible = ((cols[None, :] < sep) | (cols[None, :] <= offs_m[:, None])) & (cols[None, :] < T)
            s = tl.where(visible, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite from the first block on (key 0 is visible)
            p = tl.math.exp2(s - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_dv[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_dv[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    SEP,
    O,
    LSE,
    qk_scale,  # softmax scale · log2(e)
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_ob,
    stride_oh,
    stride_ot,
    H,
    T,
    GROUP,  # GROUP = H // H_kv query heads per key/value head
    T_BUCKET,  # only an autotune key (T rounded up to a size class)
    HEAD_DIM: tl.constexpr,  # of q and k
    HEAD_DIM_V: tl.constexpr,  # of v and the output (MLA: may differ from HEAD_DIM)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    # Grid: (query blocks, B·H). Query blocks are taken last-to-first: later blocks of a sample see more
    # keys (the causal part grows), so launching the heaviest programs first shortens the tail.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP  # grouped-query attention: the shared k/v head

    sep = tl.load(SEP + b).to(tl.int32)
    sep = tl.minimum(tl.maximum(sep, 0), T)  # out-of-range values act as the nearest bound

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)

    # Keys visible to SOME row of this block: [0, hi). Keys visible to EVERY row, whole blocks only: [0, full).
    hi = tl.minimum(tl.maximum(sep, m0 + BLOCK_M), T)
    full = (tl.minimum(tl.maximum(sep, m0 + 1), T) // BLOCK_N) * BLOCK_N
    # Phase 1: fully visible blocks, no mask, no bounds checks.
    acc, l_i, m_i = _attend_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        sep,
        T,
        0,
        full,
        qk_scale,
        BLOCK_N,
        False,
        DOT_PRECISION,
    )
    # Phase 2: boundary blocks (Part-A edge, diagonal, end of sequence) with the element mask.
    acc, l_i, m_i = _attend_blocks(
        acc,
        l_i,
        m_i,
        q,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n,
        offs_d,
        offs_dv,
        sep,
        T,
        full,
        hi,
        qk_scale,
        BLOCK_N,
        True,
        DOT_PRECISION,
    )
    # Blocks at [hi, T) are fully masked for every row here: skipped.

    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    if STORE_LSE:
        # natural-log log-sum-exp of the scaled scores: log Σ_j exp(scale · q_i·k_j), for the backward
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # · ln(2) (= LN2 above)
        tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


# Measured on one H200 (benchmarks/results/glm_attention_h200_sweep.md, bf16, T = 8K): for D = 128,
# 128×128 tiles with 8 warps and 3 stages led (482 TFLOP/s), 128×64 close behind (473-478); for D = 64,
# 128×64 with 8 warps and 4 stages led (428), and 64×64 with 4 warps won the autotune at T = 2K. 4 warps
# on 128-row tiles at D = 128 was far slower (218-280). D = 16/32 lists are guesses, not measured. D = 256
# (MLA's 192 + 64 q·k and 256 v, GLM-4.7-Flash and GLM-5) is a guess sized for the register file: the [BM, 256]
# fp32 accumulator is 128 registers per thread at BM = 128 with 8 warps, and K/V tiles of 64 × 256 bf16 are 32
# KiB each per pipeline stage (benchmarks/bench_mla.py times it). A table row is chosen by the larger of the two
# head dims. The lists are kept short: each entry costs a compile per autotune key.
_CONFIGS = {  # head dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages)
    256: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
    128: [(128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 8, 3)],
    64: [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 4, 3)],
    16: [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 4, 3)],
}


def _fwd_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for lst in _CONFIGS.values()
        for bm, bn, w, s in lst
    ]


def _widest(named_args, kwargs) -> int:
    """The larger of the q·k and v head dims of a launch: it picks the row of a config table."""
    get = lambda name: kwargs.get(name, named_args.get(name))  # noqa: E731
    return max(get("HEAD_DIM"), get("HEAD_DIM_V") or 0)


def _prune_fwd(configs, named_args, **kwargs):
    wanted = set(_CONFIGS.get(_widest(named_args, kwargs), _CONFIGS[64]))
    keep, seen = [], set()
    for c in configs:
        key = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        if key in wanted and key not in seen:
            seen.add(key)
            keep.append(c)
    return keep or configs[:1]


_attn_fwd_tuned = triton.autotune(
    configs=_fwd_configs(),
    key=["HEAD_DIM", "HEAD_DIM_V", "T_BUCKET", "DOT_PRECISION"],  # tensor dtypes are added to the key by triton
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_attn_fwd_kernel)


def _t_bucket(T: int) -> int:
    """Size class of T for the autotune cache: ≤1K, ≤4K, ≤16K, larger."""
    for b in (1024, 4096, 16384):
        if T <= b:
            return b
    return 1 << 20


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact fp32 dots, not TF32


def _sep_or_full(sep: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    return torch.full((B,), T, dtype=torch.int64, device=device) if sep is None else sep.contiguous()


def attention_fwd(q, k, v, sep, scale: float | None = None, return_lse: bool = False):
    """q [B, H, T, D]; k [B, H_kv, T, D]; v [B, H_kv, T, Dv] (Dv = D, or MLA's own value dim); sep [B] int
    Part-A lengths or None (no mask); scale default 1/sqrt(D). Returns o [B, H, T, Dv] in q's dtype, and with
    ``return_lse`` also lse [B, H, T] fp32 = the natural-log log-sum-exp of each row's visible scaled scores."""
    require_kernel_device(q)
    B, H, T, D = q.shape
    H_kv, Dv = k.shape[1], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    sep = _sep_or_full(sep, B, T, q.device)
    out = torch.empty((B, H, T, Dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device) if return_lse else out  # dummy ptr
    args = (
        q,
        k,
        v,
        sep,
        out,
        lse,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        H,
        T,
        H // H_kv,
        _t_bucket(T),
    )
    consts = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, DOT_PRECISION=_precision(q.dtype), STORE_LSE=return_lse)
    if q.device.type == "cuda" and q.dtype != torch.float32:
        _attn_fwd_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](*args, **consts)
    elif q.device.type == "cuda":  # fp32, the checking dtype: one small fixed config (smaller for 256-wide heads)
        bm, stages = (64, 2) if max(D, Dv) <= 128 else (32, 1)
        _attn_fwd_kernel[(triton.cdiv(T, bm), B * H)](
            *args, BLOCK_M=bm, BLOCK_N=32, num_warps=4, num_stages=stages, **consts
        )
    else:  # interpreter
        _attn_fwd_kernel[(triton.cdiv(T, 16), B * H)](*args, BLOCK_M=16, BLOCK_N=16, **consts)
    return (out, lse) if return_lse else out


def visible_pairs(T: int, sep: int) -> int:
    """Number of (query, key) pairs the GLM mask lets through for one head: rows in Part A see sep keys,
    row i >= sep sees i + 1. FLOPs of the forward = 4 · D · visible_pairs per head."""
    sep = max(0, min(sep, T))
    return sep * sep + (T * (T + 1) - sep * (sep + 1)) // 2


# ================================================ backward ===============================================
@triton.jit
def _bwd_preprocess(
    O,
    DO,
    DELTA,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_dob,
    stride_doh,
    stride_dot,
    H,
    T,
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
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_blocks(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_dot,
    offs_n,
    offs_m0,
    offs_d,
    offs_dv,
    sep,
    T,
    lo,
    hi,
    qk_scale,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,  # False: fully visible, in-bounds (query, key) tiles; True: boundary tiles
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dk, dv [BN, D] (fp32) of one key block over query blocks [lo, hi), one query head.

    Works with transposed tiles (keys along rows): pᵀ = exp2(k qᵀ · qk_scale - lse₂) is [BN, BM], so
    dv += pᵀ dO and dk += dsᵀ q need no transposes of the accumulators.
    """
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0  # [BM] query rows
        if MASKED:
            rmask = offs_m < T
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=rmask[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_dv[None, :], mask=rmask[:, None], other=0.0)
            lse2 = tl.load(lse_base + offs_m, mask=rmask, other=0.0) * 1.4426950408889634  # · log2(e)
            delta = tl.load(delta_base + offs_m, mask=rmask, other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_dv[None, :])
            lse2 = tl.load(lse_base + offs_m) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BN, BM] raw scores, fp32
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
        if MASKED:
            visible = (
                ((offs_n[:, None] < sep) | (offs_n[:, None] <= offs_m[None, :]))
                & (offs_m[None, :] < T)
                & (offs_n[:, None] < T)
            )
            pT = tl.where(visible, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN, BM] = (dO vᵀ)ᵀ
        dsT = pT * (dpT - delta[None, :])  # masked entries: pT = 0
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    SEP,
    DK,
    DV,
    scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    H,
    H_KV,
    T,
    GROUP,
    T_BUCKET,  # only an autotune key
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
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
    offs_dv = tl.arange(0, HEAD_DIM_V)
    nmask = offs_n[:, None] < T
    k = tl.load(
        K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=nmask, other=0.0
    )
    v = tl.load(
        V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_dv[None, :], mask=nmask, other=0.0
    )

    # The query ranges (see the module docstring's picture).
    lo = tl.where(n0 < sep, 0, (n0 // BLOCK_M) * BLOCK_M)
    mid = tl.where(n0 + BLOCK_N <= sep, 0, ((n0 + BLOCK_N - 1 + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    mid = tl.maximum(mid, lo)
    # Whole query blocks end at T rounded down to BM. (Keys past T need no mask here: they are loaded as
    # zeros and only ever feed their own rows of dk/dv, which are never stored.)
    tail = tl.maximum((T // BLOCK_M) * BLOCK_M, mid)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)
    # Grouped-query attention: the GROUP query heads reading this k/v head are summed here, on chip.
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        bh = b * H + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * T
        delta_base = DELTA + bh * T
        dk, dv = _dkdv_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_dot,
            offs_n,
            offs_m0,
            offs_d,
            offs_dv,
            sep,
            T,
            lo,
            mid,
            qk_scale,
            BLOCK_M,
            True,
            DOT_PRECISION,
        )
        dk, dv = _dkdv_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_dot,
            offs_n,
            offs_m0,
            offs_d,
            offs_dv,
            sep,
            T,
            mid,
            tail,
            qk_scale,
            BLOCK_M,
            False,
            DOT_PRECISION,
        )
        dk, dv = _dkdv_blocks(
            dk,
            dv,
            k,
            v,
            q_base,
            do_base,
            lse_base,
            delta_base,
            stride_qt,
            stride_dot,
            offs_n,
            offs_m0,
            offs_d,
            offs_dv,
            sep,
            T,
            tail,
            T,
            qk_scale,
            BLOCK_M,
            True,
            DOT_PRECISION,
        )

    dk = dk * scale  # dS was taken w.r.t. the scaled scores
    tl.store(
        DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=nmask,
    )
    tl.store(
        DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_dv[None, :],
        dv.to(DV.dtype.element_ty),
        mask=nmask,
    )


@triton.jit
def _dq_blocks(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_m,
    offs_n0,
    offs_d,
    offs_dv,
    sep,
    T,
    lo,
    hi,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate dq [BM, D] (fp32, unscaled) of one query block over key blocks [lo, hi)."""
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        if MASKED:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_dv[None, :], mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_dv[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN]
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            visible = ((cols[None, :] < sep) | (cols[None, :] <= offs_m[:, None])) & (cols[None, :] < T)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    SEP,
    DQ,
    scale,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    H,
    T,
    GROUP,
    T_BUCKET,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
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
    offs_dv = tl.arange(0, HEAD_DIM_V)
    rmask = offs_m < T
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_dv[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    row = pid_bh.to(tl.int64) * T + offs_m
    lse2 = tl.load(LSE + row, mask=rmask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=rmask, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    hi = tl.minimum(tl.maximum(sep, m0 + BLOCK_M), T)
    full = (tl.minimum(tl.maximum(sep, m0 + 1), T) // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n0,
        offs_d,
        offs_dv,
        sep,
        T,
        0,
        full,
        qk_scale,
        BLOCK_N,
        False,
        DOT_PRECISION,
    )
    dq = _dq_blocks(
        dq,
        q,
        do,
        lse2,
        delta,
        k_base,
        v_base,
        stride_kt,
        stride_vt,
        offs_m,
        offs_n0,
        offs_d,
        offs_dv,
        sep,
        T,
        full,
        hi,
        qk_scale,
        BLOCK_N,
        True,
        DOT_PRECISION,
    )
    dq = dq * scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=rmask[:, None],
    )


# ---- CUDA: a few configurations per kernel, autotuned on (head dim, T size class, dtype) ----
# The dk/dv kernel keeps k, v, dk, dv ([BN, D] each) on chip and streams small query tiles past them; the
# dq kernel keeps q, dO, dq ([BM, D]) and streams key tiles. Hence "wide resident, narrow streamed" tiles
# (as in FlashAttention-2's Triton backward). Lists from a sweep of each kernel alone on one H200 (bf16,
# causal, T = 8K, B·T = 32K; benchmarks/sweep_kernels.py, figures in
# benchmarks/results/glm_attention_bwd_h200.md), best first: D = 128 dk/dv 64×128 w8 s3 4.72 ms
# (64×128 w4 ran 16 ms: 4 warps spill at D = 128), dq 128×64 w8 s3 2.69 ms; D = 64 dk/dv 64×128 w4 s3
# 5.44 ms, dq 64×64 w4 s3 3.01 ms. The rest are the runners-up within ~10%, kept for other T.
# D = 256 (MLA) rows are guesses sized for the register file (benchmarks/bench_mla.py times them): the resident
# fp32 accumulators are dk + dv = 2 × BN × 256 (dk/dv kernel) or dq = BM × 256 (dq kernel).
_DKDV_CONFIGS = {  # head dim -> (BLOCK_M streamed, BLOCK_N resident, num_warps, num_stages)
    256: [(32, 64, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2)],
    128: [(64, 128, 8, 3), (64, 128, 8, 4), (128, 128, 8, 2), (32, 64, 4, 3)],
    64: [(64, 128, 4, 3), (32, 64, 4, 3), (32, 64, 4, 4), (128, 128, 8, 3)],
}
_DQ_CONFIGS = {  # head dim -> (BLOCK_M resident, BLOCK_N streamed, num_warps, num_stages)
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
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
        wanted = set(table.get(_widest(named_args, kwargs), _SMALL_D))
        keep = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]
        return keep or configs[:1]

    return prune


_KEY = ["HEAD_DIM", "HEAD_DIM_V", "T_BUCKET", "DOT_PRECISION", "GROUP"]
# Each kernel writes every element of its output exactly once (no accumulation into the output), so the
# autotuner's repeated launches leave correct results behind.
_dkdv_tuned = triton.autotune(
    configs=_configs(_DKDV_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _pruner(_DKDV_CONFIGS)}
)(_attn_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(
    configs=_configs(_DQ_CONFIGS), key=_KEY, prune_configs_by={"early_config_prune": _pruner(_DQ_CONFIGS)}
)(_attn_bwd_dq_kernel)


def attention_bwd(do, q, k, v, o, lse, sep, scale: float | None = None):
    """Gradients of ``attention_fwd``: q [B, H, T, D]; k [B, H_kv, T, D]; v [B, H_kv, T, Dv]; do, o [B, H, T, Dv];
    lse [B, H, T] fp32 from ``attention_fwd(..., return_lse=True)``; sep and scale as the forward's. Returns dq,
    dk, dv."""
    require_kernel_device(q)
    B, H, T, D = q.shape
    H_kv, Dv = k.shape[1], v.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v, o, do = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, o, do))
    lse, sep = lse.contiguous(), _sep_or_full(sep, B, T, q.device)
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H_kv, T, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, H_kv, T, Dv), dtype=q.dtype, device=q.device)
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)

    interp = q.device.type != "cuda"
    pre_bm = 16 if interp else 128
    _bwd_preprocess[(triton.cdiv(T, pre_bm), B * H)](
        o,
        do,
        delta,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        H,
        T,
        HEAD_DIM=Dv,  # Δ is a dot over the output's dims
        BLOCK_M=pre_bm,
        **({} if interp else dict(num_warps=4)),
    )
    common = (
        scale,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
    )
    dkdv_args = (
        q,
        k,
        v,
        do,
        lse,
        delta,
        sep,
        dk,
        dv,
        *common,
        dk.stride(0),
        dk.stride(1),
        dk.stride(2),
        dv.stride(0),
        dv.stride(1),
        dv.stride(2),
        H,
        H_kv,
        T,
        H // H_kv,
        _t_bucket(T),
    )
    dq_args = (
        q,
        k,
        v,
        do,
        lse,
        delta,
        sep,
        dq,
        *common,
        dq.stride(0),
        dq.stride(1),
        dq.stride(2),
        H,
        T,
        H // H_kv,
        _t_bucket(T),
    )
    consts = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, DOT_PRECISION=_precision(q.dtype))
    if not interp and q.dtype != torch.float32:
        _dkdv_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H_kv)](*dkdv_args, **consts)
        _dq_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](*dq_args, **consts)
        return dq, dk, dv
    if interp:
        kd = kq = dict(BLOCK_M=16, BLOCK_N=16)
        kw = {}
    else:  # fp32 on CUDA: small tiles, the checking dtype (8 warps share the 256-wide heads' fp32 tiles)
        kd, kq = dict(BLOCK_M=16, BLOCK_N=32), dict(BLOCK_M=32, BLOCK_N=16)
        kw = dict(num_warps=4 if max(D, Dv) <= 128 else 8, num_stages=1)
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, kd["BLOCK_N"]), B * H_kv)](*dkdv_args, **kd, **kw, **consts)
    _attn_bwd_dq_kernel[(triton.cdiv(T, kq["BLOCK_M"]), B * H)](*dq_args, **kq, **kw, **consts)
    return dq, dk, dv


def bwd_flops(T: int, D: int, sep: int, B: int = 1, H: int = 1) -> int:
    """FLOPs charged to the backward by convention: 2.5 × the forward's 4·D·(visible pairs) per head
    (five T×T×D matmuls against the forward's two)."""
    return int(2.5 * 4 * D * visible_pairs(T, sep) * B * H)
