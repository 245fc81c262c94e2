"""DSA's lightning indexer (DeepSeek-V3.2, GLM-5): which earlier tokens each query attends to, its top-k, and the
losses that train it (kernel: ``kernels/lightning_indexer.py``). Facts: shared/reference/glm-lineage.md §5.3–§5.4.

Before DSA every attention layer of the lineage scored every earlier token with every head: O(T²·H·d) per layer
(MLA, lesson 05, made the cache small, not the scores cheap). DSA keeps the attention but lets a cheap scorer
choose, per query token, the k keys it may see (k = 2048 in GLM-5):

    I[t, s] = Σ_h  w[t, h] · ReLU( q[t, h] · k[s] · scale )     for every s visible to t (s ≤ t)
    S_t     = Top-k_s( I[t, s] )                                  the keys query t attends to

q [B, T, H_I, D_I] are index queries (GLM-5: 32 heads × 128, projected from MLA's q latent), k [B, L, D_I] ONE
index key per token shared by all heads, w [B, T, H_I] per-head weights of each query (from the hidden state).
This is not a window plus a few anchors: every earlier token gets a score, and the k best win, wherever they sit.
What makes it "lightning": few heads, a small D_I, one key per token, ReLU instead of softmax (no normalisation
across keys), and FP8 in DeepSeek's kernels (bf16 here).

Scaling constants (HF ``GlmMoeDsaIndexer``): ``scale`` = D_I^-½ inside the ReLU (the default here), and the mixer
multiplies w by H_I^-½ before calling (``weights_proj(x) · H_I^-½``); both are positive, so they only rescale I.

Visibility is the decoder's causal rule: query t sits at absolute position ``offset + t`` (offset = positions
already cached), key s < L is visible iff s ≤ offset + t and ``key_mask[b, s]`` (False = left padding), and a
query always sees its own position. Invisible entries are −inf.

* ``lightning_indexer_reference`` — the definition in plain torch (per-head scores [B, T, H, L] in fp32).
* ``lightning_indexer`` — the logits as models call them: the fused kernel where ``glmkit.backend`` resolves to
  "triton" (forward only), the reference otherwise and whenever a gradient is needed (training the indexer: at the
  sizes the course trains on, autograd through the reference; the kernel has no backward).
* ``indexer_topk`` — top-k indices [B, T, min(k, L)] int32, −1 where a query has fewer than k visible keys; the
  logits are made query chunk by query chunk so that [chunk, L] fp32 logits bound the memory (the causal prefix
  of a chunk only: later keys are never scored). Selection is ``torch.topk`` (see ``benchmarks/bench_dsa.py`` for
  its share of the layer time).
* ``lightning_indexer_at`` — I at given indices [B, T, k] (the sparse stage's indexer loss), differentiable.
* ``attention_target`` and ``indexer_kl_loss`` — the training signal (DeepSeek-V3.2 §2.1): the main attention
  summed over heads and L1-normalised, p[t, :], and KL(p ‖ softmax(I[t, :])) over all visible keys (dense warm-up)
  or over the selected set only (sparse stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # fp64: references only
LOGITS_CHUNK_BYTES = 1 << 30  # indexer_topk: fp32 logits of one query chunk stay under 1 GiB


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The torch paths compute in fp32 (fp64 when given fp64, for exact cross-checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check(q, k, w, offset, key_mask, scale, causal: bool = True) -> None:
    """Shapes, dtypes and devices (never values: that would cost a host sync)."""
    for name, t in (("q", q), ("k", k), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a float tensor (float32/16, bfloat16; float64 on the torch path), "
                f"got {getattr(t, 'dtype', type(t))}"
            )
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4 or 0 in q.shape:
        raise ValueError(f"q must be [B, T, H, D] with no empty dimension, got {tuple(q.shape)}")
    B, T, H, D = q.shape
    if k.dim() != 3 or k.shape[0] != B or k.shape[2] != D or k.shape[1] == 0:
        raise ValueError(f"k must be [B, L, D] = [{B}, L >= 1, {D}] (one index key per token), got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must share one dtype, got {q.dtype} and {k.dtype}")
    if tuple(w.shape) != (B, T, H):
        raise ValueError(f"w must be [B, T, H] = [{B}, {T}, {H}] (one weight per query and head), got {tuple(w.shape)}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be an int >= 0 (positions already cached), got {offset!r}")
    if causal and offset + T > k.shape[1]:
        raise ValueError(f"offset + T = {offset + T} queries need that many keys, k has L = {k.shape[1]}")
    if key_mask is not None and (
        not isinstance(key_mask, torch.Tensor)
        or key_mask.dtype != torch.bool
        or tuple(key_mask.shape) != (B, k.shape[1])
        or key_mask.device != q.device
    ):
        raise ValueError(
            f"key_mask must be a bool [B, L] = [{B}, {k.shape[1]}] tensor on {q.device} or None, got "
            f"{getattr(key_mask, 'dtype', type(key_mask).__name__)} {tuple(getattr(key_mask, 'shape', ()))}"
        )
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
        raise ValueError(f"scale must be a positive number or None (= D^-0.5), got {scale!r}")


def visibility(T: int, L: int, offset: int, key_mask: torch.Tensor | None, device) -> torch.Tensor:
    """[B or 1, T, L] bool: key s visible to query t (absolute position offset + t) — s ≤ offset + t and a real
    token, or s = offset + t."""
    pos = torch.arange(offset, offset + T, device=device)[:, None]
    s = torch.arange(L, device=device)[None, :]
    vis = (s <= pos)[None]
    if key_mask is not None:
        vis = vis & key_mask[:, None, :]
    return vis | (s == pos)[None]


def lightning_indexer_reference(q, k, w, offset: int = 0, key_mask=None, scale: float | None = None) -> torch.Tensor:
    """The index logits, written out: q [B, T, H, D], k [B, L, D], w [B, T, H] → I [B, T, L] fp32, −inf where
    key s is not visible to query t (see the module docstring). scale defaults to D^-0.5."""
    _check(q, k, w, offset, key_mask, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = torch.matmul(_acc(q), _acc(k).transpose(1, 2)[:, None]) * scale  # [B, T, H, L]
    logits = torch.matmul(_acc(w).to(scores.dtype)[:, :, None, :], F.relu(scores))[:, :, 0]  # Σ_h w_h ReLU(s_h)
    vis = visibility(q.shape[1], k.shape[1], offset, key_mask, q.device)
    return logits.masked_fill(~vis, float("-inf"))


def lightning_indexer(q, k, w, offset: int = 0, key_mask=None, scale: float | None = None) -> torch.Tensor:
    """``lightning_indexer_reference``'s logits [B, T, L] fp32 as the models call it: the fused Triton kernel where
    ``glmkit.backend`` resolves to "triton" and no gradient is needed, the reference (differentiable in q, k, w)
    otherwise; ``glmkit.backend.audit`` records which ran ("lightning_indexer")."""
    _check(q, k, w, offset, key_mask, scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, w))
    kernel_ok = backend.resolve(q) == "triton" and q.dtype != torch.float64
    path = "triton" if kernel_ok and not needs_grad else "torch"
    backend.record("lightning_indexer", path)
    if path == "torch":
        return lightning_indexer_reference(q, k, w, offset, key_mask, scale)
    from glmkit.kernels.lightning_indexer import indexer_logits

    return indexer_logits(q, k, w, q.shape[-1] ** -0.5 if scale is None else float(scale), offset, key_mask)


@torch.no_grad()
def indexer_topk(q, k, w, topk: int, offset: int = 0, key_mask=None, scale: float | None = None) -> torch.Tensor:
    """The keys each query attends to: idx [B, T, min(topk, L)] int32, the indices of the largest visible index
    logits of each query in no particular order, −1 in the slots a query cannot fill (it sees fewer than topk keys:
    early tokens of a prefill). Indices are distinct. Arguments as ``lightning_indexer``. Queries are scored in
    chunks of the causal prefix they can see, so the fp32 logits never exceed ``LOGITS_CHUNK_BYTES``.

    Ties (equal logits: a key every head scores ≤ 0 gets exactly 0) are broken by ``torch.topk``, which promises no
    order; with few index heads they are common and a cached decode step may then pick another of the tied keys
    than a prefill did. GLM-5's 32 heads make an all-negative key rare (the course presets use 8)."""
    _check(q, k, w, offset, key_mask, scale)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    B, T = q.shape[:2]
    L = k.shape[1]
    width = min(topk, L)
    chunk = max(64, LOGITS_CHUNK_BYTES // (4 * B * L))
    parts = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        Lc = min(L, offset + t1)  # keys later than the chunk's last query are invisible to all of it
        km = None if key_mask is None else key_mask[:, :Lc]
        logits = lightning_indexer(q[:, t0:t1], k[:, :Lc], w[:, t0:t1], offset + t0, km, scale)
        vals, idx = logits.topk(min(topk, Lc), dim=-1, sorted=False)
        idx = torch.where(vals == float("-inf"), -1, idx).to(torch.int32)
        parts.append(F.pad(idx, (0, width - idx.shape[-1]), value=-1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def lightning_indexer_at(q, k, w, idx: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """I at the given keys only: q [B, T, H, D], k [B, L, D], w [B, T, H], idx [B, T, N] int (−1 = none) →
    [B, T, N] fp32 (−inf at −1), differentiable in q, k, w. Torch (a gather of N keys per query): the sparse stage's
    indexer loss, which covers the selected set only."""
    _check(q, k, w, 0, None, scale, causal=False)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 3 or idx.shape[:2] != q.shape[:2] or idx.is_floating_point():
        raise ValueError(
            f"idx must be an integer [B, T, N] tensor with q's B, T, got {tuple(getattr(idx, 'shape', ()))}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    B, T, N = idx.shape
    rows = torch.arange(B, device=q.device)[:, None, None]
    k_sel = _acc(k[rows, idx.clamp_min(0).long()])  # [B, T, N, D]
    scores = F.relu(torch.einsum("bthd,btnd->bthn", _acc(q), k_sel) * scale)
    logits = torch.einsum("bth,bthn->btn", _acc(w).to(scores.dtype), scores)
    return logits.masked_fill(idx < 0, float("-inf"))


# ---- the training signal (DeepSeek-V3.2 §2.1) -----------------------------------------------------------------


@torch.no_grad()
def attention_target(q, kv, scale: float, visible: torch.Tensor | None = None, idx: torch.Tensor | None = None):
    """p[t, :], the main attention of query t summed over heads and L1-normalised: Σ_h softmax_h(t, :) / H.

    MQA form (MLA absorbed, every head scoring one shared latent row per key): q [B, T, H, D], kv [B, L, D]. Either
    ``visible`` [B or 1, T, L] bool (dense warm-up: p over every visible key → [B, T, L]) or ``idx`` [B, T, N] int
    with −1 = none (sparse stage: the softmax runs over the selected keys only → [B, T, N]). No gradient: p is the
    target, not a path into the main model."""
    if (visible is None) == (idx is None):
        raise ValueError("attention_target needs exactly one of visible (dense) or idx (sparse)")
    if idx is None:
        scores = torch.einsum("bthd,bld->bthl", _acc(q), _acc(kv)) * scale
        scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    else:
        rows = torch.arange(q.shape[0], device=q.device)[:, None, None]
        kv_sel = _acc(kv[rows, idx.clamp_min(0).long()])  # [B, T, N, D]
        scores = torch.einsum("bthd,btnd->bthn", _acc(q), kv_sel) * scale
        scores = scores.masked_fill((idx < 0)[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with nothing visible: all zeros
    return probs.sum(2) / q.shape[2]


def indexer_kl_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of KL(p ‖ softmax(I)) = Σ_s p_s (log p_s − log softmax(I)_s).

    logits [B, T, N] with −inf where a key is out of the row's set (invisible keys in the dense warm-up, slots −1 in
    the sparse stage: the softmax then runs over the same set p covers); target p [B, T, N], rows summing to 1 (or
    0: a row with nothing to learn contributes 0). The gradient reaches the logits only."""
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have one shape")
    inside = logits > float("-inf")
    log_q = torch.log_softmax(_acc(logits).masked_fill(~inside, -1e30), dim=-1)  # -1e30: no NaN for empty rows
    p = _acc(target) * inside
    log_p = torch.where(p > 0, p, 1.0).log()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
    return kl.mean()
