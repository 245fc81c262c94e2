"""Exercise 05 — Multi-head Latent Attention: weight absorption, and the latent decode kernel in Triton.

The setting (GLM-4.7-Flash and GLM-5; lesson 05). Per token and layer the cache keeps one row [c_KV | k_rot]: the
latent c_KV (R = kv_lora_rank values, 512 in GLM) and one RoPE key k_rot (P = qk_rope_head_dim values, 64) that every
head shares. The layer's ``kv_b_proj`` (weight [H · (nope + v), R]) up-projects the latent into each head's key and
value; its rows come head by head, each head's ``nope`` key rows first, then its ``v`` value rows:

    kv_b_proj.weight rows:  [ W_UK[0] (nope rows) | W_UV[0] (v rows) | W_UK[1] | W_UV[1] | ... | W_UV[H-1] ]

    k_nope[h, j] = W_UK[h] c_KV[j]        v[h, j] = W_UV[h] c_KV[j]
    s[h, t, j]   = scale · (q_nope[h, t] · k_nope[h, j] + q_rot[h, t] · k_rot[j])
    o[h, t]      = Σ_j softmax_j(s[h, t]) · v[h, j]

That is the **naive** path (``naive_attention`` below writes it out: compare with it). It expands H · (nope + v)
values per cached token on every step. The **absorbed** path never does:

Part 1 — the absorbed form, in plain torch.
    split_kv_b        kv_b_proj.weight → W_UK [H, nope, R] and W_UV [H, v, R]
    absorb_query      q_lat[h] = W_UK[h]ᵀ q_nope[h] ∈ R^R, so that q_nope · k_nope = q_lat · c_KV
    latent_attention  every head attends to the SAME rows: o_lat[h, t] = Σ_j softmax_j(s[h, t]) · c_KV[j] with
                      s[h, t, j] = scale · (q_lat[h, t] · c_KV[j] + q_rot[h, t] · k_rot[j])
    absorbed_output   o[h, t] = W_UV[h] o_lat[h, t]
Together they must give the naive path's output (up to float rounding).

Part 2 — absorb into the weights once (what a deployment can precompute).
    fold_weights      W_UK folded into q_b_proj, W_UV folded into o_proj

Part 3 — the decode kernel in Triton (FlashDecoding's split-K, FlashMLA's layout).
    latent_decode_kernel  one program per (sequence, split of the keys): all the heads of the sequence's new token
                          on one tile, an online softmax over the split's keys, a partial output and its
                          log-sum-exp
    combine_splits        merge the splits' partial outputs exactly

Which keys a query sees (parts 1 and 3). Row b of the batch has n_b = lengths[b] cached tokens (None: all L), and
its T queries are its NEWEST T tokens: query t (0-based) sees the keys j < n_b − T + 1 + t. A query that sees no key
gets an output of zeros.

The notebook ex05.ipynb walks through each part; write the functions here, then run ``self_check()`` there (or
``python -m glmkit.grading check`` in this folder). Do not import glmkit here (``glmkit.mixers.mla``,
``glmkit.ops.mla_decode`` and ``glmkit.kernels.mla_decode`` are the references you are re-implementing, and the
grader refuses any glmkit import: such a submission scores zero). torch, triton and plain Python are fine.

Without a GPU the kernel runs under the Triton interpreter (exact, slow: keep test shapes small). The lines below
select it before triton is imported; on a CUDA machine the same code compiles natively.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


def visible_keys(T: int, L: int, lengths: torch.Tensor | None, batch: int) -> torch.Tensor:
    """[B, T, L] bool: which keys each query sees (the rule in the module docstring). Given."""
    n = torch.full((batch,), L) if lengths is None else lengths.to(torch.int64).cpu()
    j = torch.arange(L)
    t = torch.arange(T)
    return (j[None, None, :] < n[:, None, None]) & (j[None, None, :] < (n[:, None, None] - T + 1 + t[None, :, None]))


def naive_attention(q_nope, q_rot, c_kv, k_rot, kv_b_weight, scale: float, lengths=None) -> torch.Tensor:
    """The naive path, given (to compare with): expand every head's keys and values from the latent, then ordinary
    attention. q_nope [B, H, T, nope], q_rot [B, H, T, P], c_kv [B, L, R], k_rot [B, L, P], kv_b_weight
    [H·(nope + v), R] → o [B, H, T, v] (float32)."""
    B, H, T, nope = q_nope.shape
    L = c_kv.shape[1]
    kv = (c_kv.float() @ kv_b_weight.float().T).view(B, L, H, -1).transpose(1, 2)  # [B, H, L, nope + v]
    k_nope, v = kv[..., :nope], kv[..., nope:]
    s = q_nope.float() @ k_nope.transpose(-1, -2) + q_rot.float() @ k_rot.float()[:, None].transpose(-1, -2)
    s = (s * scale).masked_fill(~visible_keys(T, L, lengths, B)[:, None], float("-inf"))
    return (s.softmax(-1).nan_to_num(0.0) @ v).float()


# ----------------------------------------------------------------------------------------------------
# Part 1 — the absorbed form
# ----------------------------------------------------------------------------------------------------


def split_kv_b(kv_b_weight: torch.Tensor, num_heads: int, nope: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj.weight [H·(nope + v_dim), R] → (W_UK [H, nope, R], W_UV [H, v_dim, R]) such that
    k_nope[h] = W_UK[h] @ c and v[h] = W_UV[h] @ c for a latent c [R] (the row layout is in the module docstring).
    Views or copies are both fine."""
    # BEGIN SOLUTION
    per_head = kv_b_weight.view(num_heads, nope + v_dim, kv_b_weight.shape[-1])
    return per_head[:, :nope], per_head[:, nope:]
    # END SOLUTION


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [B, H, T, nope], W_UK [H, nope, R] → q_lat [B, H, T, R] with q_lat[b, h, t] = W_UK[h]ᵀ q_nope[b, h, t]:
    the query that scores the latent directly, q_lat · c = q_nope · (W_UK[h] c)."""
    # BEGIN SOLUTION
    return torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
    # END SOLUTION


def latent_attention(
    q_lat: torch.Tensor,
    q_rot: torch.Tensor,
    c_kv: torch.Tensor,
    k_rot: torch.Tensor,
    scale: float,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """All H heads over the shared latent rows ("MQA mode").

    q_lat [B, H, T, R], q_rot [B, H, T, P] (already rotated), c_kv [B, L, R], k_rot [B, L, P] (rotated), scale,
    lengths [B] int64 or None (see the module docstring for which keys a query sees).
    Returns o_lat [B, H, T, R] float32: o_lat[b, h, t] = Σ_j p[j] · c_kv[b, j] with
    p = softmax over the visible keys j of scale · (q_lat[b, h, t] · c_kv[b, j] + q_rot[b, h, t] · k_rot[b, j]);
    zeros for a query that sees no key. Compute in float32."""
    # BEGIN SOLUTION
    B, H, T, R = q_lat.shape
    c, k = c_kv.float(), k_rot.float()
    scores = torch.einsum("bhtr,blr->bhtl", q_lat.float(), c) + torch.einsum("bhtp,blp->bhtl", q_rot.float(), k)
    keep = visible_keys(T, c.shape[1], lengths, B)[:, None]  # [B, 1, T, L]
    probs = (scores * scale).masked_fill(~keep, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return torch.einsum("bhtl,blr->bhtr", probs, c)
    # END SOLUTION


def absorbed_output(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """o_lat [B, H, T, R], W_UV [H, v, R] → o [B, H, T, v] with o[b, h, t] = W_UV[h] o_lat[b, h, t] (what o_proj
    then takes, as in the naive path)."""
    # BEGIN SOLUTION
    return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 2 — folding the absorption into the weights
# ----------------------------------------------------------------------------------------------------


def fold_weights(
    q_b_weight: torch.Tensor,
    kv_b_weight: torch.Tensor,
    o_weight: torch.Tensor,
    num_heads: int,
    nope: int,
    rope: int,
    v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold W_UK into the query projection and W_UV into the output projection, once, for decoding.

    q_b_weight [H·(nope + rope), Q]: q_b_proj.weight (Q = q_lora_rank; or q_proj.weight with Q = hidden size when
        there is no query latent). Its rows come head by head: each head's nope rows, then its rope rows.
    kv_b_weight [H·(nope + v_dim), R]: kv_b_proj.weight (layout in the module docstring).
    o_weight [d, H·v_dim]: o_proj.weight; its columns come head by head (head h: columns h·v_dim .. h·v_dim+v_dim−1).
    Returns (W_Q_lat [H, R, Q], W_Q_rot [H, rope, Q], W_O_lat [d, H, R]) such that, for the query latent c_Q [Q]
    and the heads' latent outputs o_lat [H, R]:
        q_lat[h] = W_Q_lat[h] @ c_Q           (= W_UK[h]ᵀ q_nope[h], with q_nope[h] from q_b_proj)
        q_rot[h] = W_Q_rot[h] @ c_Q           (before RoPE: the rope rows cannot be folded, RoPE sits after them)
        out      = Σ_h W_O_lat[:, h] @ o_lat[h]   (= o_proj applied to the heads' W_UV[h] o_lat[h])"""
    # BEGIN SOLUTION
    q_heads = q_b_weight.view(num_heads, nope + rope, q_b_weight.shape[-1])
    w_q_nope, w_q_rot = q_heads[:, :nope], q_heads[:, nope:]
    w_uk, w_uv = split_kv_b(kv_b_weight, num_heads, nope, v_dim)
    w_q_lat = torch.einsum("hnr,hnq->hrq", w_uk, w_q_nope)
    o_heads = o_weight.view(o_weight.shape[0], num_heads, v_dim)
    w_o_lat = torch.einsum("dhv,hvr->dhr", o_heads, w_uv)
    return w_q_lat, w_q_rot, w_o_lat
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 3 — the decode kernel (split-K), in Triton
# ----------------------------------------------------------------------------------------------------

BLOCK_N = 16  # keys per step of the kernel's loop (tl.dot needs every dimension >= 16)


@triton.jit
def latent_decode_kernel(
    QL,  # pointer: q_lat [B, H, R] float32 (one new token per sequence)
    QR,  # pointer: q_rot [B, H, P] float32
    CKV,  # pointer: c_kv [B, L, R] float32
    KR,  # pointer: k_rot [B, L, P] float32
    LENS,  # pointer: lengths [B] int64 — row b has keys 0 .. LENS[b] − 1 (its newest token's query sees them all)
    OPART,  # pointer: partial outputs [B, NUM_SPLITS, H, R] float32, contiguous (NaN on entry)
    LSE,  # pointer: log-sum-exps [B, NUM_SPLITS, H] float32, contiguous (NaN on entry)
    scale,  # the softmax scale
    stride_qlb,  # q_lat's strides for b and h (its last dim is contiguous; so are the others' last dims)
    stride_qlh,
    stride_qrb,
    stride_qrh,
    stride_cb,  # c_kv's strides for b and the key position
    stride_cl,
    stride_kb,  # k_rot's strides for b and the key position
    stride_kl,
    H,  # heads
    CHUNK,  # keys per split, a multiple of BLOCK_N
    NUM_SPLITS,
    R: tl.constexpr,
    P: tl.constexpr,
    BLOCK_H: tl.constexpr,  # a power of two >= max(H, 16): all the heads on one tile
    BLOCK_R: tl.constexpr,  # a power of two >= max(R, 16)
    BLOCK_P: tl.constexpr,  # a power of two >= max(P, 16)
    BLOCK_N: tl.constexpr,
):
    """Program (b, s) = (tl.program_id(0), tl.program_id(1)) handles the keys [s·CHUNK, s·CHUNK + CHUNK) of row b,
    cut at LENS[b] (a split past the row's length has no keys).

    1. Load the H query rows of q_lat [BLOCK_H, BLOCK_R] and q_rot [BLOCK_H, BLOCK_P] once (masked: rows >= H and
       columns >= R or P read 0).
    2. Walk the split's keys in blocks of BLOCK_N with an ONLINE softmax, per head: a running max m (start −inf),
       a running sum l (start 0) and an unnormalised accumulator acc [BLOCK_H, BLOCK_R] (start 0). For each block:
       load its latent rows c [BLOCK_N, BLOCK_R] and RoPE keys [BLOCK_N, BLOCK_P] (keys past the split's end
       masked), scores = scale · (q_lat · cᵀ + q_rot · k_rotᵀ) with tl.dot, −inf for masked keys; then
       m_new = max(m, max of the block's scores), p = exp(scores − m_new), and RESCALE what came before by
       exp(m − m_new) before adding the block: l = l · α + Σ p, acc = acc · α + p · c.
    3. Store OPART[b, s] = acc / l and LSE[b, s] = m + log(l) (natural log) for the H real heads. A split with no
       keys (l = 0) stores zeros and LSE = −inf.
    """
    # BEGIN SOLUTION
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    n_keys = tl.load(LENS + b).to(tl.int32)
    lo = s * CHUNK
    hi = tl.minimum(lo + CHUNK, n_keys)

    offs_h = tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    hmask = offs_h < H
    rmask = offs_r < R
    pmask = offs_p < P
    q_ptrs = QL + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_r[None, :]
    ql = tl.load(q_ptrs, mask=hmask[:, None] & rmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
    r_ptrs = QR + b * stride_qrb + offs_h[:, None] * stride_qrh + offs_p[None, :]
    qr = tl.load(r_ptrs, mask=hmask[:, None] & pmask[None, :], other=0.0)  # [BLOCK_H, BLOCK_P]

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
    for start in tl.range(lo, hi, BLOCK_N):
        keys = start + offs_n
        live = keys < hi
        c_ptrs = CKV + b * stride_cb + keys[:, None] * stride_cl + offs_r[None, :]
        c = tl.load(c_ptrs, mask=live[:, None] & rmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
        k_ptrs = KR + b * stride_kb + keys[:, None] * stride_kl + offs_p[None, :]
        kr = tl.load(k_ptrs, mask=live[:, None] & pmask[None, :], other=0.0)  # [BLOCK_N, BLOCK_P]
        scores = (tl.dot(ql, tl.trans(c)) + tl.dot(qr, tl.trans(kr))) * scale
        scores = tl.where(live[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, c)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    row = (b * NUM_SPLITS + s) * H + offs_h
    tl.store(OPART + row[:, None] * R + offs_r[None, :], out, mask=hmask[:, None] & rmask[None, :])
    tl.store(LSE + row, lse, mask=hmask)
    # END SOLUTION


def combine_splits(o_part: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Merge the splits exactly. o_part [B, S, H, R] float32 (each split's normalised output), lse [B, S, H] float32
    (each split's log-sum-exp of its scores, natural log; −inf for a split without keys, whose o_part is 0).
    Returns o [B, H, R] = Σ_s w_s · o_part[:, s] / Σ_s w_s with w_s = exp(lse_s − M), M = the max over the splits of
    lse (subtract it: lse can be large). A row and head whose splits are ALL empty gets zeros, not NaN."""
    # BEGIN SOLUTION
    top = lse.max(dim=1, keepdim=True).values  # [B, 1, H]
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp(lse - top)  # [B, S, H]; 0 for an empty split
    total = w.sum(dim=1)  # [B, H]
    o = (w[..., None] * o_part).sum(dim=1)
    return o / torch.where(total == 0, torch.ones_like(total), total)[..., None]
    # END SOLUTION


def latent_decode(
    q_lat: torch.Tensor,
    q_rot: torch.Tensor,
    c_kv: torch.Tensor,
    k_rot: torch.Tensor,
    scale: float,
    lengths: torch.Tensor,
    num_splits: int = 1,
) -> torch.Tensor:
    """The absorbed decode step for one new token per sequence: q_lat [B, H, R], q_rot [B, H, P], c_kv [B, L, R],
    k_rot [B, L, P] (float32), lengths [B] int64 (1 <= ... <= L, or 0 for an empty row) → o_lat [B, H, R] float32,
    the same as ``latent_attention`` with T = 1.

    Given: the checks, the chunk of keys per split (a multiple of BLOCK_N) and the buffers. Yours: launch
    ``latent_decode_kernel`` on a grid of (B, num_splits) programs, passing the tensors, their strides, the sizes
    and the block sizes (BLOCK_H, BLOCK_R, BLOCK_P: the smallest powers of two that hold H, R, P and are at least
    16; BLOCK_N). Then, with one split, the kernel's output is already the answer; else merge with
    ``combine_splits``."""
    B, H, R = q_lat.shape
    L, P = c_kv.shape[1], k_rot.shape[-1]
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    q_lat, q_rot, c_kv, k_rot = (t.float().contiguous() for t in (q_lat, q_rot, c_kv, k_rot))
    lengths = lengths.to(device=q_lat.device, dtype=torch.int64).contiguous()
    chunk = triton.cdiv(triton.cdiv(max(L, 1), num_splits), BLOCK_N) * BLOCK_N
    # NaN-filled: a position the kernel never writes shows up in the result
    o_part = torch.full((B, num_splits, H, R), float("nan"), device=q_lat.device)
    lse = torch.full((B, num_splits, H), float("nan"), device=q_lat.device)
    # BEGIN SOLUTION
    latent_decode_kernel[(B, num_splits)](
        q_lat,
        q_rot,
        c_kv,
        k_rot,
        lengths,
        o_part,
        lse,
        float(scale),
        q_lat.stride(0),
        q_lat.stride(1),
        q_rot.stride(0),
        q_rot.stride(1),
        c_kv.stride(0),
        c_kv.stride(1),
        k_rot.stride(0),
        k_rot.stride(1),
        H,
        chunk,
        num_splits,
        R=R,
        P=P,
        BLOCK_H=max(16, triton.next_power_of_2(H)),
        BLOCK_R=max(16, triton.next_power_of_2(R)),
        BLOCK_P=max(16, triton.next_power_of_2(P)),
        BLOCK_N=BLOCK_N,
    )
    # END SOLUTION
    if num_splits == 1:
        return o_part[:, 0]
    return combine_splits(o_part, lse)


def softmax_scale(nope: int, rope: int) -> float:
    """GLM's softmax scale: 1 / √(q·k head) over the WHOLE q·k head, nope + rope (256 in GLM-4.7-Flash and GLM-5)."""
    return 1.0 / math.sqrt(nope + rope)
