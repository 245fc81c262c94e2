"""glmkit.ops.lightning_indexer and its kernel (glmkit.kernels.lightning_indexer): DSA's index logits, top-k, losses.

(a) The reference against the equation written as loops (fp64), and the visibility rule (causal, left padding, a
query sees itself). (b) The fused logits kernel against the reference under the Triton interpreter (fp32, fp16) at
odd shapes, prefill and decode offsets, with and without a key mask, every output poisoned. (c) ``indexer_topk``: the
selected set is the set of the k largest visible logits (T below, at and above k; ragged rows; −1 exactly where a
query sees fewer than k keys); the query-chunked path equals one chunk. (d) The training signal: the target sums to
one, the KL loss is the textbook sum, it vanishes when the indexer matches the target, and its gradient reaches the
indexer's inputs only through the differentiable paths. (e) ``-m gpu``: bf16 natively at GLM-5's index dims.
"""

from __future__ import annotations

import pytest
import torch

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
import glmkit.ops.lightning_indexer as li
from glmkit import backend
from glmkit.ops.lightning_indexer import (
    attention_target,
    indexer_kl_loss,
    indexer_topk,
    lightning_indexer,
    lightning_indexer_at,
    lightning_indexer_reference,
    visibility,
)
from glmkit.testing import REL_TOL, assert_close

CUDA = torch.cuda.is_available()


def _inputs(B, T, L, H, D, dtype=torch.float32, device="cpu", padded=False):
    q = torch.randn(B, T, H, D, device=device).to(dtype)
    k = torch.randn(B, L, D, device=device).to(dtype)
    w = torch.randn(B, T, H, device=device)  # fp32, like HF's weights_proj
    key_mask = None
    if padded:  # left padding of a different length per row: a ragged batch
        pads = torch.arange(B, device=device) * 3 + 1
        key_mask = torch.arange(L, device=device)[None, :] >= pads[:, None]
    return q, k, w, key_mask


def _loop_logits(q, k, w, offset, key_mask, scale):
    """I[b, t, s] = Σ_h w[b, t, h] · max(0, scale · q[b, t, h]·k[b, s]) over visible s, else −inf, one by one."""
    B, T, H, _ = q.shape
    L = k.shape[1]
    out = torch.full((B, T, L), float("-inf"), dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            for s in range(L):
                pos = offset + t
                if s == pos or (s <= pos and (key_mask is None or key_mask[b, s])):
                    out[b, t, s] = sum(
                        float(w[b, t, h]) * max(0.0, scale * float(q[b, t, h] @ k[b, s])) for h in range(H)
                    )
    return out


# ---- (a) the reference ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset,padded", [(0, False), (4, True)])
def test_reference_is_the_equation(offset, padded):
    B, T, H, D = 2, 5, 3, 8
    q, k, w, km = _inputs(B, T, offset + T, H, D, torch.float64, padded=padded)
    ref = lightning_indexer_reference(q, k, w, offset, km, scale=0.3)
    loops = _loop_logits(q, k, w, offset, km, 0.3)
    assert torch.equal(torch.isinf(ref), torch.isinf(loops))
    fin = torch.isfinite(loops)
    assert_close("logits", loops[fin], ref[fin], tol=1e-12)


def test_default_scale_and_the_scale_is_outside_the_relu():
    """scale defaults to D^-0.5 (HF's softmax_scale); a positive scale only rescales I (ReLU(c·x) = c·ReLU(x))."""
    q, k, w, _ = _inputs(1, 6, 6, 2, 16, torch.float64)
    base = lightning_indexer_reference(q, k, w, scale=1.0)
    fin = torch.isfinite(base)
    assert_close("default", (base * 16**-0.5)[fin], lightning_indexer_reference(q, k, w)[fin], tol=1e-12)


def test_visibility_rule():
    km = torch.tensor([[False, True, True, True, True]])
    vis = visibility(2, 5, 3, km, "cpu")[0]
    # query 0 at position 3 sees keys 1..3 (key 0 is padding), query 1 at position 4 sees 1..4
    assert vis.tolist() == [[False, True, True, True, False], [False, True, True, True, True]]
    # a padding query sees at least itself
    assert visibility(1, 1, 0, torch.tensor([[False]]), "cpu")[0, 0, 0]


def test_checks_name_the_problem():
    q, k, w, _ = _inputs(1, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="w must be"):
        lightning_indexer(q, k, w[..., :1])
    with pytest.raises(ValueError, match="offset"):
        lightning_indexer(q, k, w, offset=1)  # 1 + 4 queries need 5 keys
    with pytest.raises(TypeError, match="share one dtype"):
        lightning_indexer(q, k.double(), w)
    with pytest.raises(ValueError, match="key_mask"):
        lightning_indexer(q, k, w, key_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="topk"):
        indexer_topk(q, k, w, 0)


# ---- (b) the fused kernel -------------------------------------------------------------------------------------


def _check_kernel(B, T, L, H, D, offset, padded, dtype, device):
    q, k, w, km = _inputs(B, T, L, H, D, dtype, device, padded)
    ref = lightning_indexer_reference(q.float(), k.float(), w, offset, km)
    with backend.use_backend("triton"), backend.audit() as a:
        out = lightning_indexer(q, k, w, offset, km)
    assert a.paths("lightning_indexer") == {"triton"}
    assert out.dtype == torch.float32 and out.shape == (B, T, L)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)), "the −inf pattern (visibility) differs"
    fin = torch.isfinite(ref)
    assert_close("logits", ref[fin], out[fin], tol=REL_TOL[dtype] if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize(
    "B,T,L,H,D,offset,padded",
    [
        (2, 37, 37, 3, 24, 0, False),  # prefill, D not a power of two, T not a multiple of the tile
        (2, 21, 40, 2, 16, 19, True),  # a chunk after 19 cached positions, ragged left padding
        (3, 1, 45, 4, 32, 44, True),  # decode: one query against the cache
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(B, T, L, H, D, offset, padded, dtype, poison):
    _check_kernel(B, T, L, H, D, offset, padded, dtype, "cpu")


def test_gradient_takes_the_torch_path():
    """The kernel has no backward: with a gradient needed the dispatch runs the reference, and says so."""
    q, k, w, _ = _inputs(1, 9, 9, 2, 16)
    w.requires_grad_()
    with backend.use_backend("triton"), backend.audit() as a:
        lightning_indexer(q, k, w).masked_fill(torch.eye(9, dtype=torch.bool), 0).clamp(-50, 50).sum().backward()
    assert a.paths("lightning_indexer") == {"torch"}
    assert w.grad is not None and torch.isfinite(w.grad).all()


# ---- (c) top-k ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [4, 17, 30])  # below T, inside, at/above (T = 17 + cached 6 = 23 keys)
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_topk_selects_the_largest_visible(topk, path):
    """The top-k property, tie-proof (ReLU makes exact zeros): min(topk, visible) distinct visible keys, none of
    them scoring below a visible key left out; −1 in the remaining slots."""
    B, T, offset, H, D = 2, 17, 6, 2, 16
    q, k, w, km = _inputs(B, T, offset + T, H, D, padded=True)
    with backend.use_backend(path):
        idx = indexer_topk(q, k, w, topk, offset, km)
    L = offset + T
    assert idx.dtype == torch.int32 and idx.shape == (B, T, min(topk, L))
    logits = lightning_indexer_reference(q, k, w, offset, km)
    for row, lg in zip(idx.reshape(-1, idx.shape[-1]), logits.reshape(-1, L)):
        got = [int(i) for i in row if i >= 0]
        visible = torch.isfinite(lg)
        assert len(got) == len(set(got)) == min(topk, int(visible.sum())), "distinct, as many as can be filled"
        assert visible[got].all(), "only visible keys"
        left_out = visible.clone()
        left_out[got] = False
        if left_out.any():
            assert lg[got].min() >= lg[left_out].max()


def test_topk_with_t_at_most_k_selects_every_causal_key():
    q, k, w, _ = _inputs(1, 12, 12, 2, 16)
    idx = indexer_topk(q, k, w, 12)
    chosen = torch.zeros(1, 12, 13, dtype=torch.bool).scatter_(-1, torch.where(idx < 0, 12, idx).long(), True)
    assert torch.equal(chosen[..., :12], torch.ones(12, 12, dtype=torch.bool).tril()[None])


def test_topk_in_query_chunks_equals_one_chunk(monkeypatch):
    q, k, w, km = _inputs(2, 150, 155, 2, 16, padded=True)
    whole = indexer_topk(q, k, w, 20, 5, km)
    monkeypatch.setattr(li, "LOGITS_CHUNK_BYTES", 4 * 2 * 155 * 64)  # chunks of 64 queries
    parts = indexer_topk(q, k, w, 20, 5, km)

    logits = lightning_indexer_reference(q, k, w, 5, km)

    def chosen_values(x):  # the selected logits, sorted: equal sets up to ties (ReLU's exact zeros)
        return torch.where(x < 0, float("-inf"), logits.gather(-1, x.clamp_min(0).long())).sort(-1).values

    assert torch.equal(chosen_values(whole), chosen_values(parts))


# ---- (d) the training signal ----------------------------------------------------------------------------------


def test_indexer_at_gathers_the_logits():
    q, k, w, _ = _inputs(2, 7, 7, 3, 16, torch.float64)
    idx = indexer_topk(q, k, w, 4)
    full = lightning_indexer_reference(q, k, w)
    at = lightning_indexer_at(q, k, w, idx)
    want = torch.where(idx < 0, float("-inf"), full.gather(-1, idx.clamp_min(0).long()))
    assert torch.equal(torch.isinf(at), torch.isinf(want))
    assert_close("at", want[torch.isfinite(want)], at[torch.isfinite(at)], tol=1e-12)


def test_attention_target_dense_and_sparse():
    B, T, H, D = 2, 6, 3, 8
    q, kv = torch.randn(B, T, H, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    vis = visibility(T, T, 0, None, "cpu")
    p = attention_target(q, kv, 0.4, visible=vis)
    assert_close("rows sum to 1", torch.ones(B, T, dtype=torch.float64), p.sum(-1), tol=1e-12)
    assert (p.masked_select(~vis.expand_as(p)) == 0).all()
    # by hand: the mean over heads of each head's causal softmax
    scores = torch.einsum("bthd,bld->bhtl", q, kv) * 0.4
    want = scores.masked_fill(~vis[:, None], float("-inf")).softmax(-1).mean(1)
    assert_close("dense", want, p, tol=1e-12)
    # sparse: over a chosen set only, renormalised, −1 slots get nothing
    idx = torch.tensor([[0, -1, 0], [1, 0, -1], [2, 1, -1], [3, 2, 0], [4, 1, 3], [5, 4, 2]])[None].expand(B, -1, -1)
    idx = torch.where((torch.arange(3) == 2) & (torch.arange(T)[:, None] == 0), -1, idx).contiguous()
    ps = attention_target(q, kv, 0.4, idx=idx)
    assert (ps[idx < 0] == 0).all()
    assert_close("sparse rows sum to 1", torch.ones(B, T, dtype=torch.float64), ps.sum(-1), tol=1e-12)


def test_kl_loss_is_the_textbook_sum_and_vanishes_at_the_target():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    logits[..., 5:] = float("-inf")  # outside every row's set
    p = torch.rand(2, 5, 7, dtype=torch.float64).masked_fill(torch.isinf(logits), 0)
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(logits, -1)
    want = (p[..., :5] * (p[..., :5].log() - q[..., :5].log())).sum(-1).mean()
    assert_close("kl", want, indexer_kl_loss(logits, p), tol=1e-12)
    assert indexer_kl_loss(logits, q).abs() < 1e-12
    empty = torch.full((1, 1, 4), float("-inf"), dtype=torch.float64)
    assert indexer_kl_loss(empty, torch.zeros(1, 1, 4, dtype=torch.float64)) == 0


def test_kl_gradient_trains_the_indexer_towards_the_target():
    """A few steps of gradient descent on the indexer's weights lower the loss; the target gets no gradient."""
    q, k, w, _ = _inputs(1, 10, 10, 4, 16)
    kv = torch.randn(1, 10, 16)
    p = attention_target(torch.randn(1, 10, 2, 16), kv, 0.25, visible=visibility(10, 10, 0, None, "cpu"))
    assert not p.requires_grad
    w = w.clone().requires_grad_()
    losses = []
    for _ in range(30):
        loss = indexer_kl_loss(lightning_indexer(q, k, w), p)
        (g,) = torch.autograd.grad(loss, w)
        w = (w - 0.5 * g).detach().requires_grad_()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


# ---- (e) on the GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,T,L,offset,padded", [(2, 1000, 1000, 0, False), (4, 1, 3001, 3000, True)])
def test_kernel_gpu(B, T, L, offset, padded, dtype, poison):
    _check_kernel(B, T, L, 32, 128, offset, padded, dtype, "cuda")


@pytest.mark.gpu
def test_topk_gpu():
    """bf16 q/k: the kernel's fp32 logits and the reference's differ by rounding of the dot order, so the sets
    are compared by recall (a swapped near-tie at the boundary is allowed, not more)."""
    q, k, w, km = _inputs(2, 700, 1200, 32, 128, torch.bfloat16, "cuda", padded=True)
    idx = indexer_topk(q, k, w, 256, 500, km)
    with backend.use_backend("torch"):
        want = indexer_topk(q, k, w, 256, 500, km)
    got = torch.zeros(2, 700, 1201, device="cuda").scatter_(-1, torch.where(idx < 0, 1200, idx).long(), 1)[..., :1200]
    exp = torch.zeros_like(got).scatter_(-1, torch.where(want < 0, 1200, want).long(), 1)[..., :1200]
    recall = float((got * exp).sum() / exp.sum())
    assert recall > 0.995, recall
