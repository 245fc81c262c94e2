"""Chunked gated delta rule (Gated DeltaNet and KDA), forward and backward, and the fused decode step.

What it computes: ``glmkit.ops.delta_rule.chunk_gated_delta_rule_reference`` — the same chunkwise algorithm,
written for a GPU — for a scalar log-decay per head (g [B, T, H], Gated DeltaNet) or one per key channel
(g [B, T, H, K], KDA), with the gradients of q, k, v, g, beta and the initial state; and the recurrent step
(``gated_delta_rule_reference`` one token at a time) for decoding.

Forward, per chunk of BT tokens (64 on a GPU), each line one kernel:

    G  = in-chunk cumsum of g                              _cumsum_kernel     (fp32; per channel for KDA)
    A_kk, A_qk by sub-chunks (KDA only)                    _kda_intra_kernel
    T = (I + A_kk)^{-1};  W = T·βK·exp(G), U = T·βV        _solve_kernel      (A_kk inline for a scalar gate)
    for each chunk in order: hs[n] = H; V' = U − W H;      _state_fwd_kernel  (the only sequential pass,
        H ← exp(G_last) H + (K exp(G_last − G))ᵀ V'                            one program per (b, h, V-block))
    O = scale·(Q exp(G)) hs[n] + A_qk V'                   _output_kernel     (A_qk inline for a scalar gate)

The UT transform inverts the unit lower-triangular (I + A) in two steps: the BC×BC diagonal blocks (BC = 16)
by column elimination, all blocks at once in one BT×BT register tile (BC steps), then the off-diagonal
blocks by the truncated Neumann series T = Σ_{m<NC} (−T_D L)^m T_D, where T_D is the block-diagonal
inverse, L the strictly block-lower part of A and NC = BT/BC (T_D L is nilpotent of order NC).

KDA's A_kk, A_qk need Σ_c x_rc k_jc exp(G_rc − G_jc). A per-channel decay does not factor out of that sum, and
exp(G_r) alone under- or overflows across a chunk. So the chunk is cut into sub-chunks of BC rows: a block
below the diagonal is one matmul with both factors measured from the sub-chunk's first row n,
(x_r exp(G_r − G_n)) · (k_j exp(G_n − G_j)), both ≤ 1; a diagonal block is summed column by column with
exp(G_r − G_j) directly. The backward differentiates exactly these pieces (_intra_bwd_kernel).

Backward (recomputes G, T, W, U, hs, V' with the forward's kernels, nothing stored but the inputs):

    dA_qk = dO V'ᵀ (masked), dV'_local = A_qkᵀ dO                       _dv_local_kernel
    for each chunk in reverse: dhs[n] = dH; dV' = dV'_local + K exp(G_last − G) dH;
        dH ← exp(G_last) dH + scale·(Q exp(G))ᵀ dO − Wᵀ dV'              _state_bwd_kernel  (→ d initial state)
    through O, V' = U − W H, the state update and W, U = T(...):         _grad_kernel
        dq, dk, dv, dβ, dG (partial), dA_kk = −Tᵀ dT Tᵀ
    through A_kk, A_qk (by sub-chunks for KDA), finishing dq, dk, dβ     _intra_bwd_kernel
    dg = reverse in-chunk cumsum of dG                                   _cumsum_kernel

Hopper and triton 3.4-3.7.0: ``tl.trans`` of a ``tl.dot`` result (the MMA accumulator layout) fed to another
``tl.dot`` miscompiles there (fla #640: the shared-memory store of the transposed accumulator is emitted as
stmatrix; fla refuses its gated backward for it). These kernels never do that: a transposed operand is either
loaded transposed (pointer arithmetic), or ``tl.trans`` of a tile built only from loads and elementwise math,
or computed transposed by its own ``tl.dot`` with the operands swapped.

Decode: _recurrent_kernel runs a few tokens of the recurrence with the state tile in registers: each state
element is read once and written once per call (in place).

Launchers assume arguments validated by ``glmkit.ops.delta_rule`` (contiguous [B, T, H, ·] layouts, K ≤ 256).
On CUDA each kernel is autotuned over a short config list; under the Triton interpreter a fixed small
configuration runs (chunk 32 of two 16-row sub-chunks, 16-wide K and V blocks), so the tests cross every
block boundary at small shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

SUB_CHUNK = 16  # BC: rows per sub-chunk; the smallest tile tl.dot accepts


@triton.jit
def _cumsum_kernel(
    x, y, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr
):
    """In-chunk (reverse) cumulative sum over tokens of x [B, T, H, D] (D = 1 for a scalar gate), in fp32."""
    i_t, i_bh, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    rows = i_t * BT + tl.arange(0, BT)
    cd = i_d * BD + tl.arange(0, BD)
    m = (rows < T)[:, None] & (cd < D)[None, :]
    p = ((i_b * T + rows).to(tl.int64) * H + i_h)[:, None] * D + cd[None, :]
    s = tl.cumsum(tl.load(x + p, mask=m, other=0.0).to(tl.float32), axis=0, reverse=REVERSE)
    tl.store(y + p, s.to(y.dtype.element_ty), mask=m)


@triton.jit
def _kda_intra_kernel(
    q,
    k,
    G,
    beta,
    aqk,
    akk,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Rows [n0, n0 + BC) of KDA's A_qk (scale, j ≤ r) and A_kk (β, j < r), [B, T, H, BT] fp32 each."""
    NC: tl.constexpr = BT // BC
    i_ts, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, i_s = i_ts // NC, i_ts % NC
    i_b, i_h = i_bh // H, i_bh % H
    n0 = i_t * BT + i_s * BC
    if n0 >= T:
        return
    rows = n0 + tl.arange(0, BC)
    cols = i_t * BT + tl.arange(0, BT)
    mr, mc = rows < T, cols < T
    tr = (i_b * T + rows).to(tl.int64) * H + i_h
    tc = (i_b * T + cols).to(tl.int64) * H + i_h
    t_n = (i_b * T + n0).to(tl.int64) * H + i_h
    before = cols < n0  # columns of earlier sub-chunks: the blocks below the diagonal
    s_qk = tl.zeros([BC, BT], dtype=tl.float32)
    s_kk = tl.zeros([BC, BT], dtype=tl.float32)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        mk = ck < K
        m_r = mr[:, None] & mk[None, :]
        q_r = tl.load(q + tr[:, None] * K + ck[None, :], mask=m_r, other=0.0).to(tl.float32)
        k_r = tl.load(k + tr[:, None] * K + ck[None, :], mask=m_r, other=0.0).to(tl.float32)
        g_r = tl.load(G + tr[:, None] * K + ck[None, :], mask=m_r, other=0.0)
        g_n = tl.load(G + t_n * K + ck, mask=mk, other=0.0)  # G at the sub-chunk's first row
        e_r = tl.exp(tl.where(mr[:, None], g_r - g_n[None, :], 0.0))
        m_c = mk[:, None] & mc[None, :]
        k_ct = tl.load(k + tc[None, :] * K + ck[:, None], mask=m_c, other=0.0).to(tl.float32)  # [BK, BT]
        g_ct = tl.load(G + tc[None, :] * K + ck[:, None], mask=m_c, other=0.0)
        k_ct = k_ct * tl.exp(tl.where(before[None, :], g_n[:, None] - g_ct, float("-inf")))
        s_qk += tl.dot(q_r * e_r, k_ct, input_precision=PREC)
        s_kk += tl.dot(k_r * e_r, k_ct, input_precision=PREC)
        for c in range(BC):  # the diagonal block, one column j at a time
            j = n0 + c
            k_j = tl.load(k + (t_n + c * H) * K + ck, mask=mk & (j < T), other=0.0).to(tl.float32)
            g_j = tl.load(G + (t_n + c * H) * K + ck, mask=mk & (j < T), other=0.0)
            incl = mr & (rows >= j)
            f = tl.exp(tl.where(incl[:, None], g_r - g_j[None, :], float("-inf"))) * k_j[None, :]
            col = cols[None, :] == j
            s_qk += tl.where(col, tl.sum(q_r * f, 1)[:, None], 0.0)
            s_kk += tl.where(col & (rows > j)[:, None], tl.sum(k_r * f, 1)[:, None], 0.0)
    b_r = tl.load(beta + tr, mask=mr, other=0.0).to(tl.float32)
    p = tr[:, None] * BT + tl.arange(0, BT)[None, :]
    tl.store(aqk + p, s_qk * scale, mask=mr[:, None])
    tl.store(akk + p, s_kk * b_r[:, None], mask=mr[:, None])


@triton.jit
def _invert_unit_lower(a, BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """(I + a)^{-1} for a strictly lower [BT, BT] fp32 tile: diagonal BC-blocks by column elimination (every
    block at once), the rest by the Neumann series of the block-lower part (see the module docstring)."""
    r = tl.arange(0, BT)
    blk = r // BC * BC  # first row of each row's sub-chunk
    same = blk[:, None] == blk[None, :]
    d = tl.where(same, a, 0.0)
    t_d = tl.where(r[:, None] == r[None, :], 1.0, 0.0)
    for i in range(BC):
        # T_D ← (I − l_j e_jᵀ) T_D for the column j = blk + i of every block: T_D[x, c] −= D[x, j] T_D[j, c]
        step = blk + i
        l_col = tl.sum(tl.where(r[None, :] == step[:, None], d, 0.0), axis=1)
        t_row = tl.sum(tl.where(r[:, None] == step[None, :], t_d, 0.0), axis=0)
        t_d -= tl.where(same, l_col[:, None] * t_row[None, :], 0.0)
    n = tl.dot(t_d, a - d, input_precision=PREC)  # T_D L, strictly block-lower
    t = t_d
    for _ in tl.static_range(BT // BC - 1):
        t = t_d - tl.dot(n, t, input_precision=PREC)
    return t


@triton.jit
def _solve_kernel(
    k,
    v,
    G,
    beta,
    akk,
    w,
    u,
    tm,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    STORE_T: tl.constexpr,
    PREC: tl.constexpr,
):
    """T = (I + A_kk)^{-1} of one chunk, then W = T·(βK ⊙ exp(G)) [B, T, H, K] and U = T·βV [B, T, H, V]."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    r = tl.arange(0, BT)
    rows = i_t * BT + r
    mr = rows < T
    tr = (i_b * T + rows).to(tl.int64) * H + i_h
    b_r = tl.load(beta + tr, mask=mr, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        a = tl.load(akk + tr[:, None] * BT + r[None, :], mask=mr[:, None], other=0.0)
    else:
        g_r = tl.load(G + tr, mask=mr, other=0.0)
        a = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, K, BK):
            ck = i_k + tl.arange(0, BK)
            k_r = tl.load(k + tr[:, None] * K + ck[None, :], mask=mr[:, None] & (ck < K)[None, :], other=0.0)
            k_t = tl.load(k + tr[None, :] * K + ck[:, None], mask=(ck < K)[:, None] & mr[None, :], other=0.0)
            a += tl.dot(k_r, k_t, input_precision=PREC)
        strict = (r[:, None] > r[None, :]) & mr[:, None]
        a = tl.where(strict, a * tl.exp(tl.where(strict, g_r[:, None] - g_r[None, :], 0.0)), 0.0) * b_r[:, None]
    t = _invert_unit_lower(a, BT, BC, PREC).to(w.dtype.element_ty)
    if STORE_T:
        tl.store(tm + tr[:, None] * BT + r[None, :], t, mask=mr[:, None])
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        m = mr[:, None] & (ck < K)[None, :]
        k_r = tl.load(k + tr[:, None] * K + ck[None, :], mask=m, other=0.0).to(tl.float32)
        if PER_CHANNEL:
            k_r = k_r * tl.exp(tl.load(G + tr[:, None] * K + ck[None, :], mask=m, other=0.0)) * b_r[:, None]
        else:
            k_r = k_r * (b_r * tl.exp(g_r))[:, None]
        w_r = tl.dot(t, k_r.to(w.dtype.element_ty), input_precision=PREC)
        tl.store(w + tr[:, None] * K + ck[None, :], w_r.to(w.dtype.element_ty), mask=m)
    for i_v in range(0, V, BV):
        cv = i_v + tl.arange(0, BV)
        m = mr[:, None] & (cv < V)[None, :]
        v_r = tl.load(v + tr[:, None] * V + cv[None, :], mask=m, other=0.0).to(tl.float32) * b_r[:, None]
        u_r = tl.dot(t, v_r.to(u.dtype.element_ty), input_precision=PREC)
        tl.store(u + tr[:, None] * V + cv[None, :], u_r.to(u.dtype.element_ty), mask=m)


@triton.jit
def _state_fwd_kernel(
    k,
    w,
    u,
    G,
    h0,
    hs,
    vn,
    ht,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PREC: tl.constexpr,
):
    """The sequential pass over chunks for one (b, h, V-block), the [K, BV] state in registers (BK ≥ K):
    stores the state entering each chunk (hs [B, NT, H, K, V]) and V' = U − W H (vn [B, T, H, V])."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = w.dtype.element_ty
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk, mv = ck < K, cv < V
    m_kv = mk[:, None] & mv[None, :]
    p_kv = ck[:, None] * V + cv[None, :]
    state = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0 + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)
    for n in range(NT):
        rows = n * BT + tl.arange(0, BT)
        mr = rows < T
        tr = (i_b * T + rows).to(tl.int64) * H + i_h
        tl.store(hs + ((i_b * NT + n).to(tl.int64) * H + i_h) * K * V + p_kv, state.to(DT), mask=m_kv)
        w_r = tl.load(w + tr[:, None] * K + ck[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        m_v = mr[:, None] & mv[None, :]
        v_new = tl.load(u + tr[:, None] * V + cv[None, :], mask=m_v, other=0.0).to(tl.float32)
        v_new -= tl.dot(w_r, state.to(DT), input_precision=PREC)
        tl.store(vn + tr[:, None] * V + cv[None, :], v_new.to(DT), mask=m_v)
        t_last = (i_b * T + tl.minimum(n * BT + BT, T) - 1).to(tl.int64) * H + i_h
        k_t = tl.load(k + tr[None, :] * K + ck[:, None], mask=mk[:, None] & mr[None, :], other=0.0)  # [BK, BT]
        if PER_CHANNEL:
            g_last = tl.load(G + t_last * K + ck, mask=mk, other=0.0)
            g_t = tl.load(G + tr[None, :] * K + ck[:, None], mask=mk[:, None] & mr[None, :], other=0.0)
            k_t = (k_t * tl.exp(tl.where(mr[None, :], g_last[:, None] - g_t, float("-inf")))).to(DT)
            state = state * tl.exp(g_last)[:, None]
        else:
            g_last = tl.load(G + t_last)
            g_r = tl.load(G + tr, mask=mr, other=0.0)
            v_new = v_new * tl.exp(tl.where(mr, g_last - g_r, float("-inf")))[:, None]
            state = state * tl.exp(g_last)
        state = tl.dot(k_t, v_new.to(DT), state, input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_bh.to(tl.int64) * K * V + p_kv, state, mask=m_kv)


@triton.jit
def _output_kernel(
    q,
    k,
    G,
    aqk,
    hs,
    vn,
    o,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    PREC: tl.constexpr,
):
    """O = scale·(Q ⊙ exp(G)) hs[n] + A_qk V' for one chunk and one V-block."""
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    DT = vn.dtype.element_ty
    r = tl.arange(0, BT)
    rows = i_t * BT + r
    mr = rows < T
    tr = (i_b * T + rows).to(tl.int64) * H + i_h
    cv = i_v * BV + tl.arange(0, BV)
    mv = cv < V
    h_base = hs + ((i_b * NT + i_t).to(tl.int64) * H + i_h) * K * V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    s = tl.zeros([BT, BT], dtype=tl.float32)
    if not PER_CHANNEL:
        g_r = tl.load(G + tr, mask=mr, other=0.0)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        m = mr[:, None] & (ck < K)[None, :]
        q_r = tl.load(q + tr[:, None] * K + ck[None, :], mask=m, other=0.0)
        h = tl.load(h_base + ck[:, None] * V + cv[None, :], mask=(ck < K)[:, None] & mv[None, :], other=0.0)
        if PER_CHANNEL:
            q_g = q_r * tl.exp(tl.load(G + tr[:, None] * K + ck[None, :], mask=m, other=0.0))
        else:
            q_g = q_r * tl.exp(g_r)[:, None]
            k_t = tl.load(k + tr[None, :] * K + ck[:, None], mask=(ck < K)[:, None] & mr[None, :], other=0.0)
            s += tl.dot(q_r, k_t, input_precision=PREC)
        acc += tl.dot(q_g.to(DT), h, input_precision=PREC)
    if PER_CHANNEL:
        s = tl.load(aqk + tr[:, None] * BT + r[None, :], mask=mr[:, None], other=0.0)
    else:
        incl = (r[:, None] >= r[None, :]) & mr[:, None]
        s = tl.where(incl, s * tl.exp(tl.where(incl, g_r[:, None] - g_r[None, :], 0.0)), 0.0) * scale
    v_new = tl.load(vn + tr[:, None] * V + cv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
    acc = acc * scale + tl.dot(s.to(DT), v_new, input_precision=PREC)
    tl.store(o + tr[:, None] * V + cv[None, :], acc.to(o.dtype.element_ty), mask=mr[:, None] & mv[None, :])


@triton.jit
def _dv_local_kernel(
    q,
    k,
    G,
    aqk,
    vn,
    do,
    daqk,
    dvl,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    PREC: tl.constexpr,
):
    """dA_qk = dO V'ᵀ (j ≤ r) and the chunk-local part of dV', A_qkᵀ dO, for one chunk (fp32 both)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = vn.dtype.element_ty
    r = tl.arange(0, BT)
    rows = i_t * BT + r
    mr = rows < T
    tr = (i_b * T + rows).to(tl.int64) * H + i_h
    if PER_CHANNEL:  # A_qkᵀ, loaded transposed: s_t[j, r] = A_qk[r, j]
        s_t = tl.load(aqk + tr[None, :] * BT + r[:, None], mask=mr[None, :], other=0.0)
    else:  # A_qkᵀ computed transposed, as K Qᵀ
        g_r = tl.load(G + tr, mask=mr, other=0.0)
        s_t = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, K, BK):
            ck = i_k + tl.arange(0, BK)
            k_r = tl.load(k + tr[:, None] * K + ck[None, :], mask=mr[:, None] & (ck < K)[None, :], other=0.0)
            q_t = tl.load(q + tr[None, :] * K + ck[:, None], mask=(ck < K)[:, None] & mr[None, :], other=0.0)
            s_t += tl.dot(k_r, q_t, input_precision=PREC)
        upper = (r[:, None] <= r[None, :]) & mr[None, :]
        s_t = tl.where(upper, s_t * tl.exp(tl.where(upper, g_r[None, :] - g_r[:, None], 0.0)), 0.0) * scale
    s_t = s_t.to(DT)
    d_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, V, BV):
        cv = i_v + tl.arange(0, BV)
        m = mr[:, None] & (cv < V)[None, :]
        do_r = tl.load(do + tr[:, None] * V + cv[None, :], mask=m, other=0.0)
        v_t = tl.load(vn + tr[None, :] * V + cv[:, None], mask=(cv < V)[:, None] & mr[None, :], other=0.0)
        d_s += tl.dot(do_r, v_t, input_precision=PREC)
        tl.store(dvl + tr[:, None] * V + cv[None, :], tl.dot(s_t, do_r, input_precision=PREC), mask=m)
    d_s = tl.where((r[:, None] >= r[None, :]) & mr[:, None], d_s, 0.0)
    tl.store(daqk + tr[:, None] * BT + r[None, :], d_s, mask=mr[:, None])


@triton.jit
def _state_bwd_kernel(
    q,
    k,
    w,
    G,
    do,
    dvl,
    dht,
    dhs,
    dvn,
    dh0,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    PREC: tl.constexpr,
):
    """The reverse pass over chunks: dhs[n] = dL/dH after chunk n ([B, NT, H, K, V]), dV' = dV'_local +
    K exp(G_last − G) dhs[n] ([B, T, H, V] fp32), and dL/d(initial state) at the end."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = w.dtype.element_ty
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk, mv = ck < K, cv < V
    m_kv = mk[:, None] & mv[None, :]
    p_kv = ck[:, None] * V + cv[None, :]
    dstate = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate += tl.load(dht + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)
    for i in range(NT):
        n = NT - 1 - i
        rows = n * BT + tl.arange(0, BT)
        mr = rows < T
        tr = (i_b * T + rows).to(tl.int64) * H + i_h
        tl.store(dhs + ((i_b * NT + n).to(tl.int64) * H + i_h) * K * V + p_kv, dstate.to(DT), mask=m_kv)
        t_last = (i_b * T + tl.minimum(n * BT + BT, T) - 1).to(tl.int64) * H + i_h
        m_rk = mr[:, None] & mk[None, :]
        k_r = tl.load(k + tr[:, None] * K + ck[None, :], mask=m_rk, other=0.0)
        q_t = tl.load(q + tr[None, :] * K + ck[:, None], mask=mk[:, None] & mr[None, :], other=0.0).to(tl.float32)
        if PER_CHANNEL:
            g_last = tl.load(G + t_last * K + ck, mask=mk, other=0.0)
            g_r = tl.load(G + tr[:, None] * K + ck[None, :], mask=m_rk, other=0.0)
            k_r = (k_r * tl.exp(tl.where(mr[:, None], g_last[None, :] - g_r, float("-inf")))).to(DT)
            d_v = tl.dot(k_r, dstate.to(DT), input_precision=PREC)
            q_t = q_t * tl.exp(tl.load(G + tr[None, :] * K + ck[:, None], mask=mk[:, None] & mr[None, :], other=0.0))
            decay = tl.exp(g_last)[:, None]
        else:
            g_last = tl.load(G + t_last)
            g_r = tl.load(G + tr, mask=mr, other=0.0)
            d_v = tl.dot(k_r, dstate.to(DT), input_precision=PREC)
            d_v = d_v * tl.exp(tl.where(mr, g_last - g_r, float("-inf")))[:, None]
            q_t = q_t * tl.exp(g_r)[None, :]
            decay = tl.exp(g_last)
        m_v = mr[:, None] & mv[None, :]
        d_v += tl.load(dvl + tr[:, None] * V + cv[None, :], mask=m_v, other=0.0)
        tl.store(dvn + tr[:, None] * V + cv[None, :], d_v, mask=m_v)
        do_r = tl.load(do + tr[:, None] * V + cv[None, :], mask=m_v, other=0.0)
        w_t = tl.load(w + tr[None, :] * K + ck[:, None], mask=mk[:, None] & mr[None, :], other=0.0)
        dstate = dstate * decay + scale * tl.dot(q_t.to(DT), do_r, input_precision=PREC)
        dstate -= tl.dot(w_t, d_v.to(DT), input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + p_kv, dstate, mask=m_kv)


@triton.jit
def _grad_kernel(
    q,
    k,
    v,
    G,
    beta,
    tm,
    hs,
    dhs,
    vn,
    dvn,
    do,
    dv,
    dq_p,
    dk_p,
    db_p,
    dg_p,
    dakk,
    scale,
    T,
    NT,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    PREC: tl.constexpr,
):
    """One chunk, through O = scale·(Q exp(G)) H + A_qk V', V' = U − W H, the state update and W, U = T(...):
    dv (final), and partial dq, dk, dβ, dG (fp32), dA_kk = −Tᵀ dT Tᵀ (fp32, j < r)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = vn.dtype.element_ty
    r = tl.arange(0, BT)
    rows = i_t * BT + r
    mr = rows < T
    tr = (i_b * T + rows).to(tl.int64) * H + i_h
    t_last = (i_b * T + tl.minimum(i_t * BT + BT, T) - 1).to(tl.int64) * H + i_h
    is_last = rows == tl.minimum(i_t * BT + BT, T) - 1
    h_base = ((i_b * NT + i_t).to(tl.int64) * H + i_h) * K * V
    b_r = tl.load(beta + tr, mask=mr, other=0.0).to(tl.float32)
    t_t = tl.load(tm + tr[None, :] * BT + r[:, None], mask=mr[None, :], other=0.0)  # Tᵀ
    # V side: U = T βV  →  dv = β Tᵀ dV', dβ += Σ_v v Tᵀ dV', dT += dV' (βV)ᵀ
    d_t = tl.zeros([BT, BT], dtype=tl.float32)
    d_b = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, V, BV):
        cv = i_v + tl.arange(0, BV)
        m = mr[:, None] & (cv < V)[None, :]
        dvn_r = tl.load(dvn + tr[:, None] * V + cv[None, :], mask=m, other=0.0).to(DT)
        v_r = tl.load(v + tr[:, None] * V + cv[None, :], mask=m, other=0.0).to(tl.float32)
        v_t = tl.load(v + tr[None, :] * V + cv[:, None], mask=(cv < V)[:, None] & mr[None, :], other=0.0)
        d_t += tl.dot(dvn_r, (v_t.to(tl.float32) * b_r[None, :]).to(DT), input_precision=PREC)
        tdv = tl.dot(t_t, dvn_r, input_precision=PREC)
        tl.store(dv + tr[:, None] * V + cv[None, :], (tdv * b_r[:, None]).to(dv.dtype.element_ty), mask=m)
        d_b += tl.sum(v_r * tdv, 1)
    # K side, one K-block at a time
    d_g_row = tl.zeros([BT], dtype=tl.float32)  # scalar gate: dG summed over the channels
    if not PER_CHANNEL:
        g_v = tl.load(G + tr, mask=mr, other=0.0)
        g_r = g_v[:, None]
        g_last = tl.load(G + t_last)
        g_l = g_last
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        mk = ck < K
        d_q = tl.zeros([BT, BK], dtype=tl.float32)
        d_w = tl.zeros([BT, BK], dtype=tl.float32)
        d_kd = tl.zeros([BT, BK], dtype=tl.float32)
        d_gl = tl.zeros([BK], dtype=tl.float32)
        for i_v in range(0, V, BV):
            cv = i_v + tl.arange(0, BV)
            mv = cv < V
            m = mr[:, None] & mv[None, :]
            m_vk = mv[:, None] & mk[None, :]
            h_t = tl.load(hs + h_base + ck[None, :] * V + cv[:, None], mask=m_vk, other=0.0)  # [BV, BK]
            dh_t = tl.load(dhs + h_base + ck[None, :] * V + cv[:, None], mask=m_vk, other=0.0)
            do_r = tl.load(do + tr[:, None] * V + cv[None, :], mask=m, other=0.0)
            dvn_r = tl.load(dvn + tr[:, None] * V + cv[None, :], mask=m, other=0.0).to(DT)
            vn_r = tl.load(vn + tr[:, None] * V + cv[None, :], mask=m, other=0.0)
            d_q += tl.dot(do_r, h_t, input_precision=PREC)
            d_w -= tl.dot(dvn_r, h_t, input_precision=PREC)
            d_kd += tl.dot(vn_r, dh_t, input_precision=PREC)
            d_gl += tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32), 0)
        m = mr[:, None] & mk[None, :]
        q_r = tl.load(q + tr[:, None] * K + ck[None, :], mask=m, other=0.0).to(tl.float32)
        k_r = tl.load(k + tr[:, None] * K + ck[None, :], mask=m, other=0.0).to(tl.float32)
        m_t = mk[:, None] & mr[None, :]
        k_t = tl.load(k + tr[None, :] * K + ck[:, None], mask=m_t, other=0.0).to(tl.float32)  # Kᵀ
        if PER_CHANNEL:
            g_r = tl.load(G + tr[:, None] * K + ck[None, :], mask=m, other=0.0)
            g_last = tl.load(G + t_last * K + ck, mask=mk, other=0.0)
            g_l = g_last[None, :]
            k_bg_t = k_t * b_r[None, :] * tl.exp(tl.load(G + tr[None, :] * K + ck[:, None], mask=m_t, other=0.0))
        else:
            k_bg_t = k_t * (b_r * tl.exp(g_v))[None, :]
        gam = tl.exp(g_r)
        d_q = d_q * scale * gam
        d_g = q_r * d_q
        d_k = d_kd * tl.exp(tl.where(mr[:, None], g_l - g_r, float("-inf")))
        kde = k_r * d_k
        d_g -= kde
        d_gl = tl.sum(kde, 0) + d_gl * tl.exp(g_last)  # dL/dG_last: the state's decay and K exp(G_last − G)
        k_bg = k_r * b_r[:, None] * gam
        d_t += tl.dot(d_w, k_bg_t, input_precision=PREC)
        d_kbg = tl.dot(t_t.to(tl.float32), d_w, input_precision=PREC)
        d_k += d_kbg * b_r[:, None] * gam
        d_b += tl.sum(d_kbg * k_r * gam, 1)
        d_g += d_kbg * k_bg + tl.where(is_last[:, None], d_gl[None, :], 0.0)
        tl.store(dq_p + tr[:, None] * K + ck[None, :], d_q, mask=m)
        tl.store(dk_p + tr[:, None] * K + ck[None, :], d_k, mask=m)
        if PER_CHANNEL:
            tl.store(dg_p + tr[:, None] * K + ck[None, :], d_g, mask=m)
        else:
            d_g_row += tl.sum(d_g, 1)
    tl.store(db_p + tr, d_b, mask=mr)
    if not PER_CHANNEL:
        tl.store(dg_p + tr, d_g_row, mask=mr)
    # T = (I + A_kk)^{-1}  →  dA_kk = −Tᵀ dT Tᵀ, strictly lower
    t_t = t_t.to(tl.float32)
    d_a = -tl.dot(tl.dot(t_t, d_t, input_precision=PREC), t_t, input_precision=PREC)
    d_a = tl.where((r[:, None] > r[None, :]) & mr[:, None], d_a, 0.0)
    tl.store(dakk + tr[:, None] * BT + r[None, :], d_a, mask=mr[:, None])


@triton.jit
def _intra_bwd_kernel(
    q,
    k,
    G,
    beta,
    dakk,
    daqk,
    dq_p,
    dk_p,
    db_p,
    dg_p,
    dq,
    dk,
    db,
    dg,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Scalar gate, one chunk: through A_kk = β (KKᵀ ⊙ Γ) and A_qk = scale (QKᵀ ⊙ Γ), Γ_rj = exp(G_r − G_j);
    adds to the partial dq, dk, dβ, dG and writes the totals (dG still per position, before the cumsum)."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    r = tl.arange(0, BT)
    rows = i_t * BT + r
    mr = rows < T
    tr = (i_b * T + rows).to(tl.int64) * H + i_h
    g_r = tl.load(G + tr, mask=mr, other=0.0)
    b_r = tl.load(beta + tr, mask=mr, other=0.0).to(tl.float32)
    incl = (r[:, None] >= r[None, :]) & mr[:, None]
    gam = tl.where(incl, tl.exp(tl.where(incl, g_r[:, None] - g_r[None, :], 0.0)), 0.0)
    incl_t = (r[:, None] <= r[None, :]) & mr[None, :]
    gam_t = tl.where(incl_t, tl.exp(tl.where(incl_t, g_r[None, :] - g_r[:, None], 0.0)), 0.0)  # Γᵀ
    p_a = tr[:, None] * BT + r[None, :]
    p_at = tr[None, :] * BT + r[:, None]
    m_kk = tl.load(dakk + p_a, mask=mr[:, None], other=0.0) * gam  # dA_kk ⊙ Γ (dA_kk is 0 for j ≥ r)
    n_qk = tl.load(daqk + p_a, mask=mr[:, None], other=0.0) * gam * scale
    m_kk_t = tl.load(dakk + p_at, mask=mr[None, :], other=0.0) * gam_t * b_r[None, :]  # the same, transposed
    n_qk_t = tl.load(daqk + p_at, mask=mr[None, :], other=0.0) * gam_t * scale
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        m = mr[:, None] & (ck < K)[None, :]
        k_r = tl.load(k + tr[:, None] * K + ck[None, :], mask=m, other=0.0)
        q_r = tl.load(q + tr[:, None] * K + ck[None, :], mask=m, other=0.0)
        k_t = tl.load(k + tr[None, :] * K + ck[:, None], mask=(ck < K)[:, None] & mr[None, :], other=0.0)
        kk += tl.dot(k_r, k_t, input_precision=PREC)
        qk += tl.dot(q_r, k_t, input_precision=PREC)
    d_b = tl.sum(m_kk * kk, 1)
    m_kk = m_kk * b_r[:, None]  # dL/d(KKᵀ ⊙ Γ)
    e_kk, e_qk = m_kk * kk, n_qk * qk  # dL/dΓ ⊙ Γ: +row sums to G_r, −column sums to G_j
    d_g = tl.sum(e_kk, 1) - tl.sum(e_kk, 0) + tl.sum(e_qk, 1) - tl.sum(e_qk, 0)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        m = mr[:, None] & (ck < K)[None, :]
        p = tr[:, None] * K + ck[None, :]
        k_r = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
        q_r = tl.load(q + p, mask=m, other=0.0).to(tl.float32)
        d_q = tl.load(dq_p + p, mask=m, other=0.0) + tl.dot(n_qk, k_r, input_precision=PREC)
        d_k = tl.load(dk_p + p, mask=m, other=0.0) + tl.dot(m_kk, k_r, input_precision=PREC)
        d_k += tl.dot(m_kk_t, k_r, input_precision=PREC) + tl.dot(n_qk_t, q_r, input_precision=PREC)
        tl.store(dq + p, d_q.to(dq.dtype.element_ty), mask=m)
        tl.store(dk + p, d_k.to(dk.dtype.element_ty), mask=m)
    tl.store(db + tr, (tl.load(db_p + tr, mask=mr, other=0.0) + d_b).to(db.dtype.element_ty), mask=mr)
    tl.store(dg + tr, tl.load(dg_p + tr, mask=mr, other=0.0) + d_g, mask=mr)


@triton.jit
def _kda_intra_bwd_kernel(
    q,
    k,
    G,
    beta,
    dakk,
    daqk,
    dq_p,
    dk_p,
    db_p,
    dg_p,
    dq,
    dk,
    db,
    dg,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Per-channel gate, rows [n0, n0 + BC) of one chunk, through A_kk and A_qk as _kda_intra_kernel builds
    them: each row r as a row (dq, dk from Σ_j dA_rj k_j exp(G_r − G_j)) and as a column (dk from
    Σ_r dA_rj x_r exp(G_r − G_j)); dG_rc = q dq + k dk(row side) − k dk(column side)."""
    NC: tl.constexpr = BT // BC
    i_ts, i_bh = tl.program_id(0), tl.program_id(1)
    i_t, i_s = i_ts // NC, i_ts % NC
    i_b, i_h = i_bh // H, i_bh % H
    n0 = i_t * BT + i_s * BC
    if n0 >= T:
        return
    c_r = i_s * BC + tl.arange(0, BC)  # the rows' positions inside the chunk
    rows = i_t * BT + c_r
    cols = i_t * BT + tl.arange(0, BT)
    mr, mc = rows < T, cols < T
    tr = (i_b * T + rows).to(tl.int64) * H + i_h
    tc = (i_b * T + cols).to(tl.int64) * H + i_h
    t_n = (i_b * T + n0).to(tl.int64) * H + i_h
    t_m = (i_b * T + tl.minimum(n0 + BC, T) - 1).to(tl.int64) * H + i_h  # the sub-chunk's last row
    before = cols < n0
    after = (cols >= n0 + BC) & mc
    b_r = tl.load(beta + tr, mask=mr, other=0.0).to(tl.float32)
    b_c = tl.load(beta + tc, mask=mc, other=0.0).to(tl.float32)
    p_row = tr[:, None] * BT + tl.arange(0, BT)[None, :]  # rows of dA: [BC, BT]
    p_col = tc[None, :] * BT + c_r[:, None]  # columns of dA, transposed: [BC, BT]
    da_kk = tl.load(dakk + p_row, mask=mr[:, None], other=0.0)
    da_qk = tl.load(daqk + p_row, mask=mr[:, None], other=0.0) * scale
    da_kk_t = tl.load(dakk + p_col, mask=mc[None, :], other=0.0)
    da_qk_t = tl.load(daqk + p_col, mask=mc[None, :], other=0.0) * scale
    d_b = tl.zeros([BC], dtype=tl.float32)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        mk = ck < K
        m_r = mr[:, None] & mk[None, :]
        m_c = mc[:, None] & mk[None, :]
        p_r = tr[:, None] * K + ck[None, :]
        q_r = tl.load(q + p_r, mask=m_r, other=0.0).to(tl.float32)
        k_r = tl.load(k + p_r, mask=m_r, other=0.0).to(tl.float32)
        g_r = tl.load(G + p_r, mask=m_r, other=0.0)
        q_c = tl.load(q + tc[:, None] * K + ck[None, :], mask=m_c, other=0.0).to(tl.float32)
        k_c = tl.load(k + tc[:, None] * K + ck[None, :], mask=m_c, other=0.0).to(tl.float32)
        g_c = tl.load(G + tc[:, None] * K + ck[None, :], mask=m_c, other=0.0)
        g_n = tl.load(G + t_n * K + ck, mask=mk, other=0.0)
        g_m = tl.load(G + t_m * K + ck, mask=mk, other=0.0)
        # row side, blocks left of the diagonal: reference row n0, both factors ≤ 1
        k_left = k_c * tl.exp(tl.where(before[:, None], g_n[None, :] - g_c, float("-inf")))
        e_rn = tl.exp(tl.where(mr[:, None], g_r - g_n[None, :], 0.0))
        rk = tl.dot(da_kk, k_left, input_precision=PREC) * e_rn
        rq = tl.dot(da_qk, k_left, input_precision=PREC) * e_rn
        # column side, blocks below the diagonal: reference row m (the sub-chunk's last), both factors ≤ 1
        f_below = tl.exp(tl.where(after[:, None], g_c - g_m[None, :], float("-inf")))
        ck_side = tl.dot(da_kk_t, k_c * b_c[:, None] * f_below, input_precision=PREC)
        ck_side += tl.dot(da_qk_t, q_c * f_below, input_precision=PREC)
        ck_side *= tl.exp(tl.where(mr[:, None], g_m[None, :] - g_r, 0.0))
        # the diagonal block, one column j at a time: row side for the rows r ≥ j, column side for j
        for c in range(BC):
            j = n0 + c
            k_j = tl.load(k + (t_n + c * H) * K + ck, mask=mk & (j < T), other=0.0).to(tl.float32)
            g_j = tl.load(G + (t_n + c * H) * K + ck, mask=mk & (j < T), other=0.0)
            f = tl.exp(tl.where((mr & (rows >= j))[:, None], g_r - g_j[None, :], float("-inf")))
            a_kk = tl.load(dakk + tr * BT + i_s * BC + c, mask=mr, other=0.0)  # dA_kk[r, j], 0 for r ≤ j
            a_qk = tl.load(daqk + tr * BT + i_s * BC + c, mask=mr, other=0.0) * scale
            rk += a_kk[:, None] * f * k_j[None, :]
            rq += a_qk[:, None] * f * k_j[None, :]
            col = tl.sum(((a_kk * b_r)[:, None] * k_r + a_qk[:, None] * q_r) * f, 0)
            ck_side += tl.where((tl.arange(0, BC) == c)[:, None], col[None, :], 0.0)
        d_b += tl.sum(k_r * rk, 1)
        rk = rk * b_r[:, None]
        d_q = tl.load(dq_p + p_r, mask=m_r, other=0.0) + rq
        d_k = tl.load(dk_p + p_r, mask=m_r, other=0.0) + rk + ck_side
        d_g = tl.load(dg_p + p_r, mask=m_r, other=0.0) + q_r * rq + k_r * (rk - ck_side)
        tl.store(dq + p_r, d_q.to(dq.dtype.element_ty), mask=m_r)
        tl.store(dk + p_r, d_k.to(dk.dtype.element_ty), mask=m_r)
        tl.store(dg + p_r, d_g, mask=m_r)
    tl.store(db + tr, (tl.load(db_p + tr, mask=mr, other=0.0) + d_b).to(db.dtype.element_ty), mask=mr)


# ---- launchers ---------------------------------------------------------------------------------------------


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact fp32 dots, not TF32


def _chunk(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 2 * SUB_CHUNK  # interpreter: two sub-chunks, the least that tests both


def _block(n: int, device: torch.device) -> int:
    """K or V block of the kernels that loop over K or V."""
    return min(64 if device.type == "cuda" else 16, triton.next_power_of_2(n))


def _cumsum(x: torch.Tensor, BT: int, reverse: bool, dtype: torch.dtype) -> torch.Tensor:
    B, T, H = x.shape[:3]
    D = x.shape[3] if x.dim() == 4 else 1
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    BD = min(64, triton.next_power_of_2(D))
    _cumsum_kernel[(triton.cdiv(T, BT), B * H, triton.cdiv(D, BD))](x, y, T, H, D, BT, BD, reverse)
    return y


def _forward(q, k, v, G, beta, scale, h0, BT, store_t, store_ht):
    """The forward's intermediates: dict of w, u, tm (T, if store_t), aqk (KDA), hs, vn, ht (if store_ht)."""
    B, T, H, K = q.shape
    V, NT, dev, dt = v.shape[-1], triton.cdiv(T, BT), q.device, q.dtype
    per_channel, prec = G.dim() == 4, _prec(dt)
    BK, BV = _block(K, dev), _block(V, dev)
    aqk = akk = None
    if per_channel:
        aqk = torch.empty((B, T, H, BT), dtype=torch.float32, device=dev)
        akk = torch.empty((B, T, H, BT), dtype=torch.float32, device=dev)
        _kda_intra_kernel[(NT * (BT // SUB_CHUNK), B * H)](
            q, k, G, beta, aqk, akk, scale, T, H, K, BT, SUB_CHUNK, BK, prec
        )
    w = torch.empty((B, T, H, K), dtype=dt, device=dev)
    u = torch.empty((B, T, H, V), dtype=dt, device=dev)
    tm = torch.empty((B, T, H, BT), dtype=dt, device=dev) if store_t else None
    _solve_kernel[(NT, B * H)](
        k, v, G, beta, akk, w, u, tm, T, H, K, V, BT, SUB_CHUNK, BK, BV, per_channel, store_t, prec
    )
    hs = torch.empty((B, NT, H, K, V), dtype=dt, device=dev)
    vn = torch.empty((B, T, H, V), dtype=dt, device=dev)
    ht = torch.empty((B, H, K, V), dtype=torch.float32, device=dev) if store_ht else None
    _state_fwd_kernel[(triton.cdiv(V, BV), B * H)](
        k,
        w,
        u,
        G,
        h0,
        hs,
        vn,
        ht,
        T,
        NT,
        H,
        K,
        V,
        BT,
        triton.next_power_of_2(K),
        BV,
        per_channel,
        h0 is not None,
        store_ht,
        prec,
    )
    return dict(w=w, u=u, tm=tm, aqk=aqk, hs=hs, vn=vn, ht=ht)


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state=None, output_final_state=False):
    """q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] or [B, T, H, K] (log-decay), beta [B, T, H], scale a
    float, initial_state [B, H, K, V] fp32 or None. Returns o [B, T, H, V] (q's dtype) and the final state
    [B, H, K, V] fp32 (None unless output_final_state)."""
    require_kernel_device(q)
    B, T, H, K = q.shape
    V, BT = v.shape[-1], _chunk(q.device)
    G = _cumsum(g, BT, False, torch.float32)
    f = _forward(q, k, v, G, beta, scale, initial_state, BT, False, output_final_state)
    o = torch.empty((B, T, H, V), dtype=q.dtype, device=q.device)
    BK, BV = _block(K, q.device), _block(V, q.device)
    _output_kernel[(triton.cdiv(V, BV), triton.cdiv(T, BT), B * H)](
        q,
        k,
        G,
        f["aqk"],
        f["hs"],
        f["vn"],
        o,
        scale,
        T,
        triton.cdiv(T, BT),
        H,
        K,
        V,
        BT,
        BK,
        BV,
        G.dim() == 4,
        _prec(q.dtype),
    )
    return o, f["ht"]


def chunk_gated_delta_rule_bwd(q, k, v, g, beta, scale, initial_state, do, dht):
    """Gradients of ``chunk_gated_delta_rule_fwd`` for the same arguments, do [B, T, H, V] and dht (the final
    state's gradient, [B, H, K, V] fp32, or None). Returns dq, dk, dv, dg, dbeta in their inputs' dtypes and
    d initial_state ([B, H, K, V] fp32, None without an initial state)."""
    require_kernel_device(q)
    B, T, H, K = q.shape
    V, dev, dt = v.shape[-1], q.device, q.dtype
    BT = _chunk(dev)
    NT, per_channel, prec = triton.cdiv(T, BT), g.dim() == 4, _prec(dt)
    BK, BV = _block(K, dev), _block(V, dev)
    Kp = triton.next_power_of_2(K)
    f32 = dict(dtype=torch.float32, device=dev)
    G = _cumsum(g, BT, False, torch.float32)
    f = _forward(q, k, v, G, beta, scale, initial_state, BT, True, False)
    daqk, dvl = torch.empty((B, T, H, BT), **f32), torch.empty((B, T, H, V), **f32)
    _dv_local_kernel[(NT, B * H)](
        q, k, G, f["aqk"], f["vn"], do, daqk, dvl, scale, T, H, K, V, BT, BK, BV, per_channel, prec
    )
    dhs = torch.empty((B, NT, H, K, V), dtype=dt, device=dev)
    dvn = torch.empty((B, T, H, V), **f32)
    dh0 = torch.empty((B, H, K, V), **f32) if initial_state is not None else None
    _state_bwd_kernel[(triton.cdiv(V, BV), B * H)](
        q,
        k,
        f["w"],
        G,
        do,
        dvl,
        dht,
        dhs,
        dvn,
        dh0,
        scale,
        T,
        NT,
        H,
        K,
        V,
        BT,
        Kp,
        BV,
        per_channel,
        dht is not None,
        dh0 is not None,
        prec,
    )
    dv = torch.empty_like(v)
    dq_p, dk_p = torch.empty((B, T, H, K), **f32), torch.empty((B, T, H, K), **f32)
    db_p, dg_p = torch.empty((B, T, H), **f32), torch.empty(G.shape, **f32)
    dakk = torch.empty((B, T, H, BT), **f32)
    _grad_kernel[(NT, B * H)](
        q,
        k,
        v,
        G,
        beta,
        f["tm"],
        f["hs"],
        dhs,
        f["vn"],
        dvn,
        do,
        dv,
        dq_p,
        dk_p,
        db_p,
        dg_p,
        dakk,
        scale,
        T,
        NT,
        H,
        K,
        V,
        BT,
        BK,
        BV,
        per_channel,
        prec,
    )
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    db, dG = torch.empty_like(beta), torch.empty(G.shape, **f32)
    args = (q, k, G, beta, dakk, daqk, dq_p, dk_p, db_p, dg_p, dq, dk, db, dG, scale, T, H, K, BT)
    if per_channel:
        _kda_intra_bwd_kernel[(NT * (BT // SUB_CHUNK), B * H)](*args, SUB_CHUNK, BK, prec)
    else:
        _intra_bwd_kernel[(NT, B * H)](*args, BK, prec)
    return dq, dk, dv, _cumsum(dG, BT, True, g.dtype), db, dh0


@triton.jit
def _recurrent_kernel(
    q,
    k,
    v,
    g,
    beta,
    state,
    o,
    scale,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    """T tokens of the recurrence for one (b, h, V-block), the [K, BV] fp32 state tile read once, written once."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk, mv = ck < K, cv < V
    p_s = state + i_bh.to(tl.int64) * K * V + ck[:, None] * V + cv[None, :]
    s = tl.load(p_s, mask=mk[:, None] & mv[None, :], other=0.0)
    for t in range(T):
        tok = (i_b * T + t).to(tl.int64) * H + i_h
        k_t = tl.load(k + tok * K + ck, mask=mk, other=0.0).to(tl.float32)
        q_t = tl.load(q + tok * K + ck, mask=mk, other=0.0).to(tl.float32)
        v_t = tl.load(v + tok * V + cv, mask=mv, other=0.0).to(tl.float32)
        if PER_CHANNEL:
            s *= tl.exp(tl.load(g + tok * K + ck, mask=mk, other=0.0).to(tl.float32))[:, None]
        else:
            s *= tl.exp(tl.load(g + tok).to(tl.float32))
        u = tl.load(beta + tok).to(tl.float32) * (v_t - tl.sum(s * k_t[:, None], 0))
        s += k_t[:, None] * u[None, :]
        tl.store(o + tok * V + cv, (tl.sum(s * q_t[:, None], 0) * scale).to(o.dtype.element_ty), mask=mv)
    tl.store(p_s, s, mask=mk[:, None] & mv[None, :])


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, state, scale):
    """A few decode tokens: q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] or [B, T, H, K], beta [B, T, H];
    state [B, H, K, V] fp32, updated in place. Returns o [B, T, H, V] in q's dtype."""
    require_kernel_device(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty((B, T, H, V), dtype=q.dtype, device=q.device)
    BV = _block(V, q.device)
    _recurrent_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, g, beta, state, o, scale, T, H, K, V, triton.next_power_of_2(K), BV, g.dim() == 4
    )
    return o
