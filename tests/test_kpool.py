"""KPool (glmkit.kpool), GLM-5.3-Flash's pooled DSA indexer: the selection against a loop over queries and pools
written from the definition, and against transformers' ``Glm5NextTextIndexer`` (the oracle) with left padding;
T <= index_topk selects every visible key; the tail; chunked scoring; the pooled training target against its
definition and the recall."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glmkit.kpool as kpool
from glmkit.kpool import kpool_topk, pool_layout, pooled_attention_target
from glmkit.ops.lightning_indexer import attention_target, visibility


def _inputs(B=2, T=23, H=6, D=8, K=4, seed=0, L=None):
    g = torch.Generator().manual_seed(seed)
    L = L or T
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, L, D, generator=g)
    gate = torch.randn(B, L, D, generator=g)
    w = torch.randn(B, T, H, generator=g)
    ape = torch.randn(K, D, generator=g)
    return q, k, gate, w, ape


def _sets(idx):
    return [[set(row[row >= 0].tolist()) for row in rows] for rows in idx]


def loop_reference(q, k, gate, w, ape, topk, offset=0, first=None, tail=True):
    """The selection for each (row b, query t), one at a time: pools of K tokens from the row's first real token,
    each pool's key the per-channel softmax(gate + ape)-weighted mean of its keys, scored Σ_h w·ReLU(q·k̄/√D) when
    complete and ending at or before the query; the top topk/K of those, their tokens, plus the tail."""
    B, T, H, D = q.shape
    L, K = k.shape[1], ape.shape[0]
    out = []
    for b in range(B):
        f = 0 if first is None else first[b]
        pools = []
        p = 0
        while f + (p + 1) * K - 1 < L:
            toks = list(range(f + p * K, f + (p + 1) * K))
            wts = torch.softmax(gate[b, toks] + ape, dim=0)  # [K, D], over the pool's tokens per channel
            pools.append((toks, (wts * k[b, toks]).sum(0)))
            p += 1
        rows = []
        for t in range(T):
            a = offset + t
            cand = [(toks, key) for toks, key in pools if toks[-1] <= a]
            scores = [float((w[b, t] * F.relu(q[b, t] @ key / D**0.5)).sum()) for _, key in cand]
            order = sorted(range(len(cand)), key=lambda i: -scores[i])[: topk // K]
            chosen = {s for i in order for s in cand[i][0]}
            if tail:
                count = max(a - f + 1, 0)
                chosen |= set(range(f + count - count % K, f + count))
            rows.append(chosen)
        out.append(rows)
    return out


@pytest.mark.parametrize("tail", [True, False])
def test_selection_matches_the_definition(tail):
    q, k, gate, w, ape = _inputs()
    idx, chosen = kpool_topk(q, k, gate, w, ape, topk=8, tail=tail)
    assert idx.dtype == torch.int32 and idx.shape == (2, 23, 8 + 3 * tail)
    assert _sets(idx) == loop_reference(q, k, gate, w, ape, 8, tail=tail)
    for rows in idx:  # distinct entries: sparse_mla counts a repeat twice
        for row in rows:
            real = row[row >= 0]
            assert len(set(real.tolist())) == len(real)
    assert chosen.shape == (2, 23, 6) and int(chosen.sum(-1).max()) == 2


def test_offset_and_left_padding_match_the_definition():
    """Queries against a longer cache (offset) with rows whose real keys start later (left padding): the pools start
    at each row's first real token."""
    q, k, gate, w, ape = _inputs(T=5, L=26)
    mask = torch.ones(2, 26, dtype=torch.bool)
    mask[1, :3] = False
    idx, _ = kpool_topk(q, k, gate, w, ape, topk=12, offset=21, key_mask=mask)
    assert _sets(idx) == loop_reference(q, k, gate, w, ape, 12, offset=21, first=[0, 3])


def test_t_at_most_k_selects_every_visible_key():
    q, k, gate, w, ape = _inputs(T=16)
    idx, _ = kpool_topk(q, k, gate, w, ape, topk=16)
    assert _sets(idx) == [[set(range(t + 1)) for t in range(16)]] * 2


def test_chunked_scoring_gives_the_same_selection(monkeypatch):
    q, k, gate, w, ape = _inputs(T=40)
    whole, pools = kpool_topk(q, k, gate, w, ape, topk=8)
    monkeypatch.setattr(kpool, "LOGITS_CHUNK_BYTES", 1)  # 16 queries per chunk
    chunked, pools_c = kpool_topk(q, k, gate, w, ape, topk=8)
    assert torch.equal(whole, chunked) and torch.equal(pools, pools_c)


def test_matches_transformers_indexer():
    """transformers' Glm5NextTextIndexer (random weights, a left-padded batch, T = 29 > k = 8): the same token sets
    for every real query."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextIndexer

    cfg = transformers.Glm5NextTextConfig(
        hidden_size=48, q_lora_rank=24, index_n_heads=16, index_head_dim=16, index_topk=8, index_kpool=4
    )
    torch.manual_seed(0)
    ix = Glm5NextTextIndexer(cfg, 3).eval()
    with torch.no_grad():
        for p in ix.parameters():
            p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.3)
    x, c_q = torch.randn(2, 29, 48), torch.randn(2, 29, 24)
    mask = torch.ones(2, 29, dtype=torch.bool)
    mask[0, :5] = False
    ref = ix(x, c_q, mask, None)
    with torch.no_grad():
        q = ix.wq_b(c_q).view(2, 29, 16, 16)
        k = ix.k_norm(ix.wk(x))
        w = ix.weights_proj(x) * 16**-0.5
        gate = F.linear(x, ix.index_kpool_compress_gate)
        ours, _ = kpool_topk(q, k, gate, w, ix.index_kpool_compress_ape, 8, key_mask=mask)
    want, got = _sets(ref), _sets(ours)
    for b in range(2):
        for t in range(29):
            if mask[b, t]:
                assert want[b][t] == got[b][t], (b, t)


def test_pooled_target_is_the_attention_summed_over_pools():
    """Dense stage: p (the attention over the visible keys, summed over heads, L1-normalised) summed over each
    candidate pool's tokens and renormalised over those pools; sparse stage: the attention over an allowed set.
    The recall counts the true top-k keys the allowed set holds, over the queries that see more than k."""
    g = torch.Generator().manual_seed(1)
    B, T, H, D, K = 2, 13, 3, 10, 4
    q, kv = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, D, generator=g)
    vis = visibility(T, T, 0, None, "cpu").expand(B, -1, -1)
    tokens, complete, ends = pool_layout(torch.zeros(B, dtype=torch.long), T, K)
    cand = kpool.pool_candidates(ends, complete, 0, T)
    target, recall = pooled_attention_target(q, kv, 0.3, vis, tokens, pools=cand, recall_k=T)
    p = attention_target(q, kv, 0.3, visible=vis)
    want = torch.stack([p[..., tokens[0, j]].sum(-1) for j in range(tokens.shape[1]) if complete[0, j]], -1)
    want = want * cand[..., : want.shape[-1]]
    want = want / want.sum(-1, keepdim=True).clamp_min(1e-30)
    assert torch.allclose(target[..., : want.shape[-1]], want, atol=1e-6) and not target[..., want.shape[-1] :].any()
    assert torch.allclose(target[:, K - 1 :].sum(-1), torch.ones(B, T - K + 1))  # rows with a complete pool
    assert float(recall) == 1.0  # no query sees more than T keys
    allowed = torch.rand(B, T, T, generator=g) > 0.5
    _, recall = pooled_attention_target(q, kv, 0.3, vis, tokens, allowed=allowed, recall_k=2)
    top = p.masked_fill(~vis, -1).topk(2, dim=-1).indices
    hit = (vis & allowed).gather(-1, top).float().mean(-1)[:, 2:]  # queries 2.. see more than 2 keys
    assert abs(float(recall) - float(hit.mean())) < 1e-6
