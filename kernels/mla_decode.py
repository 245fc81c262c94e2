"""Absorbed MLA decode over the latent cache (lesson 05's memory-bound kernel): the Triton code and launcher behind
``glmkit.ops.mla_decode``, whose ``mla_decode_reference`` is the definition it is tested against.

What it computes, per sequence b, query token t and head h (``glmkit.mixers.mla`` derives it):

    s_j  = scale · (q_lat[h] · c_KV[j] + q_rope[h] · k_rot[j])      for the keys j the query may see
    o[h] = Σ_j softmax(s)_j · c_KV[j]                                 (the caller applies W_UV and o_proj)

q_lat = q_nope W_UK is the query with the key up-projection folded in ("absorbed"), so every head reads the *same*
cached row per token: the 512-value latent c_KV and the 64-value shared RoPE key k_rot (576 values, 1152 bytes in
bf16, for GLM-4.7-Flash and GLM-5). How it differs from the prefill kernel (``kernels/attention.py``): there one query
block of one head meets k and v blocks of that head; here the H heads of one token are the rows of the tile, so one
load of a latent row feeds H dot products. A decode step is a GEMV per head; stacking the heads makes it a [H, 576] ×
[576, N] matrix product that the tensor cores take, and the kernel becomes what it should be: a stream of the cache
through the chip at memory speed. (FlashMLA, DeepSeek 2025, is the CUDA kernel that made this famous.)

Work split (split-K, FlashDecoding's trick, Dao et al. 2023). A decode batch has few queries (B · Tq rows) but long
caches, so one program per row would leave most of the GPU idle. The key range [0, L) is cut into ``num_splits``
chunks; program (head block, split s, row) runs an online softmax (running max m, denominator l, unnormalised
accumulator, as in flash attention) over its chunk and writes a partial output o_s = acc / l with its log-sum-exp
lse_s = m + log2 l (base 2). ``_combine_kernel`` then merges the chunks exactly:

    o = Σ_s 2^(lse_s − M) · o_s / Σ_s 2^(lse_s − M),      M = max_s lse_s

With one split the first kernel writes the normalised output itself and the combine is skipped.

Ragged batches and masks. ``lengths[b]`` is how many cached keys row b has (FlashMLA's cache_seqlens): without a mask
the query t of a chunk of Tq new tokens sees keys j < lengths[b] − Tq + 1 + t (causal at the end of its sequence);
chunks past a row's length exit at once and write an empty partial (lse = −∞, weight 0 in the combine). With an
explicit ``visible`` mask [B, Tq, L] (glmkit's ``Step.visible``: left padding, GLM's prefix) the kernel loads BLOCK_N
booleans per key block, 1/1152 of the latent bytes, and applies them to every head. A block whose keys are all
masked leaves the running max at −∞; the rescale uses 0 in its place, so no 0/0 appears.

Layouts: q_lat [B, Tq, H, R], q_rope [B, Tq, H, P], c_kv [B, L, R], k_rot [B, L, P] (views of one [B, L_max, R + P]
buffer work: only the last dim must be contiguous), out [B, Tq, H, R] in q's dtype. R and P need not be powers of two
(tiles are padded and masked). Native on CUDA (autotuned tiles for fp16/bf16, fixed ones for fp32), and on CPU tensors
under the Triton interpreter. Forward only: decoding needs no gradient.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from glmkit.backend import require_kernel_device

LOG2E = 1.4426950408889634


@triton.jit
def _mla_decode_kernel(
    QL,
    QR,
    CKV,
    KR,
    LENS,
    VIS,
    OUT,
    OPART,
    LSEPART,
    qk_scale,  # softmax scale · log2(e)
    stride_qlb,
    stride_qlt,
    stride_qlh,
    stride_qrb,
    stride_qrt,
    stride_qrh,
    stride_cb,
    stride_ct,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    stride_ob,
    stride_ot,
    stride_oh,
    H,
    Tq,
    L,
    CHUNK,  # keys per split, a multiple of every BLOCK_N
    NUM_SPLITS,
    R: tl.constexpr,
    P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_VIS: tl.constexpr,
    SPLIT: tl.constexpr,  # False: one split, write the normalised output directly
    DOT_PRECISION: tl.constexpr,
):
    # Grid: (head blocks, splits, B · Tq). The head blocks of one (row, split) are neighbours in launch order, so
    # when H needs more than one block the second read of the same latent rows comes from L2.
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bt = tl.program_id(2)
    b = (pid_bt // Tq).to(tl.int64)
    t = pid_bt % Tq

    n_keys = tl.minimum(tl.load(LENS + b).to(tl.int32), L)
    if HAS_VIS:
        limit = n_keys  # the mask says the rest
    else:
        limit = tl.minimum(n_keys - Tq + 1 + t, n_keys)  # causal: the t-th of the Tq newest tokens
    lo = pid_s * CHUNK
    hi = tl.minimum(lo + CHUNK, limit)

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    hmask = offs_h < H
    ql = tl.load(
        QL + b * stride_qlb + t * stride_qlt + offs_h[:, None] * stride_qlh + offs_r[None, :],
        mask=hmask[:, None] & (offs_r[None, :] < R),
        other=0.0,
    )  # [BH, BR]: padded heads are zero rows (finite scores, never stored)
    qr = tl.load(
        QR + b * stride_qrb + t * stride_qrt + offs_h[:, None] * stride_qrh + offs_p[None, :],
        mask=hmask[:, None] & (offs_p[None, :] < P),
        other=0.0,
    )
    c_base = CKV + b * stride_cb
    k_base = KR + b * stride_kb

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for start in tl.range(lo, hi, BLOCK_N):
        cols = start + offs_n
        live = cols < hi
        c = tl.load(
            c_base + cols[:, None] * stride_ct + offs_r[None, :],
            mask=live[:, None] & (offs_r[None, :] < R),
            other=0.0,
        )  # [BN, BR]: the latent rows, read once for all the heads of the tile
        kr = tl.load(
            k_base + cols[:, None] * stride_kt + offs_p[None, :], mask=live[:, None] & (offs_p[None, :] < P), other=0.0
        )
        s = tl.dot(ql, tl.trans(c), input_precision=DOT_PRECISION)
        s = tl.dot(qr, tl.trans(kr), s, input_precision=DOT_PRECISION)  # [BH, BN] raw scores, fp32
        if HAS_VIS:
            live = live & (tl.load(VIS + b * stride_vb + t * stride_vt + cols, mask=live, other=0) != 0)
        s = tl.where(live[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no visible key yet: no -inf - -inf
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(c.dtype), c, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # a chunk past this row's length (or fully masked)
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if SPLIT:
        row = (pid_bt * H + offs_h).to(tl.int64) * NUM_SPLITS + pid_s  # [B·Tq·H, splits] partial rows
        tl.store(OPART + row[:, None] * BLOCK_R + offs_r[None, :], out, mask=hmask[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSEPART + row, lse, mask=hmask)
    else:
        o_ptrs = OUT + b * stride_ob + t * stride_ot + offs_h[:, None] * stride_oh + offs_r[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=hmask[:, None] & (offs_r[None, :] < R))


@triton.jit
def _combine_kernel(
    OPART,
    LSEPART,
    OUT,
    stride_ob,
    stride_ot,
    stride_oh,
    H,
    Tq,
    NUM_SPLITS,
    R: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program per (row, head): o = Σ_s w_s o_s / Σ_s w_s with w_s = 2^(lse_s − max lse)."""
    pid = tl.program_id(0)
    h = pid % H
    bt = pid // H
    b = (bt // Tq).to(tl.int64)
    t = bt % Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, BLOCK_R)
    base = pid.to(tl.int64) * NUM_SPLITS
    lse = tl.load(LSEPART + base + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.math.exp2(lse - m), 0)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        w = tl.math.exp2(tl.load(LSEPART + base + s) - m)
        acc += w * tl.load(OPART + (base + s) * BLOCK_R + offs_r)
    out = acc / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        OUT + b * stride_ob + t * stride_ot + h * stride_oh + offs_r, out.to(OUT.dtype.element_ty), mask=offs_r < R
    )


# CUDA tiles (BLOCK_H heads × BLOCK_N keys, warps, stages). Guesses sized for an H200, timed by
# benchmarks/bench_mla.py: the fp32 accumulator [BLOCK_H, 512] is 64 registers per thread at BLOCK_H = 32 with 8
# warps; a [64, 576] bf16 tile of latent rows is 72 KiB per pipeline stage. BLOCK_H above the padded head count is
# pruned (H = 20 → 16 or 32; GLM-5's 64 heads run two blocks of 32 or one of 64).
_CONFIGS = [(32, 64, 8, 2), (32, 32, 4, 3), (16, 64, 4, 2), (64, 32, 8, 2)]


def _prune(configs, named_args, **kwargs):
    H = named_args["H"]
    cap = max(16, triton.next_power_of_2(H))
    keep = [c for c in configs if c.kwargs["BLOCK_H"] <= cap]
    return keep or configs[:1]


_decode_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_H": bh, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bh, bn, w, s in _CONFIGS],
    key=["H", "R", "P", "HAS_VIS", "SPLIT", "DOT_PRECISION"],  # tensor dtypes are added by triton
    prune_configs_by={"early_config_prune": _prune},
)(_mla_decode_kernel)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a pretend GPU, small enough that the tests' shapes split
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(rows: int, L: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split) for ``rows`` = B · Tq queries over a cache of L positions: enough (row, split)
    programs for about two per SM, chunks of at least 4 key blocks (each split writes a fp32 partial output of
    H × R values, so a chunk must be long enough for its reads to dominate), at most 128 splits. Shapes only: no
    host sync."""
    align = 64 if device.type == "cuda" else 16  # the largest BLOCK_N of the configs
    want = triton.cdiv(2 * _sm_count(device), max(rows, 1))
    splits = max(1, min(want, triton.cdiv(L, 4 * align), 128))
    chunk = triton.cdiv(triton.cdiv(L, splits), align) * align
    return triton.cdiv(L, chunk), chunk


def mla_decode_fwd(q_lat, q_rope, c_kv, k_rot, scale: float, lengths=None, visible=None) -> torch.Tensor:
    """The kernel: arguments as ``glmkit.ops.mla_decode.mla_decode`` (already validated there). Returns
    o_lat [B, Tq, H, R] in q_lat's dtype."""
    require_kernel_device(q_lat)
    B, Tq, H, R = q_lat.shape
    P, L = q_rope.shape[-1], c_kv.shape[1]
    dev = q_lat.device
    q_lat, q_rope, c_kv, k_rot = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_lat, q_rope, c_kv, k_rot))
    lens = torch.full((B,), L, dtype=torch.int32, device=dev) if lengths is None else lengths.contiguous()
    has_vis = visible is not None
    vis = visible.contiguous() if has_vis else lens  # dummy pointer when absent
    out = torch.empty((B, Tq, H, R), dtype=q_lat.dtype, device=dev)
    splits, chunk = num_splits(B * Tq, L, dev)
    block_r = max(16, triton.next_power_of_2(R))
    split = splits > 1
    opart = torch.empty((B * Tq * H * splits, block_r) if split else (1,), dtype=torch.float32, device=dev)
    lsepart = torch.empty((B * Tq * H * splits,) if split else (1,), dtype=torch.float32, device=dev)
    args = (
        q_lat,
        q_rope,
        c_kv,
        k_rot,
        lens,
        vis,
        out,
        opart,
        lsepart,
        scale * LOG2E,
        q_lat.stride(0),
        q_lat.stride(1),
        q_lat.stride(2),
        q_rope.stride(0),
        q_rope.stride(1),
        q_rope.stride(2),
        c_kv.stride(0),
        c_kv.stride(1),
        k_rot.stride(0),
        k_rot.stride(1),
        vis.stride(0) if has_vis else 0,
        vis.stride(1) if has_vis else 0,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        H,
        Tq,
        L,
        chunk,
        splits,
    )
    consts = dict(
        R=R,
        P=P,
        BLOCK_R=block_r,
        BLOCK_P=max(16, triton.next_power_of_2(P)),
        HAS_VIS=has_vis,
        SPLIT=split,
        DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32",
    )
    if dev.type == "cuda" and q_lat.dtype != torch.float32:
        _decode_tuned[lambda meta: (triton.cdiv(H, meta["BLOCK_H"]), splits, B * Tq)](*args, **consts)
    else:  # fp32 on CUDA (the checking dtype) or the interpreter: small fixed tiles
        cuda = dev.type == "cuda"
        kw = dict(num_warps=4, num_stages=1) if cuda else {}
        _mla_decode_kernel[(triton.cdiv(H, 16), splits, B * Tq)](
            *args, BLOCK_H=16, BLOCK_N=32 if cuda else 16, **kw, **consts
        )
    if split:
        _combine_kernel[(B * Tq * H,)](
            opart,
            lsepart,
            out,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            H,
            Tq,
            splits,
            R=R,
            BLOCK_R=block_r,
            BLOCK_S=max(2, triton.next_power_of_2(splits)),
        )
    return out


def decode_bytes(B: int, L: int, H: int, R: int, P: int, Tq: int = 1, itemsize: int = 2) -> int:
    """Bytes a decode step must move at least: every cached latent row once (B · L · (R + P)), the queries and the
    outputs (B · Tq · H · (2R + P))."""
    return itemsize * (B * L * (R + P) + B * Tq * H * (2 * R + P))
