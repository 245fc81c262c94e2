"""Chunked gated delta rule (Gated DeltaNet and KDA), forward and backward, and the fused decode step.

What it computes: ``glmkit.ops.delta_rule.chunk_gated_delta_rule_reference`` — the same chunkwise algorithm,
written for a GPU — for a scalar log-decay per head (g [B, T, H], Gated DeltaNet) or one per key channel
(g [B, T, H, K], KDA), with the gradients of q, k, v, g, beta and the initial state; and the recurrent step
(``gated_delta_rule_reference`` one token at a time) for decoding.

Forward, per chunk of BT tokens (64 on a GPU), each line one kernel:

    G  = in-chunk cumsum of g                              _cumsum_kernel     (fp32; per channel for KDA)
    A_kk, A_qk by sub-chunks (KDA only)                    _kda_intra_kernel
    T = (I + A_kk)^{-1};  W = T·βK·exp(G), U = T·βV        _solve_kernel      (A_kk inline for a scalar gate;
                                                                              KDA: also kg = K exp(G_last − G))
    for each chunk in order: hs[n] = H; V' = U − W H;      _state_fwd_kernel  (the only sequential pass,
        H ← exp(G_last) H + (K exp(G_last − G))ᵀ V'                            one program per (b, h, V-block))
    O = scale·(Q exp(G)) hs[n] + A_qk V'                   _output_kernel     (A_qk inline for a scalar gate)

The UT transform inverts the unit lower-triangular (I + A) in two steps: the BC×BC diagonal blocks (BC = 16)
by column elimination, all NC = BT/BC blocks at once as one [NC, BC, BC] tile (BC steps, each a pair of
reductions inside a block), then the off-diagonal blocks by the truncated Neumann series
T = Σ_{m<NC} (−T_D L)^m T_D, where T_D is the block-diagonal inverse and L the strictly block-lower part of A
(T_D L is nilpotent of order NC): NC matmuls instead of a 64-step substitution.

KDA's A_kk, A_qk need Σ_c x_rc k_jc exp(G_rc − G_jc). A per-channel decay does not factor out of that sum, and
exp(G_r) alone under- or overflows across a chunk. So the chunk is cut into sub-chunks of BC rows: a block
below the diagonal is one matmul with both factors measured from the sub-chunk's first row n,
(x_r exp(G_r − G_n)) · (k_j exp(G_n − G_j)), both ≤ 1; a diagonal block is summed column by column with
exp(G_r − G_j) directly (BC·BC·K exponentials per sub-chunk: KDA's extra cost over Gated DeltaNet). The backward
differentiates exactly these pieces (_kda_intra_bwd_kernel). The scalar gate needs none of this: Γ_rj multiplies
the whole C×C product.

Backward (recomputes G, T, W, U, hs, V' with the forward's kernels, nothing stored but the inputs; for KDA also
qg = Q exp(G), so that the reverse pass needs no per-channel exponentials either):

    dA_qk = dO V'ᵀ (masked), dV'_local = A_qkᵀ dO                       _dv_local_kernel
    for each chunk in reverse: dhs[n] = dH; dV' = dV'_local + K exp(G_last − G) dH;
        dH ← exp(G_last) dH + scale·(Q exp(G))ᵀ dO − Wᵀ dV'              _state_bwd_kernel  (→ d initial state)
    through O, V' = U − W H, the state update and W, U = T(...):         _grad_kernel
        dq, dk, dv, dβ, dG (partial), dA_kk = −Tᵀ dT Tᵀ
    through A_kk, A_qk (by sub-chunks for KDA), finishing dq, dk, dβ     _intra_bwd_kernel
    dg = reverse in-chunk cumsum of dG                                   _cumsum_kernel

Hopper and triton 3.4-3.7.0: ``tl.trans`` of a ``tl.dot`` result (the MMA accumulator layout) fed to another
``tl.dot`` miscompiles there (fla #640: the shared-memory store of the transposed accumulator, a #linear layout,
is emitted as stmatrix; fla refuses its gated backward for it). These kernels contain no ``tl.trans``: every
transposed operand is loaded transposed (pointer arithmetic, e.g. Tᵀ, Kᵀ, hs[n]ᵀ, dA_kkᵀ) or computed transposed by
its own ``tl.dot`` with the operands swapped (A_qkᵀ = K Qᵀ). Checked on the sm_90 output of triton 3.6 for every
autotune config: no shared-memory store of a 16-bit #linear tensor.

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

# Addressing: every [B, T, H, D] tensor is contiguous, so token t of head h of sequence b sits at (b·T + t)·H + h
# rows of D. Each program moves its pointers once to the first row of its chunk (an int64 scalar) and addresses
# the chunk with small int32 offsets (row r at r·H·D): 64-bit offsets per element would cost a register pair each.


@triton.jit
def _cumsum_kernel(
    x, y, T, H: tl.constexpr, D: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, REVERSE: tl.constexpr
):
    """In-chunk (reverse) cumulative sum over tokens of x [B, T, H, D] (D = 1 for a scalar gate), in fp32."""
    i_t, i_bh, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    r = tl.arange(0, BT)
    cd = i_d * BD + tl.arange(0, BD)
    m = (i_t * BT + r < T)[:, None] & (cd < D)[None, :]
    p = (r * H)[:, None] * D + cd[None, :]
    s = tl.cumsum(tl.load(x + t0 * D + p, mask=m, other=0.0).to(tl.float32), axis=0, reverse=REVERSE)
    tl.store(y + t0 * D + p, s.to(y.dtype.element_ty), mask=m)


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
    n0 = i_t * BT + i_s * BC  # the sub-chunk's first row
    if n0 >= T:
        return
    t0 = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    q, k, G, beta, aqk, akk = q + t0 * K, k + t0 * K, G + t0 * K, beta + t0, aqk + t0 * BT, akk + t0 * BT
    c = tl.arange(0, BT)  # columns: every row of the chunk
    rs = i_s * BC + tl.arange(0, BC)  # this sub-chunk's rows
    mr, mc = i_t * BT + rs < T, i_t * BT + c < T
    before = c < i_s * BC  # columns of earlier sub-chunks: the blocks left of the diagonal
    s_qk = tl.zeros([BC, BT], dtype=tl.float32)
    s_kk = tl.zeros([BC, BT], dtype=tl.float32)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        mk = ck < K
        p_r = (rs * H)[:, None] * K + ck[None, :]
        m_r = mr[:, None] & mk[None, :]
        q_r = tl.load(q + p_r, mask=m_r, other=0.0).to(tl.float32)
        k_r = tl.load(k + p_r, mask=m_r, other=0.0).to(tl.float32)
        g_r = tl.load(G + p_r, mask=m_r, other=0.0)
        g_n = tl.load(G + i_s * BC * H * K + ck, mask=mk, other=0.0)  # G at row n0
        e_r = tl.exp(tl.where(mr[:, None], g_r - g_n[None, :], 0.0))
        p_t = ck[:, None] + (c * H)[None, :] * K  # [BK, BT]: the chunk's keys, transposed
        m_t = mk[:, None] & mc[None, :]
        k_t = tl.load(k + p_t, mask=m_t, other=0.0).to(tl.float32)
        k_t *= tl.exp(tl.where(before[None, :], g_n[:, None] - tl.load(G + p_t, mask=m_t, other=0.0), float("-inf")))
        s_qk += tl.dot(q_r * e_r, k_t, input_precision=PREC)
        s_kk += tl.dot(k_r * e_r, k_t, input_precision=PREC)
        for j in range(BC):  # the diagonal block, one column at a time
            m_j = mk & (n0 + j < T)
            k_j = tl.load(k + (i_s * BC + j) * H * K + ck, mask=m_j, other=0.0).to(tl.float32)
            g_j = tl.load(G + (i_s * BC + j) * H * K + ck, mask=m_j, other=0.0)
            incl = mr & (rs >= i_s * BC + j)
            f = tl.exp(tl.where(incl[:, None], g_r - g_j[None, :], float("-inf"))) * k_j[None, :]
            col = (c == i_s * BC + j)[None, :]
            s_qk += tl.where(col, tl.sum(q_r * f, 1)[:, None], 0.0)
            s_kk += tl.where(col & (rs > i_s * BC + j)[:, None], tl.sum(k_r * f, 1)[:, None], 0.0)
    b_r = tl.load(beta + rs * H, mask=mr, other=0.0).to(tl.float32)
    p = (rs * H)[:, None] * BT + c[None, :]
    tl.store(aqk + p, s_qk * scale, mask=mr[:, None])
    tl.store(akk + p, s_kk * b_r[:, None], mask=mr[:, None])


@triton.jit
def _invert_unit_lower(a, BT: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """(I + a)^{-1} for a strictly lower [BT, BT] fp32 tile: the NC = BT/BC diagonal blocks by column elimination,
    all at once as one [NC, BC, BC] tile (BC steps), the rest by the Neumann series of the block-lower part."""
    NC: tl.constexpr = BT // BC
    blk = tl.arange(0, NC)
    diag = (blk[:, None] == blk[None, :])[:, None, :, None]  # [NC, 1, NC, 1]: row and column in one sub-chunk
    d = tl.sum(tl.where(diag, tl.reshape(a, (NC, BC, NC, BC)), 0.0), axis=2)  # the diagonal blocks [NC, BC, BC]
    x = tl.arange(0, BC)
    t = tl.where(x[:, None] == x[None, :], 1.0, 0.0)[None, :, :] + tl.zeros([NC, BC, BC], dtype=tl.float32)
    for i in range(BC):
        # T ← (I − d_i e_iᵀ) T in every block: T[x, y] −= d[x, i] · T[i, y]
        d_col = tl.sum(tl.where((x == i)[None, None, :], d, 0.0), axis=2)
        t_row = tl.sum(tl.where((x == i)[None, :, None], t, 0.0), axis=1)
        t -= d_col[:, :, None] * t_row[:, None, :]
    t_d = tl.reshape(tl.where(diag, t[:, :, None, :], 0.0), (BT, BT))  # block-diagonal [BT, BT]
    r = tl.arange(0, BT)
    n = tl.dot(t_d, tl.where((r[:, None] // BC) == (r[None, :] // BC), 0.0, a), input_precision=PREC)
    res = t_d
    for _ in tl.static_range(NC - 1):  # Σ_{m<NC} (−N)^m T_D by Horner's rule, N = T_D L nilpotent
        res = t_d - tl.dot(n, res, input_precision=PREC)
    return res


@triton.jit
def _solve_kernel(
    q,
    k,
    v,
    G,
    beta,
    akk,
    w,
    u,
    tm,
    kg,
    qg,
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
    """T = (I + A_kk)^{-1} of one chunk, then W = T·(βK ⊙ exp(G)) [B, T, H, K] and U = T·βV [B, T, H, V]. For
    KDA also the gated keys of the state update, kg = K ⊙ exp(G_last − G), and (with STORE_T, the backward's
    recompute) qg = Q ⊙ exp(G): the sequential state kernels then need no per-channel exponentials."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    t0 = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    k, v, beta, w, u = k + t0 * K, v + t0 * V, beta + t0, w + t0 * K, u + t0 * V
    r = tl.arange(0, BT)
    rh = r * H
    mr = i_t * BT + r < T
    b_r = tl.load(beta + rh, mask=mr, other=0.0).to(tl.float32)
    if PER_CHANNEL:
        G += t0 * K
        last = tl.minimum(BT, T - i_t * BT) - 1  # the chunk's last row
        a = tl.load(akk + t0 * BT + rh[:, None] * BT + r[None, :], mask=mr[:, None], other=0.0)
    else:
        G += t0
        g_r = tl.load(G + rh, mask=mr, other=0.0)
        a = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, K, BK):
            ck = i_k + tl.arange(0, BK)
            k_r = tl.load(k + rh[:, None] * K + ck[None, :], mask=mr[:, None] & (ck < K)[None, :], other=0.0)
            k_t = tl.load(k + ck[:, None] + rh[None, :] * K, mask=(ck < K)[:, None] & mr[None, :], other=0.0)
            a += tl.dot(k_r, k_t, input_precision=PREC)
        strict = (r[:, None] > r[None, :]) & mr[:, None]
        a = tl.where(strict, a * tl.exp(tl.where(strict, g_r[:, None] - g_r[None, :], 0.0)), 0.0) * b_r[:, None]
    t = _invert_unit_lower(a, BT, BC, PREC).to(w.dtype.element_ty)
    if STORE_T:
        tl.store(tm + t0 * BT + rh[:, None] * BT + r[None, :], t, mask=mr[:, None])
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        p = rh[:, None] * K + ck[None, :]
        m = mr[:, None] & (ck < K)[None, :]
        k_r = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
        if PER_CHANNEL:
            g_r = tl.load(G + p, mask=m, other=0.0)
            g_last = tl.load(G + last * H * K + ck, mask=ck < K, other=0.0)
            k_g = k_r * tl.exp(tl.where(mr[:, None], g_last[None, :] - g_r, float("-inf")))
            tl.store(kg + t0 * K + p, k_g.to(t.dtype), mask=m)
            if STORE_T:
                q_r = tl.load(q + t0 * K + p, mask=m, other=0.0).to(tl.float32)
                tl.store(qg + t0 * K + p, (q_r * tl.exp(g_r)).to(t.dtype), mask=m)
            k_r = k_r * tl.exp(g_r) * b_r[:, None]
        else:
            k_r = k_r * (b_r * tl.exp(g_r))[:, None]
        tl.store(w + p, tl.dot(t, k_r.to(t.dtype), input_precision=PREC).to(t.dtype), mask=m)
    for i_v in range(0, V, BV):
        cv = i_v + tl.arange(0, BV)
        p = rh[:, None] * V + cv[None, :]
        m = mr[:, None] & (cv < V)[None, :]
        v_r = tl.load(v + p, mask=m, other=0.0).to(tl.float32) * b_r[:, None]
        tl.store(u + p, tl.dot(t, v_r.to(t.dtype), input_precision=PREC).to(t.dtype), mask=m)


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
    BH,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_H0: tl.constexpr,
    STORE_HT: tl.constexpr,
    PREC: tl.constexpr,
):
    """The sequential pass over chunks for one (b, h, V-block), the [K, BV] state in registers (KP ≥ K):
    stores the state entering each chunk (hs [B, NT, H, K, V]) and V' = U − W H (vn [B, T, H, V]). For KDA, k is
    the gated kg of _solve_kernel.
    BH = B·H is only an autotune key (the grid has B·H·V/BV programs)."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = w.dtype.element_ty
    ck = tl.arange(0, KP)
    cv = i_v * BV + tl.arange(0, BV)
    mk, mv = ck < K, cv < V
    m_kv = mk[:, None] & mv[None, :]
    p_kv = ck[:, None] * V + cv[None, :]
    r = tl.arange(0, BT)
    rh = r * H
    state = tl.zeros([KP, BV], dtype=tl.float32)
    if HAS_H0:
        state += tl.load(h0 + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)
    for n in range(NT):
        t0 = (i_b * T + n * BT).to(tl.int64) * H + i_h
        mr = n * BT + r < T
        last = tl.minimum(BT, T - n * BT) - 1  # the chunk's last row
        tl.store(hs + ((i_b * NT + n).to(tl.int64) * H + i_h) * K * V + p_kv, state.to(DT), mask=m_kv)
        w_r = tl.load(w + t0 * K + rh[:, None] * K + ck[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        p_v = t0 * V + rh[:, None] * V + cv[None, :]
        m_v = mr[:, None] & mv[None, :]
        v_new = tl.load(u + p_v, mask=m_v, other=0.0).to(tl.float32)
        v_new -= tl.dot(w_r, state.to(DT), input_precision=PREC)
        tl.store(vn + p_v, v_new.to(DT), mask=m_v)
        m_t = mk[:, None] & mr[None, :]
        k_t = tl.load(k + t0 * K + ck[:, None] + rh[None, :] * K, mask=m_t, other=0.0)  # [KP, BT]
        if PER_CHANNEL:  # k holds K ⊙ exp(G_last − G) (from _solve_kernel)
            state = state * tl.exp(tl.load(G + t0 * K + last * H * K + ck, mask=mk, other=0.0))[:, None]
        else:
            g_last = tl.load(G + t0 + last * H)
            g_r = tl.load(G + t0 + rh, mask=mr, other=0.0)
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
    t0 = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    q, k, vn, o = q + t0 * K, k + t0 * K, vn + t0 * V, o + t0 * V
    hs += ((i_b * NT + i_t).to(tl.int64) * H + i_h) * K * V
    r = tl.arange(0, BT)
    rh = r * H
    mr = i_t * BT + r < T
    cv = i_v * BV + tl.arange(0, BV)
    mv = cv < V
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    s = tl.zeros([BT, BT], dtype=tl.float32)
    if PER_CHANNEL:
        G += t0 * K
    else:
        g_r = tl.load(G + t0 + rh, mask=mr, other=0.0)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        p = rh[:, None] * K + ck[None, :]
        m = mr[:, None] & (ck < K)[None, :]
        q_r = tl.load(q + p, mask=m, other=0.0)
        h = tl.load(hs + ck[:, None] * V + cv[None, :], mask=(ck < K)[:, None] & mv[None, :], other=0.0)
        if PER_CHANNEL:
            q_g = q_r * tl.exp(tl.load(G + p, mask=m, other=0.0))
        else:
            q_g = q_r * tl.exp(g_r)[:, None]
            k_t = tl.load(k + ck[:, None] + rh[None, :] * K, mask=(ck < K)[:, None] & mr[None, :], other=0.0)
            s += tl.dot(q_r, k_t, input_precision=PREC)
        acc += tl.dot(q_g.to(DT), h, input_precision=PREC)
    if PER_CHANNEL:
        s = tl.load(aqk + t0 * BT + rh[:, None] * BT + r[None, :], mask=mr[:, None], other=0.0)
    else:
        incl = (r[:, None] >= r[None, :]) & mr[:, None]
        s = tl.where(incl, s * tl.exp(tl.where(incl, g_r[:, None] - g_r[None, :], 0.0)), 0.0) * scale
    p_v = rh[:, None] * V + cv[None, :]
    m_v = mr[:, None] & mv[None, :]
    acc = acc * scale + tl.dot(s.to(DT), tl.load(vn + p_v, mask=m_v, other=0.0), input_precision=PREC)
    tl.store(o + p_v, acc.to(o.dtype.element_ty), mask=m_v)


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
    t0 = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    vn, do, dvl = vn + t0 * V, do + t0 * V, dvl + t0 * V
    r = tl.arange(0, BT)
    rh = r * H
    mr = i_t * BT + r < T
    if PER_CHANNEL:  # A_qkᵀ, loaded transposed: s_t[j, r] = A_qk[r, j]
        s_t = tl.load(aqk + t0 * BT + r[:, None] + rh[None, :] * BT, mask=mr[None, :], other=0.0)
    else:  # A_qkᵀ computed transposed, as K Qᵀ
        g_r = tl.load(G + t0 + rh, mask=mr, other=0.0)
        s_t = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, K, BK):
            ck = i_k + tl.arange(0, BK)
            k_r = tl.load(k + t0 * K + rh[:, None] * K + ck[None, :], mask=mr[:, None] & (ck < K)[None, :], other=0.0)
            q_t = tl.load(q + t0 * K + ck[:, None] + rh[None, :] * K, mask=(ck < K)[:, None] & mr[None, :], other=0.0)
            s_t += tl.dot(k_r, q_t, input_precision=PREC)
        upper = (r[:, None] <= r[None, :]) & mr[None, :]
        s_t = tl.where(upper, s_t * tl.exp(tl.where(upper, g_r[None, :] - g_r[:, None], 0.0)), 0.0) * scale
    s_t = s_t.to(DT)
    d_s = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, V, BV):
        cv = i_v + tl.arange(0, BV)
        p = rh[:, None] * V + cv[None, :]
        m = mr[:, None] & (cv < V)[None, :]
        do_r = tl.load(do + p, mask=m, other=0.0)
        v_t = tl.load(vn + cv[:, None] + rh[None, :] * V, mask=(cv < V)[:, None] & mr[None, :], other=0.0)
        d_s += tl.dot(do_r, v_t, input_precision=PREC)
        tl.store(dvl + p, tl.dot(s_t, do_r, input_precision=PREC), mask=m)
    d_s = tl.where((r[:, None] >= r[None, :]) & mr[:, None], d_s, 0.0)
    tl.store(daqk + t0 * BT + rh[:, None] * BT + r[None, :], d_s, mask=mr[:, None])


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
    BH,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    KP: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    PREC: tl.constexpr,
):
    """The reverse pass over chunks: dhs[n] = dL/dH after chunk n ([B, NT, H, K, V]), dV' = dV'_local +
    K exp(G_last − G) dhs[n] ([B, T, H, V] fp32), and dL/d(initial state) at the end. BH as _state_fwd_kernel;
    for KDA, q and k are the gated qg, kg of _solve_kernel."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    DT = w.dtype.element_ty
    ck = tl.arange(0, KP)
    cv = i_v * BV + tl.arange(0, BV)
    mk, mv = ck < K, cv < V
    m_kv = mk[:, None] & mv[None, :]
    p_kv = ck[:, None] * V + cv[None, :]
    r = tl.arange(0, BT)
    rh = r * H
    dstate = tl.zeros([KP, BV], dtype=tl.float32)
    if HAS_DHT:
        dstate += tl.load(dht + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)
    for i in range(NT):
        n = NT - 1 - i
        t0 = (i_b * T + n * BT).to(tl.int64) * H + i_h
        mr = n * BT + r < T
        last = tl.minimum(BT, T - n * BT) - 1
        tl.store(dhs + ((i_b * NT + n).to(tl.int64) * H + i_h) * K * V + p_kv, dstate.to(DT), mask=m_kv)
        p_r = t0 * K + rh[:, None] * K + ck[None, :]
        p_t = t0 * K + ck[:, None] + rh[None, :] * K
        m_r, m_t = mr[:, None] & mk[None, :], mk[:, None] & mr[None, :]
        k_r = tl.load(k + p_r, mask=m_r, other=0.0)
        q_t = tl.load(q + p_t, mask=m_t, other=0.0)
        if PER_CHANNEL:  # q, k hold Q ⊙ exp(G) and K ⊙ exp(G_last − G) (from _solve_kernel)
            d_v = tl.dot(k_r, dstate.to(DT), input_precision=PREC)
            decay = tl.exp(tl.load(G + t0 * K + last * H * K + ck, mask=mk, other=0.0))[:, None]
        else:
            g_last = tl.load(G + t0 + last * H)
            g_r = tl.load(G + t0 + rh, mask=mr, other=0.0)
            d_v = tl.dot(k_r, dstate.to(DT), input_precision=PREC)
            d_v = d_v * tl.exp(tl.where(mr, g_last - g_r, float("-inf")))[:, None]
            q_t = (q_t.to(tl.float32) * tl.exp(g_r)[None, :]).to(DT)
            decay = tl.exp(g_last)
        p_v = t0 * V + rh[:, None] * V + cv[None, :]
        m_v = mr[:, None] & mv[None, :]
        d_v += tl.load(dvl + p_v, mask=m_v, other=0.0)
        tl.store(dvn + p_v, d_v, mask=m_v)
        do_r = tl.load(do + p_v, mask=m_v, other=0.0)
        w_t = tl.load(w + p_t, mask=m_t, other=0.0)
        dstate = dstate * decay + scale * tl.dot(q_t, do_r, input_precision=PREC)
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
    t0 = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    q, k, dq_p, dk_p = q + t0 * K, k + t0 * K, dq_p + t0 * K, dk_p + t0 * K
    v, vn, dvn, do, dv = v + t0 * V, vn + t0 * V, dvn + t0 * V, do + t0 * V, dv + t0 * V
    beta, db_p, tm, dakk = beta + t0, db_p + t0, tm + t0 * BT, dakk + t0 * BT
    h_off = ((i_b * NT + i_t).to(tl.int64) * H + i_h) * K * V
    hs, dhs = hs + h_off, dhs + h_off
    r = tl.arange(0, BT)
    rh = r * H
    mr = i_t * BT + r < T
    last = tl.minimum(BT, T - i_t * BT) - 1
    b_r = tl.load(beta + rh, mask=mr, other=0.0).to(tl.float32)
    t_t = tl.load(tm + r[:, None] + rh[None, :] * BT, mask=mr[None, :], other=0.0)  # Tᵀ
    # V side: U = T βV  →  dv = β Tᵀ dV', dβ += Σ_v v Tᵀ dV', dT += dV' (βV)ᵀ
    d_t = tl.zeros([BT, BT], dtype=tl.float32)
    d_b = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(0, V, BV):
        cv = i_v + tl.arange(0, BV)
        p = rh[:, None] * V + cv[None, :]
        m = mr[:, None] & (cv < V)[None, :]
        dvn_r = tl.load(dvn + p, mask=m, other=0.0).to(DT)
        v_r = tl.load(v + p, mask=m, other=0.0).to(tl.float32)
        v_t = tl.load(v + cv[:, None] + rh[None, :] * V, mask=(cv < V)[:, None] & mr[None, :], other=0.0)
        d_t += tl.dot(dvn_r, (v_t.to(tl.float32) * b_r[None, :]).to(DT), input_precision=PREC)
        tdv = tl.dot(t_t, dvn_r, input_precision=PREC)
        tl.store(dv + p, (tdv * b_r[:, None]).to(dv.dtype.element_ty), mask=m)
        d_b += tl.sum(v_r * tdv, 1)
    # K side, one K-block at a time
    d_g_row = tl.zeros([BT], dtype=tl.float32)  # scalar gate: dG summed over the channels
    if PER_CHANNEL:
        G += t0 * K
        dg_p += t0 * K
    else:
        G += t0
        dg_p += t0
        g_v = tl.load(G + rh, mask=mr, other=0.0)
        g_r = g_v[:, None]
        g_last = tl.load(G + last * H)
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
            p = rh[:, None] * V + cv[None, :]
            m = mr[:, None] & mv[None, :]
            p_h = ck[None, :] * V + cv[:, None]  # [BV, BK]: the states, transposed
            m_h = mv[:, None] & mk[None, :]
            h_t = tl.load(hs + p_h, mask=m_h, other=0.0)
            dh_t = tl.load(dhs + p_h, mask=m_h, other=0.0)
            d_q += tl.dot(tl.load(do + p, mask=m, other=0.0), h_t, input_precision=PREC)
            d_w -= tl.dot(tl.load(dvn + p, mask=m, other=0.0).to(DT), h_t, input_precision=PREC)
            d_kd += tl.dot(tl.load(vn + p, mask=m, other=0.0), dh_t, input_precision=PREC)
            d_gl += tl.sum(h_t.to(tl.float32) * dh_t.to(tl.float32), 0)
        p = rh[:, None] * K + ck[None, :]
        m = mr[:, None] & mk[None, :]
        p_t = ck[:, None] + rh[None, :] * K
        m_t = mk[:, None] & mr[None, :]
        q_r = tl.load(q + p, mask=m, other=0.0).to(tl.float32)
        k_r = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
        k_t = tl.load(k + p_t, mask=m_t, other=0.0).to(tl.float32)  # Kᵀ
        if PER_CHANNEL:
            g_r = tl.load(G + p, mask=m, other=0.0)
            g_last = tl.load(G + last * H * K + ck, mask=mk, other=0.0)
            g_l = g_last[None, :]
            k_bg_t = k_t * b_r[None, :] * tl.exp(tl.load(G + p_t, mask=m_t, other=0.0))
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
        d_kbg = tl.dot(t_t, d_w.to(DT), input_precision=PREC)
        d_k += d_kbg * b_r[:, None] * gam
        d_b += tl.sum(d_kbg * k_r * gam, 1)
        d_g += d_kbg * k_bg + tl.where((r == last)[:, None], d_gl[None, :], 0.0)
        tl.store(dq_p + p, d_q, mask=m)
        tl.store(dk_p + p, d_k, mask=m)
        if PER_CHANNEL:
            tl.store(dg_p + p, d_g, mask=m)
        else:
            d_g_row += tl.sum(d_g, 1)
    tl.store(db_p + rh, d_b, mask=mr)
    if not PER_CHANNEL:
        tl.store(dg_p + rh, d_g_row, mask=mr)
    # T = (I + A_kk)^{-1}  →  dA_kk = −Tᵀ dT Tᵀ, strictly lower
    t_t = t_t.to(tl.float32)
    d_a = -tl.dot(tl.dot(t_t, d_t, input_precision=PREC), t_t, input_precision=PREC)
    d_a = tl.where((r[:, None] > r[None, :]) & mr[:, None], d_a, 0.0)
    tl.store(dakk + rh[:, None] * BT + r[None, :], d_a, mask=mr[:, None])


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
    t0 = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    q, k, dq_p, dk_p, dq, dk = q + t0 * K, k + t0 * K, dq_p + t0 * K, dk_p + t0 * K, dq + t0 * K, dk + t0 * K
    G, beta, db_p, dg_p, db, dg, dakk, daqk = (
        G + t0,
        beta + t0,
        db_p + t0,
        dg_p + t0,
        db + t0,
        dg + t0,
        dakk + t0 * BT,
        daqk + t0 * BT,
    )
    r = tl.arange(0, BT)
    rh = r * H
    mr = i_t * BT + r < T
    g_r = tl.load(G + rh, mask=mr, other=0.0)
    b_r = tl.load(beta + rh, mask=mr, other=0.0).to(tl.float32)
    incl = (r[:, None] >= r[None, :]) & mr[:, None]
    gam = tl.where(incl, tl.exp(tl.where(incl, g_r[:, None] - g_r[None, :], 0.0)), 0.0)
    incl_t = (r[:, None] <= r[None, :]) & mr[None, :]
    gam_t = tl.where(incl_t, tl.exp(tl.where(incl_t, g_r[None, :] - g_r[:, None], 0.0)), 0.0)  # Γᵀ
    p_a = rh[:, None] * BT + r[None, :]
    p_at = r[:, None] + rh[None, :] * BT
    m_kk = tl.load(dakk + p_a, mask=mr[:, None], other=0.0) * gam  # dA_kk ⊙ Γ (dA_kk is 0 for j ≥ r)
    n_qk = tl.load(daqk + p_a, mask=mr[:, None], other=0.0) * gam * scale
    m_kk_t = tl.load(dakk + p_at, mask=mr[None, :], other=0.0) * gam_t * b_r[None, :]  # the same, transposed
    n_qk_t = tl.load(daqk + p_at, mask=mr[None, :], other=0.0) * gam_t * scale
    kk = tl.zeros([BT, BT], dtype=tl.float32)
    qk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        m = mr[:, None] & (ck < K)[None, :]
        k_r = tl.load(k + rh[:, None] * K + ck[None, :], mask=m, other=0.0)
        q_r = tl.load(q + rh[:, None] * K + ck[None, :], mask=m, other=0.0)
        k_t = tl.load(k + ck[:, None] + rh[None, :] * K, mask=(ck < K)[:, None] & mr[None, :], other=0.0)
        kk += tl.dot(k_r, k_t, input_precision=PREC)
        qk += tl.dot(q_r, k_t, input_precision=PREC)
    d_b = tl.sum(m_kk * kk, 1)
    m_kk = m_kk * b_r[:, None]  # dL/d(KKᵀ ⊙ Γ)
    e_kk, e_qk = m_kk * kk, n_qk * qk  # dL/dΓ ⊙ Γ: +row sums to G_r, −column sums to G_j
    d_g = tl.sum(e_kk, 1) - tl.sum(e_kk, 0) + tl.sum(e_qk, 1) - tl.sum(e_qk, 0)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        m = mr[:, None] & (ck < K)[None, :]
        p = rh[:, None] * K + ck[None, :]
        k_r = tl.load(k + p, mask=m, other=0.0).to(tl.float32)
        q_r = tl.load(q + p, mask=m, other=0.0).to(tl.float32)
        d_q = tl.load(dq_p + p, mask=m, other=0.0) + tl.dot(n_qk, k_r, input_precision=PREC)
        d_k = tl.load(dk_p + p, mask=m, other=0.0) + tl.dot(m_kk, k_r, input_precision=PREC)
        d_k += tl.dot(m_kk_t, k_r, input_precision=PREC) + tl.dot(n_qk_t, q_r, input_precision=PREC)
        tl.store(dq + p, d_q.to(dq.dtype.element_ty), mask=m)
        tl.store(dk + p, d_k.to(dk.dtype.element_ty), mask=m)
    tl.store(db + rh, (tl.load(db_p + rh, mask=mr, other=0.0) + d_b).to(db.dtype.element_ty), mask=mr)
    tl.store(dg + rh, tl.load(dg_p + rh, mask=mr, other=0.0) + d_g, mask=mr)


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
    t0 = (i_b * T + i_t * BT).to(tl.int64) * H + i_h
    q, k, G, dq_p, dk_p, dg_p = q + t0 * K, k + t0 * K, G + t0 * K, dq_p + t0 * K, dk_p + t0 * K, dg_p + t0 * K
    dq, dk, dg, beta, db_p, db = dq + t0 * K, dk + t0 * K, dg + t0 * K, beta + t0, db_p + t0, db + t0
    dakk, daqk = dakk + t0 * BT, daqk + t0 * BT
    c = tl.arange(0, BT)
    rs = i_s * BC + tl.arange(0, BC)  # this sub-chunk's rows
    mr, mc = i_t * BT + rs < T, i_t * BT + c < T
    m_last = tl.minimum(i_s * BC + BC, T - i_t * BT) - 1  # the sub-chunk's last row
    before = c < i_s * BC
    after = (c >= i_s * BC + BC) & mc
    b_r = tl.load(beta + rs * H, mask=mr, other=0.0).to(tl.float32)
    b_c = tl.load(beta + c * H, mask=mc, other=0.0).to(tl.float32)
    p_row = (rs * H)[:, None] * BT + c[None, :]  # rows of dA: [BC, BT]
    p_col = rs[:, None] + (c * H)[None, :] * BT  # columns of dA, transposed: [BC, BT]
    da_kk = tl.load(dakk + p_row, mask=mr[:, None], other=0.0)
    da_qk = tl.load(daqk + p_row, mask=mr[:, None], other=0.0) * scale
    da_kk_t = tl.load(dakk + p_col, mask=mc[None, :], other=0.0)
    da_qk_t = tl.load(daqk + p_col, mask=mc[None, :], other=0.0) * scale
    d_b = tl.zeros([BC], dtype=tl.float32)
    for i_k in range(0, K, BK):
        ck = i_k + tl.arange(0, BK)
        mk = ck < K
        p_r = (rs * H)[:, None] * K + ck[None, :]
        m_r = mr[:, None] & mk[None, :]
        p_c = (c * H)[:, None] * K + ck[None, :]
        m_c = mc[:, None] & mk[None, :]
        q_r = tl.load(q + p_r, mask=m_r, other=0.0).to(tl.float32)
        k_r = tl.load(k + p_r, mask=m_r, other=0.0).to(tl.float32)
        g_r = tl.load(G + p_r, mask=m_r, other=0.0)
        q_c = tl.load(q + p_c, mask=m_c, other=0.0).to(tl.float32)
        k_c = tl.load(k + p_c, mask=m_c, other=0.0).to(tl.float32)
        g_c = tl.load(G + p_c, mask=m_c, other=0.0)
        g_n = tl.load(G + i_s * BC * H * K + ck, mask=mk, other=0.0)
        g_m = tl.load(G + m_last * H * K + ck, mask=mk, other=0.0)
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
        for j in range(BC):
            m_j = mk & (n0 + j < T)
            k_j = tl.load(k + (i_s * BC + j) * H * K + ck, mask=m_j, other=0.0).to(tl.float32)
            g_j = tl.load(G + (i_s * BC + j) * H * K + ck, mask=m_j, other=0.0)
            f = tl.exp(tl.where((mr & (rs >= i_s * BC + j))[:, None], g_r - g_j[None, :], float("-inf")))
            a_kk = tl.load(dakk + (rs * H) * BT + i_s * BC + j, mask=mr, other=0.0)  # dA_kk[r, j], 0 for r ≤ j
            a_qk = tl.load(daqk + (rs * H) * BT + i_s * BC + j, mask=mr, other=0.0) * scale
            rk += a_kk[:, None] * f * k_j[None, :]
            rq += a_qk[:, None] * f * k_j[None, :]
            col = tl.sum(((a_kk * b_r)[:, None] * k_r + a_qk[:, None] * q_r) * f, 0)
            ck_side += tl.where((tl.arange(0, BC) == j)[:, None], col[None, :], 0.0)
        d_b += tl.sum(k_r * rk, 1)
        rk = rk * b_r[:, None]
        d_q = tl.load(dq_p + p_r, mask=m_r, other=0.0) + rq
        d_k = tl.load(dk_p + p_r, mask=m_r, other=0.0) + rk + ck_side
        d_g = tl.load(dg_p + p_r, mask=m_r, other=0.0) + q_r * rq + k_r * (rk - ck_side)
        tl.store(dq + p_r, d_q.to(dq.dtype.element_ty), mask=m_r)
        tl.store(dk + p_r, d_k.to(dk.dtype.element_ty), mask=m_r)
        tl.store(dg + p_r, d_g, mask=m_r)
    tl.store(db + rs * H, (tl.load(db_p + rs * H, mask=mr, other=0.0) + d_b).to(db.dtype.element_ty), mask=mr)


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
    BH,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    KP: tl.constexpr,
    BV: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    """T tokens of the recurrence for one (b, h, V-block), the [K, BV] fp32 state tile read once, written once.
    BH as _state_fwd_kernel."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    ck = tl.arange(0, KP)
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


# ---- launchers ---------------------------------------------------------------------------------------------
# Under the interpreter: chunk 32 (two sub-chunks) and 16-wide K/V blocks, so small test shapes cross every block
# boundary. On CUDA: chunk 64; fp32 (the checking dtype) one fixed moderate configuration; fp16/bf16 each kernel
# autotuned over a short list (each entry costs one compile per key). The lists are not timed yet: they are the
# configurations that compile for sm_90 without register spills at K = V = 128 (bf16, both gate kinds; see
# benchmarks/compile_report_delta_rule.py), a few per kernel, chosen for occupancy (≤ 128 registers with 4 warps
# where possible).


def _cfg(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


_CONFIGS = {
    _kda_intra_kernel: [_cfg(4, 2, BK=64), _cfg(4, 2, BK=32), _cfg(8, 2, BK=64)],
    _solve_kernel: [_cfg(4, 2, BK=64, BV=64), _cfg(8, 2, BK=64, BV=64), _cfg(4, 2, BK=32, BV=32)],
    _state_fwd_kernel: [_cfg(4, 2, BV=32), _cfg(4, 2, BV=16), _cfg(8, 2, BV=64), _cfg(8, 2, BV=32)],
    _output_kernel: [
        _cfg(4, 2, BK=128, BV=64),
        _cfg(8, 2, BK=64, BV=64),
        _cfg(8, 2, BK=128, BV=128),
        _cfg(4, 2, BK=64, BV=32),
    ],
    _dv_local_kernel: [_cfg(4, 2, BK=64, BV=64), _cfg(8, 2, BK=64, BV=64), _cfg(4, 2, BK=64, BV=32)],
    _state_bwd_kernel: [_cfg(4, 2, BV=16), _cfg(8, 2, BV=32), _cfg(8, 2, BV=16), _cfg(8, 2, BV=64)],
    _grad_kernel: [_cfg(8, 2, BK=32, BV=32), _cfg(8, 2, BK=32, BV=64)],
    _intra_bwd_kernel: [_cfg(8, 2, BK=64), _cfg(8, 2, BK=32), _cfg(4, 2, BK=64)],
    _kda_intra_bwd_kernel: [_cfg(8, 2, BK=32), _cfg(8, 2, BK=64)],
    _recurrent_kernel: [_cfg(1, 1, BV=8), _cfg(2, 1, BV=16), _cfg(4, 1, BV=32), _cfg(4, 1, BV=64)],
}
# The key: head dims, chunk, gate kind, dot precision and, for the kernels whose grid is only B·H·V/BV
# programs, B·H (tensor dtypes are added by triton). Every kernel writes fresh outputs, so the autotuner's
# repeated launches are harmless; the decode kernel updates the state in place, which the autotuner restores.
_KEY = ("K", "V", "BT", "PER_CHANNEL", "PREC", "BH")
_TUNED = {
    kern: triton.autotune(
        configs=cfgs,
        key=[n for n in _KEY if n in kern.arg_names],
        restore_value=["state"] if kern is _recurrent_kernel else None,
        cache_results=True,  # the choice is kept in triton's cache directory, for the next process
    )(kern)
    for kern, cfgs in _CONFIGS.items()
}


def _variant(kernel, x: torch.Tensor):
    """(kernel to launch, its fixed block sizes): the autotuned kernel on CUDA for fp16/bf16, else fixed blocks."""
    if x.device.type == "cuda" and x.dtype != torch.float32:
        return _TUNED[kernel], {}
    if x.device.type != "cuda":
        return kernel, {n: 16 for n in ("BK", "BV") if n in kernel.arg_names}
    # fp32 on CUDA: FMA dots; 8 warps, no pipelining (3 stages of fp32 tiles overflow shared memory)
    return kernel, {n: 32 for n in ("BK", "BV") if n in kernel.arg_names} | dict(num_warps=8, num_stages=1)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32: exact fp32 dots, not TF32


def _chunk(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 2 * SUB_CHUNK


def _cumsum(x: torch.Tensor, BT: int, reverse: bool, dtype: torch.dtype) -> torch.Tensor:
    B, T, H = x.shape[:3]
    D = x.shape[3] if x.dim() == 4 else 1
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    BD = min(64, max(16, triton.next_power_of_2(D)))
    _cumsum_kernel[(triton.cdiv(T, BT), B * H, triton.cdiv(D, BD))](x, y, T, H=H, D=D, BT=BT, BD=BD, REVERSE=reverse)
    return y


def _forward(q, k, v, G, beta, scale, h0, BT, store_t, store_ht):
    """The forward's intermediates: dict of w, u, tm (T, if store_t), aqk (KDA), hs, vn, ht (if store_ht)."""
    B, T, H, K = q.shape
    V, NT, dev, dt = v.shape[-1], triton.cdiv(T, BT), q.device, q.dtype
    c = dict(H=H, K=K, BT=BT, PER_CHANNEL=G.dim() == 4, PREC=_prec(dt))
    aqk = akk = None
    if G.dim() == 4:
        aqk = torch.empty((B, T, H, BT), dtype=torch.float32, device=dev)
        akk = torch.empty((B, T, H, BT), dtype=torch.float32, device=dev)
        kern, meta = _variant(_kda_intra_kernel, q)
        kern[(NT * (BT // SUB_CHUNK), B * H)](
            q, k, G, beta, aqk, akk, scale, T, H=H, K=K, BT=BT, BC=SUB_CHUNK, PREC=c["PREC"], **meta
        )
    w = torch.empty((B, T, H, K), dtype=dt, device=dev)
    u = torch.empty((B, T, H, V), dtype=dt, device=dev)
    tm = torch.empty((B, T, H, BT), dtype=dt, device=dev) if store_t else None
    kg = torch.empty_like(k) if G.dim() == 4 else None
    qg = torch.empty_like(q) if G.dim() == 4 and store_t else None
    kern, meta = _variant(_solve_kernel, q)
    kern[(NT, B * H)](q, k, v, G, beta, akk, w, u, tm, kg, qg, T, V=V, BC=SUB_CHUNK, STORE_T=store_t, **c, **meta)
    hs = torch.empty((B, NT, H, K, V), dtype=dt, device=dev)
    vn = torch.empty((B, T, H, V), dtype=dt, device=dev)
    ht = torch.empty((B, H, K, V), dtype=torch.float32, device=dev) if store_ht else None
    kern, meta = _variant(_state_fwd_kernel, q)
    kern[lambda m: (triton.cdiv(V, m["BV"]), B * H)](
        k if kg is None else kg,
        w,
        u,
        G,
        h0,
        hs,
        vn,
        ht,
        T,
        NT,
        B * H,
        V=V,
        KP=triton.next_power_of_2(K),
        HAS_H0=h0 is not None,
        STORE_HT=store_ht,
        **c,
        **meta,
    )
    return dict(w=w, u=u, tm=tm, aqk=aqk, kg=kg, qg=qg, hs=hs, vn=vn, ht=ht)


def chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state=None, output_final_state=False):
    """q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] or [B, T, H, K] (log-decay), beta [B, T, H], scale a
    float, initial_state [B, H, K, V] fp32 or None. Returns o [B, T, H, V] (q's dtype) and the final state
    [B, H, K, V] fp32 (None unless output_final_state)."""
    require_kernel_device(q)
    B, T, H, K = q.shape
    V, BT = v.shape[-1], _chunk(q.device)
    NT = triton.cdiv(T, BT)
    G = _cumsum(g, BT, False, torch.float32)
    f = _forward(q, k, v, G, beta, scale, initial_state, BT, False, output_final_state)
    o = torch.empty((B, T, H, V), dtype=q.dtype, device=q.device)
    kern, meta = _variant(_output_kernel, q)
    kern[lambda m: (triton.cdiv(V, m["BV"]), NT, B * H)](
        q,
        k,
        G,
        f["aqk"],
        f["hs"],
        f["vn"],
        o,
        scale,
        T,
        NT,
        H=H,
        K=K,
        V=V,
        BT=BT,
        PER_CHANNEL=g.dim() == 4,
        PREC=_prec(q.dtype),
        **meta,
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
    NT, f32 = triton.cdiv(T, BT), dict(dtype=torch.float32, device=dev)
    c = dict(H=H, K=K, V=V, BT=BT, PER_CHANNEL=g.dim() == 4, PREC=_prec(dt))
    G = _cumsum(g, BT, False, torch.float32)
    f = _forward(q, k, v, G, beta, scale, initial_state, BT, True, False)
    daqk, dvl = torch.empty((B, T, H, BT), **f32), torch.empty((B, T, H, V), **f32)
    kern, meta = _variant(_dv_local_kernel, q)
    kern[(NT, B * H)](q, k, G, f["aqk"], f["vn"], do, daqk, dvl, scale, T, **c, **meta)
    dhs = torch.empty((B, NT, H, K, V), dtype=dt, device=dev)
    dvn = torch.empty((B, T, H, V), **f32)
    dh0 = torch.empty((B, H, K, V), **f32) if initial_state is not None else None
    kern, meta = _variant(_state_bwd_kernel, q)
    kern[lambda m: (triton.cdiv(V, m["BV"]), B * H)](
        q if f["qg"] is None else f["qg"],
        k if f["kg"] is None else f["kg"],
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
        B * H,
        KP=triton.next_power_of_2(K),
        HAS_DHT=dht is not None,
        STORE_DH0=dh0 is not None,
        **c,
        **meta,
    )
    dv = torch.empty_like(v)
    dq_p, dk_p = torch.empty((B, T, H, K), **f32), torch.empty((B, T, H, K), **f32)
    db_p, dg_p = torch.empty((B, T, H), **f32), torch.empty(G.shape, **f32)
    dakk = torch.empty((B, T, H, BT), **f32)
    kern, meta = _variant(_grad_kernel, q)
    kern[(NT, B * H)](
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
        **c,
        **meta,
    )
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    db, dG = torch.empty_like(beta), torch.empty(G.shape, **f32)
    args = (q, k, G, beta, dakk, daqk, dq_p, dk_p, db_p, dg_p, dq, dk, db, dG, scale, T)
    c = dict(H=H, K=K, BT=BT, PREC=c["PREC"])
    if g.dim() == 4:
        kern, meta = _variant(_kda_intra_bwd_kernel, q)
        kern[(NT * (BT // SUB_CHUNK), B * H)](*args, BC=SUB_CHUNK, **c, **meta)
    else:
        kern, meta = _variant(_intra_bwd_kernel, q)
        kern[(NT, B * H)](*args, **c, **meta)
    return dq, dk, dv, _cumsum(dG, BT, True, g.dtype), db, dh0


def fused_recurrent_gated_delta_rule(q, k, v, g, beta, state, scale):
    """A few decode tokens: q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] or [B, T, H, K], beta [B, T, H];
    state [B, H, K, V] fp32, updated in place. Returns o [B, T, H, V] in q's dtype."""
    require_kernel_device(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = torch.empty((B, T, H, V), dtype=q.dtype, device=q.device)
    kern, meta = _variant(_recurrent_kernel, q)
    kern[lambda m: (triton.cdiv(V, m["BV"]), B * H)](
        q,
        k,
        v,
        g,
        beta,
        state,
        o,
        scale,
        T,
        B * H,
        H=H,
        K=K,
        V=V,
        KP=triton.next_power_of_2(K),
        PER_CHANNEL=g.dim() == 4,
        **meta,
    )
    return o
