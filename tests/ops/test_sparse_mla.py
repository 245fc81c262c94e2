"""glmkit.ops.sparse_mla and its kernels (glmkit.kernels.sparse_mla): MLA attention over per-token index sets.

(a) The three paths agree: the masked dense reference, the gather path (fp64), and the Triton kernels under the
interpreter (fp32, fp16) — forward, backward (dq_nope, dq_rope, dc_kv, dk_rope) and the split-key decode — with
−1 padding, ragged rows (a different number of valid slots per token), a token with no valid slot (o = 0), T below,
at and above k, every output allocated NaN-poisoned. (b) With T ≤ k the indexer selects every causal key and sparse
MLA equals dense causal MLA attention (an MQA-mode reference written in this file). (c) ``-m gpu``: bf16 natively at
GLM-5's dims (64 heads, R = 512, DR = 64, k = 2048 slots).
"""

from __future__ import annotations

import pytest
import torch

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend
from glmkit.ops.lightning_indexer import indexer_topk
from glmkit.ops.sparse_mla import sparse_mla, sparse_mla_decode, sparse_mla_gather, sparse_mla_reference
from glmkit.testing import REL_TOL, assert_close

CUDA = torch.cuda.is_available()


def _inputs(B, T, L, H, R, DR, dtype=torch.float32, device="cpu"):
    qn = torch.randn(B, T, H, R, device=device).to(dtype)
    qr = torch.randn(B, T, H, DR, device=device).to(dtype)
    c = torch.randn(B, L, R, device=device).to(dtype)
    kr = torch.randn(B, L, DR, device=device).to(dtype)
    return qn, qr, c, kr


def _index_sets(B, T, L, N, device="cpu", ragged=True, empty_row=True):
    """Distinct random key rows per token; with ``ragged`` each token keeps a random number of its N slots and
    the rest are −1 scattered among them; with ``empty_row`` token 0 of sample 0 has no valid slot at all."""
    idx = torch.stack([torch.stack([torch.randperm(L, device=device)[:N] for _ in range(T)]) for _ in range(B)])
    if ragged:
        keep = torch.randint(1, N + 1, (B, T, 1), device=device)
        order = torch.rand(B, T, N, device=device).argsort(-1)  # which slots stay: a random subset of that size
        idx = torch.where(order < keep, idx, -1)
    if empty_row:
        idx[0, 0] = -1
    return idx.to(torch.int32)


SCALE = 0.125  # MLA's 1/sqrt(qk_head_dim), e.g. 64-dim heads


# ---- (a) three paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T,L,N", [(7, 9, 9), (23, 40, 12), (5, 60, 33)])
def test_gather_matches_masked_reference(T, L, N):
    ins = [t.double() for t in _inputs(2, T, L, 3, 16, 8)]
    idx = _index_sets(2, T, L, min(N, L))
    ref = sparse_mla_reference(*ins, idx, SCALE)
    assert_close("gather", ref, sparse_mla_gather(*ins, idx, SCALE), tol=1e-12)
    assert (ref[0, 0] == 0).all(), "a token with no valid slot attends to nothing"


def test_reference_is_attention_over_the_listed_rows():
    """One token, written out: softmax over the listed rows' scores, weighted sum of their latents."""
    qn, qr, c, kr = [t.double() for t in _inputs(1, 1, 10, 2, 8, 4)]
    rows = [7, 2, 5]
    idx = torch.tensor([[[7, -1, 2, 5, -1]]], dtype=torch.int32)
    s = (torch.einsum("hr,nr->hn", qn[0, 0], c[0, rows]) + torch.einsum("hr,nr->hn", qr[0, 0], kr[0, rows])) * SCALE
    want = torch.softmax(s, -1) @ c[0, rows]
    assert_close("o", want, sparse_mla_reference(qn, qr, c, kr, idx, SCALE)[0, 0], tol=1e-12)


def _check_forward(B, T, L, H, R, DR, N, dtype, device, decode=False):
    ins = _inputs(B, T, L, H, R, DR, dtype, device)
    idx = _index_sets(B, T, L, N, device)
    ref = sparse_mla_reference(*[t.float() for t in ins], idx, SCALE)
    op = sparse_mla_decode if decode else sparse_mla
    with backend.use_backend("triton"), backend.audit() as a:
        out = op(*ins, idx, SCALE)
    assert a.paths("sparse_mla_decode" if decode else "sparse_mla") == {"triton"}
    assert out.dtype == dtype and out.shape == (B, T, H, R)
    assert_close("o", ref, out, tol=REL_TOL[dtype])
    assert (out[0, 0] == 0).all()


@pytest.mark.parametrize(
    "B,T,L,H,R,DR,N",
    [
        (2, 5, 30, 3, 32, 16, 8),  # T below k
        (1, 13, 13, 4, 24, 8, 13),  # T = k = L; R, DR not powers of two
        (2, 9, 50, 2, 16, 16, 37),  # k above T, several key blocks per token
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_kernel(B, T, L, H, R, DR, N, dtype, poison):
    _check_forward(B, T, L, H, R, DR, N, dtype, "cpu")


@pytest.mark.parametrize("B,T,L,N", [(3, 1, 70, 50), (2, 2, 40, 17)])
def test_decode_kernel_splits_and_combines(B, T, L, N, poison):
    """Decode: under the interpreter the slots are split in ≥ 2 ranges per token (an imaginary 2-SM device), so
    partial outputs, empty ranges (ragged rows) and the combine are all exercised."""
    _check_forward(B, T, L, 3, 32, 16, N, torch.float32, "cpu", decode=True)


def _check_backward(B, T, L, H, R, DR, N, dtype, device, tol_scale=2.0):
    ins = _inputs(B, T, L, H, R, DR, dtype, device)
    idx = _index_sets(B, T, L, N, device)
    ker = [t.clone().requires_grad_() for t in ins]
    ref = [t.detach().float().requires_grad_() for t in ins]
    with backend.use_backend("triton"):
        out = sparse_mla(*ker, idx, SCALE)
    o_ref = sparse_mla_reference(*ref, idx, SCALE)
    do = torch.randn_like(o_ref)
    out.backward(do.to(dtype))
    o_ref.backward(do)
    tol = REL_TOL[dtype] * (1 if dtype == torch.float32 else tol_scale)
    for name, r, k in zip(("dq_nope", "dq_rope", "dc_kv", "dk_rope"), ref, ker):
        assert k.grad.dtype == dtype
        assert_close(name, r.grad, k.grad, tol=tol)


@pytest.mark.parametrize("B,T,L,H,R,DR,N", [(2, 6, 20, 3, 32, 16, 9), (1, 11, 11, 2, 24, 8, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_kernel(B, T, L, H, R, DR, N, dtype, poison):
    _check_backward(B, T, L, H, R, DR, N, dtype, "cpu")


def test_torch_path_gradients_match_reference():
    ins = _inputs(2, 6, 15, 2, 16, 8)
    idx = _index_sets(2, 6, 15, 7)
    a = [t.clone().requires_grad_() for t in ins]
    b = [t.clone().requires_grad_() for t in ins]
    with backend.use_backend("torch"), backend.audit() as au:
        o1 = sparse_mla(*a, idx, SCALE)
    assert au.paths("sparse_mla") == {"torch"}
    o2 = sparse_mla_reference(*b, idx, SCALE)
    do = torch.randn_like(o1)
    o1.backward(do)
    o2.backward(do)
    for name, x, y in zip(("dq_nope", "dq_rope", "dc_kv", "dk_rope"), b, a):
        assert_close(name, x.grad, y.grad, tol=1e-5)


def test_checks_name_the_problem():
    qn, qr, c, kr = _inputs(1, 3, 5, 2, 8, 4)
    idx = torch.zeros(1, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="scale"):
        sparse_mla(qn, qr, c, kr, idx, 0.0)
    with pytest.raises(ValueError, match="idx must be"):
        sparse_mla(qn, qr, c, kr, idx.float(), SCALE)
    with pytest.raises(ValueError, match="k_rope must be"):
        sparse_mla(qn, qr, c, kr[:, :4], idx, SCALE)
    with pytest.raises(TypeError, match="q_nope is"):
        sparse_mla(qn, qr, c.half(), kr, idx, SCALE)


# ---- (b) T <= k: DSA is dense MLA -----------------------------------------------------------------------------


def _dense_causal_mla(qn, qr, c, kr, scale):
    """Dense causal MLA attention in MQA (absorbed) mode, the plain way: all heads score every earlier latent."""
    T, L = qn.shape[1], c.shape[1]
    s = (torch.einsum("bthr,blr->bhtl", qn, c) + torch.einsum("bthr,blr->bhtl", qr, kr)) * scale
    causal = torch.ones(T, L, dtype=torch.bool).tril(L - T)
    return torch.einsum("bhtl,blr->bthr", s.masked_fill(~causal, float("-inf")).softmax(-1), c)


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("topk", [19, 64])  # at and above T
def test_t_at_most_k_equals_dense_mla(path, topk):
    B, T, H, R, DR = 2, 19, 3, 32, 16
    qn, qr, c, kr = _inputs(B, T, T, H, R, DR)
    q_idx, k_idx, w = torch.randn(B, T, 2, 16), torch.randn(B, T, 16), torch.randn(B, T, 2)
    with backend.use_backend(path):
        idx = indexer_topk(q_idx, k_idx, w, topk)
        out = sparse_mla(qn, qr, c, kr, idx, SCALE)
    assert_close("dsa vs dense", _dense_causal_mla(qn, qr, c, kr, SCALE), out, tol=1e-5)
    # and with T > k it does not: the sparsity changes the result
    with backend.use_backend(path):
        few = sparse_mla(qn, qr, c, kr, indexer_topk(q_idx, k_idx, w, 4), SCALE)
    assert (few - out).abs().max() > 1e-2


# ---- (c) on the GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_forward_gpu(poison):
    """bf16 at GLM-5's dims (the autotuned tiles); fp32 (exact dots, fixed tiles) at smaller ones."""
    _check_forward(2, 64, 3000, 64, 512, 64, 2048, torch.bfloat16, "cuda")
    _check_forward(1, 40, 300, 16, 512, 64, 100, torch.bfloat16, "cuda")  # fewer heads than a block
    _check_forward(2, 33, 500, 8, 64, 32, 150, torch.float32, "cuda")


@pytest.mark.gpu
def test_backward_gpu(poison):
    _check_backward(1, 48, 2500, 64, 512, 64, 2048, torch.bfloat16, "cuda")
    _check_backward(2, 21, 400, 8, 64, 32, 100, torch.float32, "cuda")


@pytest.mark.gpu
def test_decode_gpu(poison):
    _check_forward(32, 1, 8192, 64, 512, 64, 2048, torch.bfloat16, "cuda", decode=True)
    _check_forward(2, 3, 4096, 64, 512, 64, 2048, torch.bfloat16, "cuda", decode=True)
