"""Sparse MLA attention over per-token index sets (lesson 06, DSA): the kernels of ``glmkit.ops.sparse_mla``, whose
``sparse_mla_reference`` (dense attention with the selected set as the mask) is the definition they are tested
against. Forward and backward for prefill and training; a split-key forward plus a combine for decoding.

What it computes, MLA in "MQA mode" (the absorbed form of lesson 05: every head scores the SAME latent row of a key,
so a query token's selected keys serve all of its heads). For query token t and head h, over the N slots of
idx[b, t] (−1 = empty slot):

    s_hj = scale · ( q_nope[t, h] · c_kv[idx_j] + q_rope[t, h] · k_rope[idx_j] )        R + DR dims (512 + 64)
    o[t, h] = Σ_j softmax_j(s_h)_j · c_kv[idx_j]                                          R dims: the latent is
    lse[t, h] = log Σ_j exp(s_hj)    (−inf, and o = 0, when every slot is empty)          also the value

How. One program owns one query token and a block of BLOCK_H heads (all 64 of GLM-5 in one block), and walks over
the token's slots BLOCK_N at a time: it gathers those rows of c_kv and k_rope (each row is contiguous: one
coalesced 1 KiB load per key in bf16) once for all its heads, computes the [BLOCK_H, BLOCK_N] scores with two
tensor-core dots, and runs the online softmax of flash attention (running max, denominator, rescaled fp32
accumulator [BLOCK_H, R]). Tokens are independent: there is no causal structure to skip, the index set already
is the mask. The work per token is fixed by N (= k), not by the context length: that is DSA's saving.

Decode (``sparse_mla_decode_fwd``). With one new token per sequence there are only B·T programs, too few to fill
an H200's 132 SMs; the slots are cut into NUM_SPLITS contiguous ranges (flash-decoding), each program writes a
partial o (fp32) and its lse, and ``_combine_kernel`` merges them: o = Σ_s e^{lse_s − lse} o_s,
lse = log Σ_s e^{lse_s}. Memory-bound: each selected latent row (576 values) is read once per token.

Backward (FlashAttention-2's equations on the gathered rows), one program per (token, head block):

    P = exp(s − lse),  dP = dO · c_kvᵀ,  dS = P ⊙ (dP − Δ),  Δ_h = dO_h · O_h
    dq_nope = scale · dS c_kv,  dq_rope = scale · dS k_rope
    dc_kv[idx_j] += scale · dSᵀ q_nope + Pᵀ dO,   dk_rope[idx_j] += scale · dSᵀ q_rope

The key gradients scatter to rows that other tokens select too, so they are fp32 atomic adds into a zeroed
[B, L, ·] buffer (summation order, hence the last bits, vary run to run). Hopper with triton 3.4–3.7.0 miscompiles
``tl.trans`` of a ``tl.dot`` result fed to another dot (fla #640, see kernels/delta_rule.py), so the transposed
products are not transposes: Pᵀ and dSᵀ are computed by their own dots with the operands swapped (loaded tiles
may be transposed freely). That costs two extra score-sized dots per block, ~40% more than a flash backward.

Index format: idx [B, T, N] int32; each entry is a key row in [0, L) or −1 (empty: skipped, any number of times).
Entries must be distinct (the masked reference counts a key once, a gather would count a repeat twice) and in
range; the launchers do not check values (a host sync). The causal rule is the indexer's business: the kernels
attend to exactly the listed rows.

Launchers: ``sparse_mla_fwd`` (o, lse), ``sparse_mla_bwd`` (dq_nope, dq_rope, dc_kv, dk_rope),
``sparse_mla_decode_fwd`` (o, lse). CUDA bf16/fp16: autotuned tiles; fp32 (the checking dtype): fixed tiles with
exact fp32 dots; under the Triton interpreter 16-wide tiles, so small tests cross tile and split boundaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

LOG2E = 1.4426950408889634  # exp(x) = 2^(x·log2 e): the kernels work in base 2
LN2 = 0.6931471805599453


@triton.jit
def _load_rows(CKV, KR, b, sel, valid, stride_cb, stride_cl, stride_kb, stride_kl, offs_r, offs_dr, R, DR):
    """Gather the selected keys' latent rows c_kv [BLOCK_N, BLOCK_R] and rope keys [BLOCK_N, BLOCK_DR] (zeros for
    empty slots and padding columns)."""
    rows = tl.where(valid, sel, 0)  # int32 offsets within one sample (L·R < 2³¹): half the address registers
    c = tl.load(
        CKV + b * stride_cb + (rows[:, None] * stride_cl + offs_r[None, :]),
        mask=valid[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )
    kr = tl.load(
        KR + b * stride_kb + (rows[:, None] * stride_kl + offs_dr[None, :]),
        mask=valid[:, None] & (offs_dr[None, :] < DR),
        other=0.0,
    )
    return c, kr


@triton.jit
def _sparse_mla_fwd_kernel(
    QN,  # [B, T, H, R]
    QR,  # [B, T, H, DR]
    CKV,  # [B, L, R]
    KR,  # [B, L, DR]
    IDX,  # [B, T, N] int32
    O,  # [B, T, H, R] (q's dtype), or with SPLIT [B, T, NUM_SPLITS, H, R] fp32
    LSE,  # [B, T, H] fp32, or with SPLIT [B, T, NUM_SPLITS, H]
    qk_scale,  # softmax scale · log2(e)
    stride_qnb,
    stride_qnt,
    stride_qnh,
    stride_qrb,
    stride_qrt,
    stride_qrh,
    stride_cb,
    stride_cl,
    stride_kb,
    stride_kl,
    stride_ib,
    stride_it,
    stride_ob,
    stride_ot,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lt,
    stride_ls,
    T,
    H,
    N,
    R,
    DR,
    KEYS_PER_SPLIT,
    SPLIT: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_tok = tl.program_id(0)
    b = (pid_tok // T).to(tl.int64)
    t = (pid_tok % T).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_n = tl.arange(0, BLOCK_N)
    heads = offs_h < H

    h0 = tl.program_id(1) * BLOCK_H
    qn = tl.load(
        tl.make_block_ptr(
            QN + b * stride_qnb + t * stride_qnt, (H, R), (stride_qnh, 1), (h0, 0), (BLOCK_H, BLOCK_R), (1, 0)
        ),
        boundary_check=(0, 1),
        padding_option="zero",
    )
    qr = tl.load(
        tl.make_block_ptr(
            QR + b * stride_qrb + t * stride_qrt, (H, DR), (stride_qrh, 1), (h0, 0), (BLOCK_H, BLOCK_DR), (1, 0)
        ),
        boundary_check=(0, 1),
        padding_option="zero",
    )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)

    start = split * KEYS_PER_SPLIT
    end = tl.minimum(N, start + KEYS_PER_SPLIT)
    idx_base = IDX + b * stride_ib + t * stride_it
    sel = tl.load(idx_base + start + offs_n, mask=start + offs_n < end, other=-1)
    c, kr = _load_rows(CKV, KR, b, sel, sel >= 0, stride_cb, stride_cl, stride_kb, stride_kl, offs_r, offs_dr, R, DR)
    for n0 in range(start, end, BLOCK_N):
        j = n0 + BLOCK_N + offs_n
        sel_nxt = tl.load(idx_base + j, mask=j < end, other=-1)
        c_nxt, kr_nxt = _load_rows(
            CKV, KR, b, sel_nxt, sel_nxt >= 0, stride_cb, stride_cl, stride_kb, stride_kl, offs_r, offs_dr, R, DR
        )
        valid = sel >= 0
        s = tl.dot(qn, tl.trans(c), input_precision=DOT_PRECISION)
        s = tl.dot(qr, tl.trans(kr), s, input_precision=DOT_PRECISION)  # [BLOCK_H, BLOCK_N] raw scores
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no slot seen yet: avoid (−inf) − (−inf)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(c.dtype), c, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        sel, c, kr = sel_nxt, c_nxt, kr_nxt

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # every slot empty: o = 0
    l_log = tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0))
    lse = tl.where(l_i > 0.0, (m_i + l_log) * 0.6931471805599453, float("-inf"))  # natural log
    o_blk = tl.make_block_ptr(
        O + b * stride_ob + t * stride_ot + split * stride_os,
        (H, R),
        (stride_oh, 1),
        (h0, 0),
        (BLOCK_H, BLOCK_R),
        (1, 0),
    )
    tl.store(o_blk, out.to(O.dtype.element_ty), boundary_check=(0, 1))
    tl.store(LSE + b * stride_lb + t * stride_lt + split * stride_ls + offs_h, lse, mask=heads)


@triton.jit
def _combine_kernel(
    OP,  # [B·T, NUM_SPLITS, H, R] fp32 partial outputs
    LP,  # [B·T, NUM_SPLITS, H] fp32 partial lse
    O,  # [B, T, H, R]
    LSE,  # [B, T, H] fp32
    stride_ob,
    stride_ot,
    stride_oh,
    T,
    H,
    R,
    NUM_SPLITS,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_tok = tl.program_id(0).to(tl.int64)
    b, t = pid_tok // T, pid_tok % T
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    heads = offs_h < H
    tile = heads[:, None] & (offs_r[None, :] < R)
    lp_base = LP + pid_tok * NUM_SPLITS * H + offs_h
    op_base = OP + pid_tok * NUM_SPLITS * H * R + offs_h[:, None] * R + offs_r[None, :]
    m = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for s in range(NUM_SPLITS):
        m = tl.maximum(m, tl.load(lp_base + s * H, mask=heads, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        wgt = tl.exp(tl.load(lp_base + s * H, mask=heads, other=float("-inf")) - m_use)
        den += wgt
        acc += wgt[:, None] * tl.load(op_base + s * H * R, mask=tile, other=0.0)
    out = acc / tl.where(den == 0.0, 1.0, den)[:, None]
    tl.store(O + b * stride_ob + t * stride_ot + offs_h[:, None] * stride_oh + offs_r[None, :], out, mask=tile)
    lse = tl.where(den > 0.0, m_use + tl.log(tl.where(den > 0.0, den, 1.0)), float("-inf"))
    tl.store(LSE + pid_tok * H + offs_h, lse, mask=heads)


@triton.jit
def _sparse_mla_bwd_kernel(
    QN,
    QR,
    CKV,
    KR,
    IDX,
    O,  # [B, T, H, R]
    DO,  # [B, T, H, R], O's strides
    LSE,  # [B, T, H] fp32 contiguous
    DQN,  # [B, T, H, R] contiguous
    DQR,  # [B, T, H, DR] contiguous
    DC,  # [B, L, R] fp32, zeroed, contiguous
    DKR,  # [B, L, DR] fp32, zeroed, contiguous
    scale,
    qk_scale,
    stride_qnb,
    stride_qnt,
    stride_qnh,
    stride_qrb,
    stride_qrt,
    stride_qrh,
    stride_cb,
    stride_cl,
    stride_kb,
    stride_kl,
    stride_ib,
    stride_it,
    stride_ob,
    stride_ot,
    stride_oh,
    T,
    H,
    N,
    L,
    R,
    DR,
    BLOCK_H: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_tok = tl.program_id(0)
    b = (pid_tok // T).to(tl.int64)
    t = (pid_tok % T).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_n = tl.arange(0, BLOCK_N)
    heads = offs_h < H
    tile_r = heads[:, None] & (offs_r[None, :] < R)
    tile_dr = heads[:, None] & (offs_dr[None, :] < DR)

    qn_ptrs = QN + b * stride_qnb + t * stride_qnt + offs_h[:, None] * stride_qnh + offs_r[None, :]
    qn = tl.load(qn_ptrs, mask=tile_r, other=0.0)
    qr_ptrs = QR + b * stride_qrb + t * stride_qrt + offs_h[:, None] * stride_qrh + offs_dr[None, :]
    qr = tl.load(qr_ptrs, mask=tile_dr, other=0.0)
    o_off = b * stride_ob + t * stride_ot + offs_h[:, None] * stride_oh + offs_r[None, :]
    do = tl.load(DO + o_off, mask=tile_r, other=0.0)
    delta = tl.sum(do.to(tl.float32) * tl.load(O + o_off, mask=tile_r, other=0.0).to(tl.float32), 1)  # Δ [BLOCK_H]
    # base-2 log-sum-exp; +inf for padding heads (their P is exp2(−inf) = 0)
    lse2 = tl.load(LSE + pid_tok.to(tl.int64) * H + offs_h, mask=heads, other=float("inf")) * 1.4426950408889634

    dqn = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    dqr = tl.zeros([BLOCK_H, BLOCK_DR], dtype=tl.float32)
    idx_base = IDX + b * stride_ib + t * stride_it
    for n0 in range(0, N, BLOCK_N):
        j = n0 + offs_n
        sel = tl.load(idx_base + j, mask=j < N, other=-1)
        valid = sel >= 0
        c, kr = _load_rows(CKV, KR, b, sel, valid, stride_cb, stride_cl, stride_kb, stride_kl, offs_r, offs_dr, R, DR)
        # rows: heads (for dq)
        s = tl.dot(qn, tl.trans(c), input_precision=DOT_PRECISION)
        s = tl.dot(qr, tl.trans(kr), s, input_precision=DOT_PRECISION)
        p = tl.where(valid[None, :], tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(c), input_precision=DOT_PRECISION)
        ds = (p * (dp - delta[:, None])).to(c.dtype)
        dqn = tl.dot(ds, c, dqn, input_precision=DOT_PRECISION)
        dqr = tl.dot(ds, kr, dqr, input_precision=DOT_PRECISION)
        # rows: keys (for dc_kv, dk_rope), computed transposed by their own dots (no tl.trans of a dot result)
        sT = tl.dot(c, tl.trans(qn), input_precision=DOT_PRECISION)
        sT = tl.dot(kr, tl.trans(qr), sT, input_precision=DOT_PRECISION)
        pT = tl.where(valid[:, None], tl.math.exp2(sT * qk_scale - lse2[None, :]), 0.0)
        dpT = tl.dot(c, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = (pT * (dpT - delta[None, :]) * scale).to(c.dtype)
        dc = tl.dot(pT.to(c.dtype), do, input_precision=DOT_PRECISION)
        dc = tl.dot(dsT, qn, dc, input_precision=DOT_PRECISION)
        dkr = tl.dot(dsT, qr, input_precision=DOT_PRECISION)
        rows = tl.where(valid, sel, 0).to(tl.int64)
        tl.atomic_add(
            DC + b * L * R + rows[:, None] * R + offs_r[None, :], dc, mask=valid[:, None] & (offs_r[None, :] < R)
        )
        tl.atomic_add(
            DKR + b * L * DR + rows[:, None] * DR + offs_dr[None, :],
            dkr,
            mask=valid[:, None] & (offs_dr[None, :] < DR),
        )
    q_off = pid_tok.to(tl.int64) * H + offs_h[:, None]
    tl.store(DQN + q_off * R + offs_r[None, :], (dqn * scale).to(DQN.dtype.element_ty), mask=tile_r)
    tl.store(DQR + q_off * DR + offs_dr[None, :], (dqr * scale).to(DQR.dtype.element_ty), mask=tile_dr)


# ---- launchers ------------------------------------------------------------------------------------------------
# CUDA bf16/fp16 configurations, autotuned per (H, R, DR, dtype). At R = 512, DR = 64 the [64 heads, 512] fp32
# accumulator spills 470-2600 B in each of them (ptxas report: benchmarks/compile_report_dsa.py), and num_stages > 1
# would not pipeline the gathered row loads (same shared memory). 32-head blocks (no spills, but mma.sync and every
# selected row read twice) were tried as candidates on the H200 on 2026-12-03: the forward stayed at 126-128 TFLOP/s
# (benchmarks/results/dsa_h200.md), so they were left out again.
_FWD_CONFIGS = [(32, 8, 1), (16, 8, 1), (32, 16, 1), (64, 8, 1)]  # (BLOCK_N, num_warps, num_stages)
_BWD_CONFIGS = [(16, 16, 8, 1), (16, 16, 4, 1), (32, 16, 8, 1)]  # (BLOCK_H, BLOCK_N, num_warps, num_stages)

_fwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in _FWD_CONFIGS],
    key=["H", "BLOCK_R", "BLOCK_DR", "SPLIT", "DOT_PRECISION"],
)(_sparse_mla_fwd_kernel)
_bwd_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bh, bn, w, s in _BWD_CONFIGS],
    key=["H", "BLOCK_R", "BLOCK_DR", "DOT_PRECISION"],
    reset_to_zero=["DC", "DKR"],  # the atomics accumulate: every autotune trial starts from zeros
)(_sparse_mla_bwd_kernel)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact fp32 dots, not TF32


def _dims(H: int, R: int, DR: int) -> dict:
    """Power-of-two tile widths (≥ 16, tl.dot's smallest) covering the head block, R and DR."""
    return dict(
        BLOCK_H=min(64, max(16, triton.next_power_of_2(H))),
        BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_DR=max(16, triton.next_power_of_2(DR)),
    )


def _last_contiguous(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _launch_fwd(q_nope, q_rope, c_kv, k_rope, idx, scale, num_splits):
    B, T, H, R = q_nope.shape
    DR, N = q_rope.shape[-1], idx.shape[-1]
    dims = _dims(H, R, DR)
    split = num_splits > 1
    if split:  # partial results, merged by _combine_kernel
        o = torch.empty((B, T, num_splits, H, R), dtype=torch.float32, device=q_nope.device)
        lse = torch.empty((B, T, num_splits, H), dtype=torch.float32, device=q_nope.device)
        so, sl = (o.stride(0), o.stride(1), o.stride(2), o.stride(3)), (lse.stride(0), lse.stride(1), lse.stride(2))
    else:
        o = torch.empty((B, T, H, R), dtype=q_nope.dtype, device=q_nope.device)
        lse = torch.empty((B, T, H), dtype=torch.float32, device=q_nope.device)
        so, sl = (o.stride(0), o.stride(1), 0, o.stride(2)), (lse.stride(0), lse.stride(1), 0)
    interp = q_nope.device.type != "cuda"
    block_n = 16 if interp else 64
    keys_per_split = triton.cdiv(triton.cdiv(N, num_splits), block_n) * block_n
    args = (q_nope, q_rope, c_kv, k_rope, idx, o, lse, scale * LOG2E)
    args += (q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), q_rope.stride(0), q_rope.stride(1), q_rope.stride(2))
    args += (c_kv.stride(0), c_kv.stride(1), k_rope.stride(0), k_rope.stride(1), idx.stride(0), idx.stride(1))
    args += (*so, *sl, T, H, N, R, DR, keys_per_split)
    grid = (B * T, triton.cdiv(H, dims["BLOCK_H"]), num_splits)
    consts = dict(SPLIT=split, DOT_PRECISION=_precision(q_nope.dtype), **dims)
    if not interp and q_nope.dtype != torch.float32:
        _fwd_tuned[grid](*args, **consts)
    elif not interp:  # fp32 on CUDA: the checking dtype, small fixed tiles
        _sparse_mla_fwd_kernel[grid](*args, BLOCK_N=16, num_warps=4, num_stages=1, **consts)
    else:
        _sparse_mla_fwd_kernel[grid](*args, BLOCK_N=16, **consts)
    return o, lse


def sparse_mla_fwd(q_nope, q_rope, c_kv, k_rope, idx, scale: float):
    """q_nope [B, T, H, R], q_rope [B, T, H, DR], c_kv [B, L, R], k_rope [B, L, DR] (one dtype), idx [B, T, N]
    int32 (−1 = empty), scale > 0 → o [B, T, H, R] in q's dtype, lse [B, T, H] fp32 (natural log; −inf for a
    token whose slots are all empty). Arguments as validated by ``glmkit.ops.sparse_mla``."""
    require_kernel_device(q_nope)
    q_nope, q_rope, c_kv, k_rope = _last_contiguous(q_nope, q_rope, c_kv, k_rope)
    return _launch_fwd(q_nope, q_rope, c_kv, k_rope, idx.contiguous(), scale, 1)


def _num_splits(programs: int, N: int, device) -> int:
    """Splits per token so that the decode grid has about two programs per SM (an H200 has 132), each with at
    least 64 slots; under the interpreter an imaginary 2-SM device, so that small tests split too."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    min_slots = 64 if device.type == "cuda" else 16
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(N, min_slots)))


def sparse_mla_decode_fwd(q_nope, q_rope, c_kv, k_rope, idx, scale: float):
    """``sparse_mla_fwd`` for a few query tokens against a long latent cache (decoding): the slots of each token
    are split across programs and the partial results combined. Same arguments and results."""
    require_kernel_device(q_nope)
    q_nope, q_rope, c_kv, k_rope = _last_contiguous(q_nope, q_rope, c_kv, k_rope)
    idx = idx.contiguous()
    B, T, H, R = q_nope.shape
    dims = _dims(H, R, q_rope.shape[-1])
    ns = _num_splits(B * T * triton.cdiv(H, dims["BLOCK_H"]), idx.shape[-1], q_nope.device)
    if ns == 1:
        return _launch_fwd(q_nope, q_rope, c_kv, k_rope, idx, scale, 1)
    o_part, lse_part = _launch_fwd(q_nope, q_rope, c_kv, k_rope, idx, scale, ns)
    o = torch.empty((B, T, H, R), dtype=q_nope.dtype, device=q_nope.device)
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q_nope.device)
    kw = {} if q_nope.device.type != "cuda" else dict(num_warps=8)  # a [64, 512] fp32 tile: 128 registers a thread
    _combine_kernel[(B * T, triton.cdiv(H, dims["BLOCK_H"]))](
        o_part, lse_part, o, lse, o.stride(0), o.stride(1), o.stride(2), T, H, R, ns,
        BLOCK_H=dims["BLOCK_H"], BLOCK_R=dims["BLOCK_R"], **kw,
    )  # fmt: skip
    return o, lse


def sparse_mla_bwd(do, q_nope, q_rope, c_kv, k_rope, idx, o, lse, scale: float):
    """Gradients of ``sparse_mla_fwd``: do and o [B, T, H, R], lse [B, T, H] from the forward, the forward's other
    arguments. Returns dq_nope, dq_rope (q's dtype), dc_kv [B, L, R], dk_rope [B, L, DR] (c_kv's dtype)."""
    require_kernel_device(q_nope)
    q_nope, q_rope, c_kv, k_rope = _last_contiguous(q_nope, q_rope, c_kv, k_rope)
    o, do = o.contiguous(), do.contiguous()  # one set of strides for both
    idx, lse = idx.contiguous(), lse.contiguous()
    B, T, H, R = q_nope.shape
    L, DR, N = c_kv.shape[1], q_rope.shape[-1], idx.shape[-1]
    dqn = torch.empty((B, T, H, R), dtype=q_nope.dtype, device=q_nope.device)
    dqr = torch.empty((B, T, H, DR), dtype=q_rope.dtype, device=q_nope.device)
    dc = torch.zeros((B, L, R), dtype=torch.float32, device=q_nope.device)
    dkr = torch.zeros((B, L, DR), dtype=torch.float32, device=q_nope.device)
    args = (q_nope, q_rope, c_kv, k_rope, idx, o, do, lse, dqn, dqr, dc, dkr, scale, scale * LOG2E)
    args += (q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), q_rope.stride(0), q_rope.stride(1), q_rope.stride(2))
    args += (c_kv.stride(0), c_kv.stride(1), k_rope.stride(0), k_rope.stride(1), idx.stride(0), idx.stride(1))
    args += (o.stride(0), o.stride(1), o.stride(2), T, H, N, L, R, DR)
    dims = _dims(H, R, DR)
    consts = dict(DOT_PRECISION=_precision(q_nope.dtype), BLOCK_R=dims["BLOCK_R"], BLOCK_DR=dims["BLOCK_DR"])
    interp = q_nope.device.type != "cuda"
    if not interp and q_nope.dtype != torch.float32:
        _bwd_tuned[lambda meta: (B * T, triton.cdiv(H, meta["BLOCK_H"]))](*args, **consts)
    else:
        kw = {} if interp else dict(num_warps=4, num_stages=1)
        _sparse_mla_bwd_kernel[(B * T, triton.cdiv(H, 16))](*args, BLOCK_H=16, BLOCK_N=16, **kw, **consts)
    return dqn, dqr, dc.to(c_kv.dtype), dkr.to(k_rope.dtype)
