"""Exercise 06 — DSA's lightning indexer (DeepSeek-V3.2, GLM-5): the index scores, the top-k selection, the
warm-up's KL target, and the score kernel in Triton.

DSA lets every query token attend to only k earlier tokens (k = 2048 in GLM-5), and a small scorer, the
lightning indexer, picks them. For query t and key s (both in one sequence of a batch):

    I[t, s] = Σ_h  w[t, h] · ReLU( scale · q[t, h, :] · k[s, :] )      if s is visible to t
            = −inf                                                   otherwise

q [B, T, H, D]: H index heads per query token; k [B, L, D]: ONE index key per token, shared by all heads;
w [B, T, H]: a weight per query and head (GLM-5: ``weights_proj(x) · H^-½``, of either sign); scale > 0
(default D^-½). Query t sits at absolute position ``offset + t`` (offset = tokens already cached: 0 for a
prefill, L − 1 for one decoding step), and key s is visible to it iff s ≤ offset + t — causal, itself
included. Then each query keeps the k keys with the largest I: every earlier token is a candidate, wherever
it sits (this is not "a local window plus a few anchors").

Part 1: ``index_scores`` — I in plain torch.
Part 2: ``select_topk`` — the top-k of each row of I, −1 in the slots a query cannot fill (it sees fewer than
        k keys: the first tokens of a prefill).
Part 3: the dense warm-up's training signal (DeepSeek-V3.2 §2.1): ``attention_target`` p, the main attention
        summed over its heads and L1-normalised, and ``indexer_kl``, KL(p ‖ softmax(I)) per query row.
Part 4: ``index_scores_kernel`` — Part 1 as a Triton kernel that never forms the [B, T, H, L] per-head
        scores: each program owns a tile of I, loads its keys once and loops over the heads.

The notebook ex06.ipynb walks through each part; write the functions here, then run ``self_check()`` there (or
``python -m glmkit.grading check`` in this folder). Do not import glmkit (``glmkit.ops.lightning_indexer``,
``glmkit.kernels.lightning_indexer``, ``glmkit.mixers.dsa`` are the references you re-implement; the grader
refuses such a submission, which scores zero). torch, triton and plain Python are fine.

Without a GPU the kernel runs under the Triton interpreter (exact, slow: keep test shapes small). The lines
below select it before triton is imported; on a CUDA machine the same code compiles natively.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# Part 1 — the index scores
# ----------------------------------------------------------------------------------------------------


def index_scores(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, offset: int = 0, scale: float | None = None
) -> torch.Tensor:
    """The lightning indexer's logits I [B, T, L], float32.

    q [B, T, H, D], k [B, L, D], w [B, T, H] (float32 or float16; compute in float32); offset >= 0 with
    offset + T <= L; scale > 0, None = D ** -0.5.

    I[b, t, s] = Σ_h w[b, t, h] · ReLU(scale · q[b, t, h] · k[b, s]) where s <= offset + t, else −inf.
    The ReLU acts on each head's score, BEFORE the weighted sum over heads (w may be negative).
    """
    # BEGIN SOLUTION
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    per_head = torch.einsum("bthd,bsd->bths", q.float(), k.float()) * scale  # [B, T, H, L]
    logits = torch.einsum("bth,bths->bts", w.float(), per_head.clamp_min(0.0))
    T, L = q.shape[1], k.shape[1]
    key_pos = torch.arange(L, device=q.device)
    query_pos = torch.arange(offset, offset + T, device=q.device)
    return logits.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], NEG_INF)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 2 — top-k
# ----------------------------------------------------------------------------------------------------


def select_topk(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """The keys each query attends to: idx [B, T, min(topk, L)] int64.

    logits [B, T, L] float32, −inf where a key is not visible (as ``index_scores`` returns them); topk >= 1.
    Row (b, t) holds the indices of its min(topk, L) largest logits, in any order — except that a slot whose
    logit is −inf (the query sees fewer keys than slots) holds −1 instead of an index. Visible keys may
    have any finite logit, negative or zero included: only −inf means "not visible".
    """
    # BEGIN SOLUTION
    n = min(topk, logits.shape[-1])
    best = logits.topk(n, dim=-1)
    return torch.where(best.values == NEG_INF, torch.full_like(best.indices, -1), best.indices)
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 3 — the warm-up's training signal
# ----------------------------------------------------------------------------------------------------


def attention_target(q: torch.Tensor, kv: torch.Tensor, scale: float, visible: torch.Tensor) -> torch.Tensor:
    """p [B, T, L] float32: the main attention of each query, summed over its heads and L1-normalised.

    MLA in "MQA mode" (lesson 05): every head h scores the SAME per-token row kv[b, s] (the latent with its
    RoPE part), so q [B, T, H, D] and kv [B, L, D]. visible [B or 1, T, L] bool: which keys each query may see.

        a[b, t, h, :] = softmax over the visible s of scale · q[b, t, h] · kv[b, s]   (0 where not visible)
        p[b, t, :]    = Σ_h a[b, t, h, :] / H                                        (each row sums to 1)

    A query that sees no key at all (a padding row) gets a row of zeros, not NaN.
    """
    # BEGIN SOLUTION
    s = torch.einsum("bthd,bsd->bths", q.float(), kv.float()) * scale
    s = s.masked_fill(~visible[:, :, None, :], NEG_INF)
    a = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    return a.mean(dim=2)
    # END SOLUTION


def indexer_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The indexer's loss: the mean over all B·T query rows of KL(p ‖ softmax(I)), a float32 scalar.

    logits I [B, T, N] with −inf at the entries outside the row's set (invisible keys in the warm-up; the
    empty slots of a selection in the sparse stage); target p [B, T, N], 0 outside the set, each row summing
    to 1 (or 0: a row with nothing to learn).

        KL_row = Σ_{s in the set, p_s > 0} p_s · (log p_s − log softmax(I)_s)

    where the softmax runs over the row's set only. Terms with p_s = 0 are 0 (the limit of p log p), never
    NaN; a row whose set is empty contributes 0 and still counts in the mean.
    """
    # BEGIN SOLUTION
    in_set = logits != NEG_INF
    safe = torch.where(in_set, logits.float(), torch.full_like(logits, -1e30, dtype=torch.float32))
    log_q = torch.log_softmax(safe, dim=-1)
    p = torch.where(in_set, target.float(), torch.zeros_like(target, dtype=torch.float32))
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-38)) - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1).mean()
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 4 — the scores as a Triton kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def index_scores_kernel(
    Q,  # pointer: q [B, T, H, D], contiguous
    K,  # pointer: k [B, L, D], contiguous
    W,  # pointer: w [B, T, H], contiguous
    OUT,  # pointer: I [B, T, L] float32, contiguous (arbitrary values on entry)
    scale,  # float > 0
    offset,  # absolute position of query 0
    T,
    L,
    H,
    D,
    BLOCK_T: tl.constexpr,  # queries per program (>= 16)
    BLOCK_L: tl.constexpr,  # keys per program (>= 16)
    BLOCK_D: tl.constexpr,  # a power of two >= D (and >= 16)
):
    """Program (i, j, b) computes the tile I[b, i·BLOCK_T : (i+1)·BLOCK_T, j·BLOCK_L : (j+1)·BLOCK_L].

    1. Load the tile's keys ONCE, [BLOCK_L, BLOCK_D] (rows past L and columns past D load 0).
    2. For each head h: load the tile's queries of head h [BLOCK_T, BLOCK_D] and their weights w[., h]; add
       w · ReLU(scale · q·kᵀ) to an fp32 [BLOCK_T, BLOCK_L] accumulator (``tl.dot`` of a [BLOCK_T, BLOCK_D] and a
       [BLOCK_D, BLOCK_L] block, both cast to fp32; ``input_precision="ieee"`` keeps fp32 dots exact on a GPU).
    3. Store the accumulator where the key is visible (s <= offset + t) and −inf where it is not, masked to
       the t < T, s < L part of the tile. Every element of OUT must be written.
    Strides of contiguous tensors: q's (T·H·D, H·D, D, 1), k's (L·D, D, 1), w's (T·H, H, 1), OUT's (T·L, L, 1).
    """
    # BEGIN SOLUTION
    pid_t, pid_l, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # query indices t
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)  # key indices s
    dims = tl.arange(0, BLOCK_D)
    key_tile = tl.load(
        K + b * L * D + cols[:, None] * D + dims[None, :],
        mask=(cols[:, None] < L) & (dims[None, :] < D),
        other=0.0,
    )
    acc = tl.zeros([BLOCK_T, BLOCK_L], dtype=tl.float32)
    for h in range(H):
        q_tile = tl.load(
            Q + b * T * H * D + rows[:, None] * (H * D) + h * D + dims[None, :],
            mask=(rows[:, None] < T) & (dims[None, :] < D),
            other=0.0,
        )
        w_h = tl.load(W + b * T * H + rows * H + h, mask=rows < T, other=0.0).to(tl.float32)
        dot = tl.dot(q_tile.to(tl.float32), tl.trans(key_tile.to(tl.float32)), input_precision="ieee") * scale
        acc += w_h[:, None] * tl.maximum(dot, 0.0)
    seen = cols[None, :] <= offset + rows[:, None]
    acc = tl.where(seen, acc, float("-inf"))
    tl.store(OUT + b * T * L + rows[:, None] * L + cols[None, :], acc, mask=(rows[:, None] < T) & (cols[None, :] < L))
    # END SOLUTION


def index_scores_triton(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, offset: int = 0, scale: float | None = None
) -> torch.Tensor:
    """``index_scores`` on the kernel: the same arguments and result (I [B, T, L] float32, −inf where not
    visible). q and k share one dtype (float32 or float16); w is float32.

    Given: the argument checks, contiguous copies, the output and the block sizes. Yours: the grid (one program
    per tile of BLOCK_T queries × BLOCK_L keys, per sample) and the launch.
    """
    if q.dim() != 4 or k.dim() != 3 or w.dim() != 3:
        raise ValueError(f"q must be [B, T, H, D], k [B, L, D], w [B, T, H]; got {q.shape}, {k.shape}, {w.shape}")
    B, T, H, D = q.shape
    L = k.shape[1]
    if k.shape != (B, L, D) or w.shape != (B, T, H) or not 0 <= offset <= L - T:
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}"
        raise ValueError(f"shapes do not fit: {shapes}, offset={offset}")
    q, k, w = q.contiguous(), k.contiguous(), w.contiguous()
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.empty(B, T, L, dtype=torch.float32, device=q.device)
    BLOCK_T, BLOCK_L = 16, 16
    BLOCK_D = max(16, triton.next_power_of_2(D))
    # BEGIN SOLUTION
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(L, BLOCK_L), B)
    index_scores_kernel[grid](
        q, k, w, out, scale, offset, T, L, H, D, BLOCK_T=BLOCK_T, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D
    )
    # END SOLUTION
    return out
