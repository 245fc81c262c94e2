"""Grouped GEMMs for the MoE experts, gathering rows by token id, with a SwiGLU epilogue, the weighted
combine, and the backward (lesson 04's kernels).

What it computes: the routed experts of a GLM-4.5 MoE layer, ``glmkit.ops.moe_experts.moe_experts(x, topk_idx,
topk_weight, w_gate_up, w_down)`` = for each token t,

    y[t] = Σ_j  w[t, j] · down_e( silu(gate_e(x[t])) · up_e(x[t]) ),   e = topk_idx[t, j]

with the HF ``glm4_moe`` weight layout: ``w_gate_up [E, 2I, H]`` (gate rows first, then up) and
``w_down [E, H, I]``, each used as ``x @ W[e]ᵀ``. The plain-torch loop over experts in glmkit.ops.moe_experts is the
reference; this is the fast path that replaces its E small matmuls by one launch per GEMM.

How (the design of vLLM's fused MoE, re-derived): ``moe_align`` lists the S = N·k slots expert by expert,
padded to blocks of BLOCK_M rows that each belong to one expert. One GEMM program owns one such block
and a BLOCK_N slice of output columns:

          sorted_token_ids (block b, expert e = expert_ids[b])
          [ s0 s1 s2 ... s15 ]   ──►  rows of x: s // k (a gather: x is never copied k times)
                 │
    x [N, H] ────┤ gather rows            W[e] [Nout, K]: tile loaded transposed
                 ▼                         │
        A tile [BM, BK]  @  W[e] tileᵀ [BK, BN]  (fp32 accumulate, loop over K)
                 │
      epilogue:  plain   → C[s, n]                          (optionally · w[s])
                 swiglu  → two accumulators, gate cols n and up cols n + I:
                           C[s, n] = silu(g)·u,  and the pre-activation h[s, n], h[s, n + I] if kept
                 ▼
      stored by SLOT id s (not by sorted position): C [S, ·] is in the router's order, so the next GEMM
      and the combine index it directly. Sentinel rows (s == S) are masked off; blocks past
      num_tokens_post_pad exit at once (the grid is the fixed worst case, no host sync).

Forward of ``moe_experts``: GEMM 1 (x gathered, w_gate_up, SwiGLU epilogue) → a [S, I]; GEMM 2 (a by slot,
w_down) → z [S, H]; combine y[t] = Σ_j w[t, j] · z[t·k + j] (fp32 sum, deterministic: no atomics).

Backward, with dy [N, H] (s a slot of token t, expert e; h = the saved pre-activation [S, 2I]):

    g[s]   = dy[t] @ w_down[e]                 a grouped GEMM gathering dy by token (weights read as
                                               [E, I, H] through strides: no transpose copy)
    dw[s]  = g[s] · a[s]                       (= dy[t] · z[s]: z is never stored) — epilogue, with a
                                               recomputed from h (a is not saved by the forward)
    dh[s]  = swiglu_bwd(w[s] · g[s], h[s])     [S, 2I] — same epilogue, which also stores aw[s] = w[s]·a[s]
    dx[t]  = Σ_j dh[t·k+j] @ w_gate_up[e]      a grouped GEMM by slot, then the combine without weights
    dW_down[e]    = Σ_{s∈e} dy[t]ᵀ aw[s]         ┐ ``_moe_wgrad_kernel``: one program per (expert, output
    dW_gate_up[e] = Σ_{s∈e} dh[s]ᵀ x[t]          ┘ tile) walks its expert's run of sorted slots

The SwiGLU-backward epilogue runs on the two column halves of a 128-column tile in turn: whole, its fp32
temporaries spilled (ptxas, sm_90a). Backward piece timings and the sweeps behind the tile lists:
benchmarks/results/moe_h200.md.

Clamped SwiGLU (GLM-5.3-Flash's ``swiglu_limit`` L, a compile-time constant ``SWIGLU_LIMIT``; None = plain): both
SwiGLU epilogues clamp g ← min(g, L) and u ← clamp(u, -L, L) before the activation; h keeps the unclamped values, so
the backward epilogue zeroes d gate where g > L and d up where |u| > L (torch's clamp gradient).

Decode (a handful of tokens, e.g. N ≤ 16): the same kernels with BLOCK_M = 16 (the smallest ``tl.dot``
tile), chosen automatically when experts average ≤ 16 slots. vLLM's one-pair-per-block shortcut needs
1-row tiles, which ``tl.dot`` does not take; with 16-row blocks a decode step wastes rows, not launches.

Launchers: ``experts_fwd`` / ``experts_bwd`` (what ``glmkit.ops.moe_experts`` wires into autograd) and their
pieces ``moe_gemm``, ``moe_combine``, ``moe_weight_grad`` (with ``moe_align`` from moe_align.py).
Not done yet: split-K over slots in the weight gradient (one hot expert runs on M·N/(BM·BN) programs only),
TMA loads, a persistent warp-specialized GEMM (what separates ours from torch._grouped_mm).

Runs natively on CUDA (autotuned BLOCK_N/BLOCK_K/warps/stages per shape) and under the Triton
interpreter on CPU tensors (fixed 16/32/32 tiles). Under the 3.6 interpreter ``tl.dot`` on bf16 is
wrong, so CPU tests use fp32/fp16; bf16 is tested on the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

from .moe_align import moe_align

# epilogues of _moe_gemm_kernel
PLAIN, SWIGLU, SWIGLU_BWD = 0, 1, 2


@triton.jit
def _moe_gemm_kernel(
    A,
    W,
    C,
    SORTED,
    EXPERT_IDS,
    NTPP,
    TOPW,
    PRE,
    DWP,
    AW,
    N_OUT,
    K,
    S,
    A_DIV,
    NUM_PID_M,
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_cm,
    stride_cn,
    stride_pm,
    stride_pn,
    stride_dwp,
    stride_awm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE: tl.constexpr,  # PLAIN, SWIGLU or SWIGLU_BWD (see the module docstring)
    MUL_W: tl.constexpr,  # PLAIN: multiply row s by TOPW[s]
    STORE_PRE: tl.constexpr,  # SWIGLU: also store the pre-activation into PRE [S, 2·N_OUT]
    DOT_PRECISION: tl.constexpr,
    DW_SUB: tl.constexpr = 64,  # SWIGLU_BWD: columns per partial d-weight sum (divides BLOCK_N)
    STORE_AW: tl.constexpr = False,  # SWIGLU_BWD: also store AW[s] = w[s]·a[s] [S, N_OUT]
    SWIGLU_LIMIT: tl.constexpr = None,  # SWIGLU, SWIGLU_BWD: clamp limit L (None: plain SwiGLU)
):
    # 1-D grid in "grouped" order: GROUP_M row blocks share each column slice of W while it is in L2.
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N_OUT, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(NUM_PID_M - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    if pid_m * BLOCK_M >= tl.load(NTPP):
        return  # the empty tail of the worst-case grid
    e = tl.load(EXPERT_IDS + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(SORTED + offs_m)  # slot ids; S marks padding
    valid = slot < S
    slot = tl.where(valid, slot, 0).to(tl.int64)
    rows = slot // A_DIV  # the gather: row of A this slot reads

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = W + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BK, BN] = W[e]ᵀ
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if EPILOGUE == 1:
        u_ptrs = w_ptrs + N_OUT * stride_wn  # the up half: rows I.. 2I of W[e]
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if EPILOGUE == 1:
            bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_u = tl.dot(a, bu, acc_u, input_precision=DOT_PRECISION)
            u_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if EPILOGUE != 2:
        mask = valid[:, None] & n_ok[None, :]
        c_ptrs = C + slot[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if EPILOGUE == 0:
        if MUL_W:
            acc = acc * tl.load(TOPW + slot, mask=valid, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        if STORE_PRE:
            p_ptrs = PRE + slot[:, None] * stride_pm + offs_n[None, :] * stride_pn
            tl.store(p_ptrs, acc.to(PRE.dtype.element_ty), mask=mask)
            tl.store(p_ptrs + N_OUT * stride_pn, acc_u.to(PRE.dtype.element_ty), mask=mask)
            # the backward sees the rounded h: compute the activation from it, as it will
            acc = acc.to(PRE.dtype.element_ty).to(tl.float32)
            acc_u = acc_u.to(PRE.dtype.element_ty).to(tl.float32)
        if SWIGLU_LIMIT is not None:
            acc = tl.minimum(acc, SWIGLU_LIMIT)
            acc_u = tl.minimum(tl.maximum(acc_u, -SWIGLU_LIMIT), SWIGLU_LIMIT)
        act = acc * tl.sigmoid(acc) * acc_u
        tl.store(c_ptrs, act.to(C.dtype.element_ty), mask=mask)
    else:
        # acc = g = dy[t] @ w_down[e] (columns n of I). The SwiGLU-backward epilogue holds ~5 fp32 tiles
        # at once: on the halves of a 128-column tile it fits the registers (whole, it spilled ~1.2 KB per
        # thread with 8 warps: ptxas -v, sm_90a; 24 B on halves).
        if BLOCK_N >= 128 and (BLOCK_N // 2) % DW_SUB == 0:
            g0, g1 = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N // 2]), (0, 2, 1)))
            half = tl.arange(0, BLOCK_N // 2)
            _swiglu_bwd_epilogue(
                g0,
                slot,
                valid,
                pid_n * BLOCK_N + half,
                pid_n * BLOCK_N // DW_SUB,
                PRE,
                C,
                DWP,
                AW,
                TOPW,
                N_OUT,
                stride_pm,
                stride_pn,
                stride_cm,
                stride_cn,
                stride_dwp,
                stride_awm,
                BLOCK_M,
                BLOCK_N // 2,
                DW_SUB,
                STORE_AW,
                SWIGLU_LIMIT,
            )
            _swiglu_bwd_epilogue(
                g1,
                slot,
                valid,
                pid_n * BLOCK_N + BLOCK_N // 2 + half,
                (pid_n * BLOCK_N + BLOCK_N // 2) // DW_SUB,
                PRE,
                C,
                DWP,
                AW,
                TOPW,
                N_OUT,
                stride_pm,
                stride_pn,
                stride_cm,
                stride_cn,
                stride_dwp,
                stride_awm,
                BLOCK_M,
                BLOCK_N // 2,
                DW_SUB,
                STORE_AW,
                SWIGLU_LIMIT,
            )
        else:
            _swiglu_bwd_epilogue(
                acc,
                slot,
                valid,
                offs_n,
                pid_n * BLOCK_N // DW_SUB,
                PRE,
                C,
                DWP,
                AW,
                TOPW,
                N_OUT,
                stride_pm,
                stride_pn,
                stride_cm,
                stride_cn,
                stride_dwp,
                stride_awm,
                BLOCK_M,
                BLOCK_N,
                DW_SUB,
                STORE_AW,
                SWIGLU_LIMIT,
            )


@triton.jit
def _swiglu_bwd_epilogue(
    g,
    slot,
    valid,
    offs_n,
    col0,
    PRE,
    C,
    DWP,
    AW,
    TOPW,
    N_OUT,
    stride_pm,
    stride_pn,
    stride_cm,
    stride_cn,
    stride_dwp,
    stride_awm,
    BLOCK_M: tl.constexpr,
    BN: tl.constexpr,
    DW_SUB: tl.constexpr,
    STORE_AW: tl.constexpr,
    SWIGLU_LIMIT: tl.constexpr,
):
    """SWIGLU_BWD on one [BLOCK_M, BN] tile g of dy[t] @ w_down[e], columns offs_n of I (h = PRE [S, 2I]):
    dh = swiglu_bwd(w·g, h) into C [S, 2I]; Σ g·a over each DW_SUB columns into DWP[s, col0 + j];
    w·a into AW [S, I] when STORE_AW. With SWIGLU_LIMIT, h is clamped first and dh is 0 where it was."""
    mask = valid[:, None] & (offs_n < N_OUT)[None, :]
    p_ptrs = PRE + slot[:, None] * stride_pm + offs_n[None, :] * stride_pn
    hg = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    hu = tl.load(p_ptrs + N_OUT * stride_pn, mask=mask, other=0.0).to(tl.float32)
    if SWIGLU_LIMIT is not None:
        g_kept = hg <= SWIGLU_LIMIT
        u_kept = (hu >= -SWIGLU_LIMIT) & (hu <= SWIGLU_LIMIT)
        hg = tl.minimum(hg, SWIGLU_LIMIT)
        hu = tl.minimum(tl.maximum(hu, -SWIGLU_LIMIT), SWIGLU_LIMIT)
    sig = tl.sigmoid(hg)
    silu = hg * sig
    act = (silu * hu).to(C.dtype.element_ty).to(tl.float32)  # the a that GEMM 2 read
    # partial d weight over each DW_SUB columns; the wrapper sums the partials (deterministic, and
    # every column of DWP is written whatever BLOCK_N the autotuner picks)
    if BN == DW_SUB:
        tl.store(DWP + slot * stride_dwp + col0, tl.sum(g * act, axis=1), mask=valid & (col0 < tl.cdiv(N_OUT, DW_SUB)))
    else:
        part = tl.sum(tl.reshape(g * act, [BLOCK_M, BN // DW_SUB, DW_SUB]), axis=2)
        cols = col0 + tl.arange(0, BN // DW_SUB)
        tl.store(
            DWP + slot[:, None] * stride_dwp + cols[None, :],
            part,
            mask=valid[:, None] & (cols < tl.cdiv(N_OUT, DW_SUB))[None, :],
        )
    tw = tl.load(TOPW + slot, mask=valid, other=0.0).to(tl.float32)[:, None]
    if STORE_AW:  # the right operand of dW_down, weighted here once, not in its K loop
        tl.store(AW + slot[:, None] * stride_awm + offs_n[None, :], (act * tw).to(AW.dtype.element_ty), mask=mask)
    da = g * tw
    d_gate = da * hu * sig * (1.0 + hg * (1.0 - sig))
    d_up = da * silu
    if SWIGLU_LIMIT is not None:
        d_gate = tl.where(g_kept, d_gate, 0.0)
        d_up = tl.where(u_kept, d_up, 0.0)
    c_ptrs = C + slot[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, d_gate.to(C.dtype.element_ty), mask=mask)
    tl.store(c_ptrs + N_OUT * stride_cn, d_up.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _moe_wgrad_kernel(
    L,
    R,
    DW,
    SORTED,
    COUNTS,
    TOPW,
    M,
    N,
    E,
    L_DIV,
    R_DIV,
    stride_lm,
    stride_lk,  # L [rows, M]: row index along the slot axis, M the output rows
    stride_rm,
    stride_rk,  # R [rows, N]
    stride_de,
    stride_dm,
    stride_dn,
    ALIGN_M: tl.constexpr,  # moe_align's block_m (to find each expert's run)
    E_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # slots per step
    MUL_W: tl.constexpr,  # scale L's row of slot s by TOPW[s]
    DOT_PRECISION: tl.constexpr,
):
    """DW[e] = Σ over expert e's slots s of (w[s]·) L[s // L_DIV]ᵀ ⊗ R[s // R_DIV]: [M, N]."""
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n
    offs_e = tl.arange(0, E_P2)
    counts = tl.load(COUNTS + offs_e, mask=offs_e < E, other=0)
    padded = (counts + ALIGN_M - 1) // ALIGN_M * ALIGN_M
    start = tl.sum(tl.where(offs_e < e, padded, 0), axis=0)
    count = tl.sum(tl.where(offs_e == e, counts, 0), axis=0)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, count, BLOCK_K):  # an expert with no slots stores zeros
        pos = start + k0 + tl.arange(0, BLOCK_K)
        ok = k0 + tl.arange(0, BLOCK_K) < count
        slot = tl.load(SORTED + pos, mask=ok, other=0).to(tl.int64)
        lt = tl.load(
            L + (slot // L_DIV)[None, :] * stride_lm + offs_m[:, None] * stride_lk,
            mask=ok[None, :] & m_ok[:, None],
            other=0.0,
        )  # [BM, BK]
        if MUL_W:
            w = tl.load(TOPW + slot, mask=ok, other=0.0).to(tl.float32)
            lt = (lt.to(tl.float32) * w[None, :]).to(L.dtype.element_ty)
        r = tl.load(
            R + (slot // R_DIV)[:, None] * stride_rm + offs_n[None, :] * stride_rk,
            mask=ok[:, None] & n_ok[None, :],
            other=0.0,
        )  # [BK, BN]
        acc = tl.dot(lt, r, acc, input_precision=DOT_PRECISION)
    d_ptrs = DW + e.to(tl.int64) * stride_de + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn
    tl.store(d_ptrs, acc.to(DW.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_combine_kernel(
    Z,
    TOPW,
    Y,
    H,
    stride_zm,
    stride_ym,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_W: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        z = tl.load(Z + (t * TOP_K + j) * stride_zm + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_W:
            z = z * tl.load(TOPW + t * TOP_K + j).to(tl.float32)
        acc += z
    tl.store(Y + t * stride_ym + cols, acc.to(Y.dtype.element_ty), mask=ok)


# ---- launch configurations ----

# CUDA: BLOCK_M is fixed by the alignment; the autotuner picks the rest per (N_OUT, K, BLOCK_M, epilogue,
# dtype). The SwiGLU epilogues carry two accumulators or extra epilogue loads, so they stay at BLOCK_N <= 128.
# GEMM list checked on one H200 (2026-11-23, benchmarks/sweep_kernels.py --sections moe; 64 experts, 2048 rows
# each, K = N = 2048): 256×64 w8 s3 led (0.81-0.82× torch._grouped_mm); 16 other tiles, deeper pipelines and
# 256-row alignment blocks were no faster (0.14-0.82×). 256×64 w8 s4 added 2026-11-23: it led the backward's dx
# GEMM (N-major weights, 586 vs 555 TFLOP/s for s3). The key holds stride_wk: K-major and N-major weights tune apart.
_GEMM_CONFIGS = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 64, 8, 3),
    (128, 64, 4, 4),
    (64, 64, 4, 4),
    (256, 64, 8, 3),
    (256, 64, 8, 4),
    (128, 128, 8, 3),
]
# Tried only for the SwiGLU-backward epilogue (the dgrad of the backward): 64-column tiles with 8 warps hold
# its fp32 temporaries without spilling; 128×64 w8 s4 led the 2026-11-23 sweep of that GEMM.
_DGRAD_ONLY_CONFIGS = [(128, 64, 8, 4), (64, 64, 8, 4)]
# Weight gradient, swept 2026-11-23 (benchmarks/sweep_kernels.py --sections moe_bwd; N = 16384, H = 2048,
# I = 1024, E = 64, k = 8): 128×128×64 w8 led dW_gate_up (310 TFLOP/s; 128×256 and 256×128 tiles 225-250),
# 128×256×32 w8 s5 led dW_down (318). num_stages 3 and 4 compile to the same 2-deep pipeline here (the slot
# ids are loaded a stage ahead of the rows they address); 5 gives 3 buffers.
_WGRAD_CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 5),
    (128, 256, 32, 8, 5),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
]


def _prune_gemm(configs, named_args, **kwargs):
    epi = kwargs.get("EPILOGUE", named_args.get("EPILOGUE", 0))
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 64))
    keep = []
    for c in configs:
        bn = c.kwargs["BLOCK_N"]
        if epi != 0 and bn > 128:
            continue
        if epi != SWIGLU_BWD and (bn, c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in _DGRAD_ONLY_CONFIGS:
            continue
        if bm <= 32 and (bn > 128 or c.num_warps > 4):  # decode-sized blocks: small tiles
            continue
        keep.append(c)
    return keep or configs[:1]


_moe_gemm_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in _GEMM_CONFIGS + _DGRAD_ONLY_CONFIGS
    ],
    key=["N_OUT", "K", "BLOCK_M", "EPILOGUE", "MUL_W", "STORE_PRE", "STORE_AW", "stride_wk"],
    prune_configs_by={"early_config_prune": _prune_gemm},
)(_moe_gemm_kernel)

_moe_wgrad_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in _WGRAD_CONFIGS
    ],
    key=["M", "N", "E", "ALIGN_M", "MUL_W"],
)(_moe_wgrad_kernel)


def default_block_m(num_slots: int, num_experts: int, device: torch.device | str) -> int:
    """The alignment block for a routing: 16 under the interpreter and for decode-sized batches (experts
    averaging ≤ 16 slots), growing with the slots per expert up to 128 on the GPU."""
    if torch.device(device).type != "cuda":
        return 16
    avg = num_slots / max(num_experts, 1)
    for bm, limit in ((16, 16), (32, 48), (64, 128)):
        if avg <= limit:
            return bm
    return 128


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def moe_gemm(
    a,
    w,
    sorted_token_ids,
    expert_ids,
    num_tokens_post_pad,
    *,
    top_k: int,
    block_m: int,
    swiglu: bool = False,
    topk_weight=None,
    pre_out=None,
    swiglu_limit: float | None = None,
) -> torch.Tensor:
    """Grouped GEMM over aligned slots: out[s] = a[s // top_k] @ w[e(s)]ᵀ for every slot s = token·k + j.

    a [rows, K] with rows·top_k = S slots (top_k = k gathers token rows; top_k = 1 reads an [S, K]
    intermediate by slot); w [E, Nout, K], the HF layout (x @ Wᵀ), any strides; the routing tensors from
    ``moe_align(topk_idx, E, block_m)``. swiglu: w is gate‖up ([E, 2I, K]) and out[s] = silu(gate)·up [S, I];
    pre_out: with swiglu, also store the pre-activation [S, 2I] there. topk_weight [N, k] or [S]: multiply row
    s by its weight (not with swiglu). swiglu_limit: clamp the SwiGLU's inputs (glm5_next). Rows of slots never
    routed are not written. Returns out."""
    require_kernel_device(a)
    E, n_w, K = w.shape
    S = a.shape[0] * top_k
    n_out = n_w // 2 if swiglu else n_w
    out = torch.empty((S, n_out), dtype=a.dtype, device=a.device)
    topw = None if topk_weight is None else topk_weight.reshape(-1).contiguous()
    _launch_gemm(
        a,
        w,
        out,
        sorted_token_ids,
        expert_ids,
        num_tokens_post_pad,
        topw,
        pre_out,
        None,
        n_out,
        K,
        S,
        top_k,
        block_m,
        SWIGLU if swiglu else PLAIN,
        limit=swiglu_limit,
    )
    return out


def _launch_gemm(
    a,
    w,
    c,
    sorted_ids,
    expert_ids,
    ntpp,
    topw,
    pre,
    dwp,
    n_out,
    K,
    S,
    a_div,
    block_m,
    epilogue,
    aw=None,
    dw_sub=64,
    limit=None,
):
    if S == 0 or sorted_ids.numel() == 0:
        return
    num_pid_m = sorted_ids.numel() // block_m
    dummy = c
    args = (
        a,
        w,
        c,
        sorted_ids,
        expert_ids,
        ntpp,
        topw if topw is not None else dummy,
        pre if pre is not None else dummy,
        dwp if dwp is not None else dummy,
        aw if aw is not None else dummy,
        n_out,
        K,
        S,
        a_div,
        num_pid_m,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        c.stride(0),
        c.stride(1),
        pre.stride(0) if pre is not None else 0,
        pre.stride(1) if pre is not None else 0,
        dwp.stride(0) if dwp is not None else 0,
        aw.stride(0) if aw is not None else 0,
    )
    consts = dict(
        BLOCK_M=block_m,
        EPILOGUE=epilogue,
        MUL_W=epilogue == PLAIN and topw is not None,
        STORE_PRE=epilogue == SWIGLU and pre is not None,
        DOT_PRECISION=_precision(a.dtype),
        DW_SUB=dw_sub,
        STORE_AW=aw is not None,
        SWIGLU_LIMIT=limit if epilogue != PLAIN else None,
    )
    if a.device.type == "cuda" and a.dtype != torch.float32:
        grid = lambda meta: (num_pid_m * triton.cdiv(n_out, meta["BLOCK_N"]),)  # noqa: E731
        _moe_gemm_tuned[grid](*args, GROUP_M=8, **consts)
        return
    if a.device.type == "cuda":  # fp32, the checking dtype
        cfg = dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    else:  # interpreter: few, mid-sized tiles run fastest
        cfg = dict(BLOCK_N=32, BLOCK_K=32)
    grid = (num_pid_m * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](*args, GROUP_M=8, **consts, **cfg)


def moe_combine(z: torch.Tensor, top_k: int, topk_weight: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = Σ_j w[t, j] · z[t·k + j] (w = 1 without topk_weight): z [S, H] by slot → [N, H] in z's dtype,
    summed in fp32 in a fixed order. topk_weight [N, k] or [S]."""
    require_kernel_device(z)
    S, H = z.shape
    N = S // top_k
    z = z if z.stride(-1) == 1 else z.contiguous()
    topw = None if topk_weight is None else topk_weight.reshape(-1).contiguous()
    out = torch.empty((N, H), dtype=z.dtype, device=z.device)
    if N and H:
        block = min(triton.next_power_of_2(H), 128 if z.device.type != "cuda" else 1024)
        _moe_combine_kernel[(N, triton.cdiv(H, block))](
            z,
            topw if topw is not None else z,
            out,
            H,
            z.stride(0),
            out.stride(0),
            TOP_K=top_k,
            BLOCK=block,
            HAS_W=topw is not None,
        )
    return out


def moe_weight_grad(
    left, right, sorted_token_ids, counts, *, block_m: int, left_div: int, right_div: int, topk_weight=None
) -> torch.Tensor:
    """dW[e] = Σ over expert e's slots s of (w[s]·) left[s // left_div]ᵀ ⊗ right[s // right_div]: [E, M, N].

    left [rows_l, M], right [rows_r, N] (rows·div = S each); sorted_token_ids and counts from
    ``moe_align(…, block_m)``. Experts without slots get zeros. Accumulates in fp32 over the expert's slots in
    sorted order (deterministic)."""
    require_kernel_device(left)
    E = counts.numel()
    M, N = left.shape[1], right.shape[1]
    out = torch.empty((E, M, N), dtype=left.dtype, device=left.device)
    topw = topk_weight.reshape(-1).contiguous() if topk_weight is not None else None
    args = (
        left,
        right,
        out,
        sorted_token_ids,
        counts,
        topw if topw is not None else left,
        M,
        N,
        E,
        left_div,
        right_div,
        left.stride(0),
        left.stride(1),
        right.stride(0),
        right.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    consts = dict(
        ALIGN_M=block_m, E_P2=triton.next_power_of_2(E), MUL_W=topw is not None, DOT_PRECISION=_precision(left.dtype)
    )
    if left.device.type == "cuda" and left.dtype != torch.float32:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E)  # noqa: E731
        _moe_wgrad_tuned[grid](*args, **consts)
        return out
    if left.device.type == "cuda":
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)
    else:
        cfg = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), E)
    _moe_wgrad_kernel[grid](*args, **consts, **cfg)
    return out


def _moe_swiglu_dgrad(dy, w_down, h, topw, sorted_ids, expert_ids, ntpp, top_k, block_m, I, store_aw=False, limit=None):
    """g = dy[t] @ w_down[e] by slot, fused with the SwiGLU backward: returns dh [S, 2I], dw [S] fp32 and,
    with store_aw, aw [S, I] = w[s]·a[s] (dW_down's right operand; else None)."""
    S = dy.shape[0] * top_k
    dh = torch.empty((S, 2 * I), dtype=h.dtype, device=h.device)
    aw = torch.empty((S, I), dtype=h.dtype, device=h.device) if store_aw else None
    wt = w_down.transpose(1, 2)  # [E, I, H] view: GEMM computes dy @ w_down[e] = dy @ wtᵀ
    # The partial sums of dw come in DW_SUB-column pieces whatever BLOCK_N is (every BLOCK_N the autotuner
    # or the fallbacks use is a multiple of it), so this GEMM is autotuned like the others.
    sub = 32 if dy.device.type != "cuda" else 64
    dwp = torch.zeros((S, triton.cdiv(I, sub)), dtype=torch.float32, device=dy.device)  # unrouted slots stay 0
    _launch_gemm(
        dy,
        wt,
        dh,
        sorted_ids,
        expert_ids,
        ntpp,
        topw,
        h,
        dwp,
        I,
        dy.shape[1],
        S,
        top_k,
        block_m,
        SWIGLU_BWD,
        aw=aw,
        dw_sub=sub,
        limit=limit,
    )
    return dh, dwp.sum(1), aw


def experts_fwd(x, topk_idx, topk_weight, w_gate_up, w_down, block_m: int, keep: bool = False, limit=None):
    """align → GEMM 1 (+SwiGLU, clamped at ``limit`` when set) → GEMM 2 → combine: y [N, H]. keep: also store
    h = the pre-activation [S, 2I] and return (y, saved) with what ``experts_bwd`` needs; else (y, None)."""
    require_kernel_device(x)
    k = topk_idx.shape[1]
    E, two_i, _ = w_gate_up.shape
    S = x.shape[0] * k
    sorted_ids, expert_ids, ntpp, counts = moe_align(topk_idx, E, block_m)
    h = torch.empty((S, two_i), dtype=x.dtype, device=x.device) if keep else None
    a = moe_gemm(
        x, w_gate_up, sorted_ids, expert_ids, ntpp, top_k=k, block_m=block_m, swiglu=True, pre_out=h, swiglu_limit=limit
    )
    z = moe_gemm(a, w_down, sorted_ids, expert_ids, ntpp, top_k=1, block_m=block_m)
    topw = topk_weight.reshape(-1).float().contiguous()
    y = moe_combine(z, k, topw)
    return y, ((x, topw, w_gate_up, w_down, sorted_ids, expert_ids, ntpp, counts, h) if keep else None)


def experts_bwd(dy, saved, top_k: int, block_m: int, need=(True, True, True, True), limit=None):
    """Gradients of ``experts_fwd`` from its ``saved`` tuple: (dx, d topk_weight [S] fp32, dW_gate_up, dW_down);
    ``need`` says which of the four to compute (the others are None); ``limit``: the forward's."""
    x, topw, w_gate_up, w_down, sorted_ids, expert_ids, ntpp, counts, h = saved
    I = w_gate_up.shape[1] // 2
    dy = dy.to(x.dtype)
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dh, dw, aw = _moe_swiglu_dgrad(
        dy, w_down, h, topw, sorted_ids, expert_ids, ntpp, top_k, block_m, I, store_aw=need[3], limit=limit
    )
    dx = dwgu = dwd = None
    if need[0]:
        dx_slot = moe_gemm(dh, w_gate_up.transpose(1, 2), sorted_ids, expert_ids, ntpp, top_k=1, block_m=block_m)
        dx = moe_combine(dx_slot, top_k)
    if need[2]:
        dwgu = moe_weight_grad(dh, x, sorted_ids, counts, block_m=block_m, left_div=1, right_div=top_k)
    if need[3]:
        dwd = moe_weight_grad(dy, aw, sorted_ids, counts, block_m=block_m, left_div=top_k, right_div=1)
    return dx, (dw if need[1] else None), dwgu, dwd
