"""KPool: GLM-5.3-Flash's DSA indexer (HF ``glm5_next``, ``Glm5NextTextIndexer``) scores keys in pooled groups of
``index_kpool`` tokens instead of one by one. The ``"dsa"`` mixer uses it when ``index_kpool`` is set. Facts:
shared/reference/glm-lineage.md §5.3 and §5.7 (GLM-5.3-Flash: pools of 16, top-2048 tokens = 128 pools).

Its predecessor is GLM-5's lightning indexer (``glmkit.ops.lightning_indexer``): every earlier token s gets a score
I[t, s] = Σ_h w[t, h] · ReLU(q[t, h] · k[s] · D^-½), and the k best tokens win. KPool keeps the queries, the weights
and the per-token keys, and changes what is scored:

    pools        p = 0, 1, …: tokens first + p·K … first + p·K + K − 1  (K = index_kpool; ``first`` = the row's first
                 real token, so left padding does not shift the grouping); complete when its last token exists
    pool key     k̄[p, c] = Σ_j softmax_j(gate[s_j, c] + ape[j, c]) · k[s_j, c]     per channel c, over the K tokens
                 gate = x · index_kpool_compress_gateᵀ [B, L, D] (cached beside k), ape [K, D] a learned offset per
                 slot: a learned weighted mean of the pool's keys, channel by channel
    pool score   I[t, p] = Σ_h w[t, h] · ReLU(q[t, h] · k̄[p] · D^-½)           for complete pools that end ≤ t
    selection    the top index_topk / K pools, expanded to their K tokens each; plus the tail (the tokens after
                 the last complete pool up to t, at most K − 1 of them) when ``index_kpool_always_select_tail``:
                 idx [B, T, index_topk + K − 1], −1 in unused slots

So the indexer scores L / K pool keys instead of L token keys (16× fewer), the selection is made of whole blocks of
consecutive tokens, and the newest tokens (the incomplete pool, which has no pool key yet) are always attended. With
T ≤ index_topk every complete pool is selected and, with the tail, every earlier token: DSA is then dense MLA.
Without the tail the newest up to K − 1 tokens are never seen (a query whose first pool is incomplete sees nothing;
the sparse attention then outputs 0 for it, as transformers' SDPA path does; its eager path averages every key).

Assumption, as transformers makes it: the real keys of a row are contiguous after its first real one (left
padding; glmkit's ``Cache`` writes them so). The indexer's scores have no gradient in transformers (``no_grad``);
training the pool keys here is ``pooled_attention_target`` + ``glmkit.ops.lightning_indexer.indexer_kl_loss`` over
pools (the DSA mixer's indexer loss). Everything here is torch: the pool logits are [T, L/K] per head, small next to
the attention (``benchmarks/bench_capstone.py`` shows their share); the attention over the selected tokens is
``glmkit.ops.sparse_mla``, whose kernels take any index set.

Shapes: B batch, T queries (at absolute positions offset … offset + T − 1), L keys, H index heads of D dims, K pool
size, P = ⌈L / K⌉ pools.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmkit.ops.lightning_indexer import attention_target

LOGITS_CHUNK_BYTES = 1 << 28  # pool logits / attention targets of one query chunk stay under 256 MiB (fp32)


def first_real(key_mask: torch.Tensor | None, B: int, L: int, device) -> torch.Tensor:
    """[B] long: the position of each row's first real key (L when it has none; 0 without a mask)."""
    if key_mask is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    return torch.where(key_mask.any(-1), key_mask.long().argmax(-1), L)


def pool_layout(first: torch.Tensor, L: int, pool: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pools of keys [0, L): tokens [B, P, K] long (−1 past L), complete [B, P] bool (all K tokens exist),
    ends [B, P] long (the last token's position)."""
    P = -(-L // pool)
    offs = torch.arange(P * pool, device=first.device).view(1, P, pool)
    tokens = first[:, None, None] + offs
    inside = tokens < L
    return tokens.masked_fill(~inside, -1), inside.all(-1), tokens[..., -1]


def pool_keys(k: torch.Tensor, gate: torch.Tensor, ape: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """k̄ [B, P, D] fp32: per channel, the softmax(gate + ape)-weighted mean of each pool's keys (k, gate [B, L, D];
    ape [K, D]; tokens from ``pool_layout``). Missing tokens take no weight; a pool with none gives 0."""
    B, P, K = tokens.shape
    D = k.shape[-1]
    at = tokens.clamp_min(0).view(B, P * K, 1).expand(-1, -1, D)
    keys = k.float().gather(1, at).view(B, P, K, D)
    logits = (gate.float().gather(1, at).view(B, P, K, D) + ape.float()).masked_fill((tokens < 0)[..., None], -1e30)
    weights = torch.softmax(logits, dim=2) * (tokens >= 0)[..., None]  # an empty pool: all weights 0
    return (weights * keys).sum(dim=2)


def pool_logits(q: torch.Tensor, keys: torch.Tensor, w: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """I [B, T, P] fp32 = Σ_h w[t, h] · ReLU(q[t, h] · k̄[p] · scale) (q [B, T, H, D], k̄ [B, P, D], w [B, T, H]);
    no mask. scale defaults to D^-½. Differentiable."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = F.relu(torch.einsum("bthd,bpd->bthp", q.float(), keys.float()) * scale)
    return torch.einsum("bth,bthp->btp", w.float(), scores)


def pool_candidates(ends: torch.Tensor, complete: torch.Tensor, offset: int, T: int) -> torch.Tensor:
    """[B, T, P] bool: pool p may be selected by query t (absolute position offset + t) — complete and ending at or
    before the query."""
    pos = torch.arange(offset, offset + T, device=ends.device)
    return complete[:, None, :] & (ends[:, None, :] <= pos[None, :, None])


def tail_indices(first: torch.Tensor, offset: int, T: int, pool: int) -> torch.Tensor:
    """[B, T, K − 1] long: the tokens after query t's last complete pool, up to t (−1 in the unused slots)."""
    pos = torch.arange(offset, offset + T, device=first.device)[None, :]
    count = (pos - first[:, None] + 1).clamp_min(0)  # real keys visible to the query
    n_tail = count % pool
    j = torch.arange(pool - 1, device=first.device)
    idx = (first[:, None] + count - n_tail)[..., None] + j
    return idx.masked_fill(j >= n_tail[..., None], -1)


def _chunk(B: int, per_query: int) -> int:
    return max(16, LOGITS_CHUNK_BYTES // max(1, 4 * B * per_query))


@torch.no_grad()
def kpool_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    gate: torch.Tensor,
    w: torch.Tensor,
    ape: torch.Tensor,
    topk: int,
    offset: int = 0,
    key_mask: torch.Tensor | None = None,
    tail: bool = True,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys each query attends to, KPool's way (module docstring): q [B, T, H, D], k and gate [B, L, D], w
    [B, T, H], ape [K, D]; key_mask [B, L] (False = left padding) or None. Returns idx [B, T, n·K + (K − 1 if tail)]
    int32 (n = min(topk / K, P); −1 = unused slot; entries distinct) and the chosen pools [B, T, P] bool. Queries
    are scored in chunks so the fp32 logits stay under ``LOGITS_CHUNK_BYTES``."""
    B, T, H, _ = q.shape
    L, K = k.shape[1], ape.shape[0]
    first = first_real(key_mask, B, L, q.device)
    tokens, complete, ends = pool_layout(first, L, K)
    keys = pool_keys(k, gate, ape, tokens)
    P = tokens.shape[1]
    n = min(topk // K, P)
    rows = torch.arange(B, device=q.device)[:, None, None]
    parts, chosen = [], []
    step = _chunk(B, H * P)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        cand = pool_candidates(ends, complete, offset + t0, t1 - t0)
        logits = pool_logits(q[:, t0:t1], keys, w[:, t0:t1], scale).masked_fill(~cand, float("-inf"))
        pid = logits.topk(n, dim=-1).indices  # [B, tc, n]
        ok = cand.gather(-1, pid)  # fewer candidates than n: the rest are not pools the query may see
        sel = tokens[rows, pid].masked_fill(~ok[..., None], -1).flatten(-2)  # [B, tc, n·K]
        if tail:
            sel = torch.cat((sel, tail_indices(first, offset + t0, t1 - t0, K)), dim=-1)
        parts.append(sel.to(torch.int32))
        chosen.append(torch.zeros_like(cand).scatter_(-1, pid, ok))
    if len(parts) == 1:
        return parts[0], chosen[0]
    return torch.cat(parts, dim=1), torch.cat(chosen, dim=1)


@torch.no_grad()
def pooled_attention_target(
    q: torch.Tensor,
    kv: torch.Tensor,
    scale: float,
    visible: torch.Tensor,
    tokens: torch.Tensor,
    allowed: torch.Tensor | None = None,
    pools: torch.Tensor | None = None,
    recall_k: int | None = None,
    selected: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The indexer's training signal over pools: the main attention (MQA form: q [B, T, H, D] against the shared rows
    kv [B, L, D]), summed over heads and L1-normalised (``attention_target``), summed over each pool's tokens.

    visible [B or 1, T, L]: the keys each query sees. ``allowed`` [B, T, L] (the sparse stage: the selected tokens)
    restricts the softmax to a set; ``pools`` [B, T, P] bool keeps the target on those pools only (renormalised over
    them; a row with no mass there is 0). Returns (target [B, T, P], recall or None): with ``recall_k``, the share of
    the true top-``recall_k`` keys (by the attention over all visible keys) that ``selected`` [B, T, L] (default:
    ``allowed``) holds, over the queries that see more than recall_k keys (1 when none does), as
    ``glmkit.mixers.dsa.topk_recall`` defines it."""
    B, T, H, _ = q.shape
    L = kv.shape[1]
    at = tokens.clamp_min(0).flatten(1)  # [B, P·K]
    Pn, K = tokens.shape[1:]
    targets, hits, rows = [], q.new_zeros((), dtype=torch.float32), q.new_zeros((), dtype=torch.float32)
    step = _chunk(B, H * L)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        vis = visible[:, t0:t1].expand(B, -1, -1)
        sel = vis if allowed is None else vis & allowed[:, t0:t1]
        p = attention_target(q[:, t0:t1], kv, scale, visible=sel)  # [B, tc, L]
        pooled = p.gather(-1, at[:, None, :].expand(-1, t1 - t0, -1)).view(B, t1 - t0, Pn, K)
        pooled = (pooled * (tokens >= 0)[:, None]).sum(-1)  # [B, tc, P]
        if pools is not None:
            pooled = pooled * pools[:, t0:t1]
            pooled = pooled / pooled.sum(-1, keepdim=True).clamp_min(1e-30)
        targets.append(pooled)
        if recall_k is not None:
            dense = p if allowed is None else attention_target(q[:, t0:t1], kv, scale, visible=vis)
            top = dense.masked_fill(~vis, -1.0).topk(min(recall_k, L), dim=-1).indices
            chosen = sel if selected is None else vis & selected[:, t0:t1]
            hit = chosen.gather(-1, top).float().mean(-1)  # [B, tc]
            many = (vis.sum(-1) > recall_k).float()
            hits, rows = hits + (hit * many).sum(), rows + many.sum()
    recall = None
    if recall_k is not None:
        recall = torch.where(rows > 0, hits / rows.clamp_min(1.0), torch.ones_like(rows))
    return torch.cat(targets, dim=1), recall
