"""The fused partial-RoPE kernel (glmkit.kernels.rope) and glmkit.rope against the torch references.

Both pairings (interleaved: ChatGLM2/3, GLM-4; half-split: GLM-4.5), partial and full rotation, GQA
(k with fewer heads), cos/sin shared by the batch or per sample, out of place into NaN-poisoned buffers
and in place, forward and backward. The conventions themselves are pinned against HF's formulation
(cos/sin doubled to [.., R] and a ``rotate_half``), written out independently here. CPU: the Triton
interpreter at small odd shapes (T = 5, 7; D = 20 with R = 10); `-m gpu`: natively, bf16, real shapes.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import use_backend
from glmkit.kernels.rope import rope_fwd, rope_triton
from glmkit.rope import apply_rope, apply_rope_2d, apply_rope_qk, apply_rope_reference, rope_cos_sin, rope_path
from glmkit.testing import assert_close, poisoned

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _inputs(B, H, H_kv, T, D, R, dtype, per_batch, device=DEV, key=(), theta=10000.0):
    g = torch.Generator().manual_seed(zlib.crc32(repr((B, H, H_kv, T, D, R, dtype, per_batch, key)).encode()) % 100_000)
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    k = torch.randn(B, H_kv, T, D, generator=g).to(device, dtype)
    pos = torch.randint(0, 4 * T + 50, (B, T) if per_batch else (T,), generator=g).to(device)
    cos, sin = rope_cos_sin(pos, R, theta)
    return q, k, cos, sin


# (B, H, H_kv, T, D, R, dtype, per-batch cos/sin)
CASES = [
    (2, 4, 2, 5, 16, 8, torch.float32, False),     # GLM-style partial: R = D/2, GQA
    (1, 3, 1, 7, 20, 10, torch.float32, True),     # R/2 = 5, not a power of two; per-sample positions
    (2, 2, 2, 9, 12, 12, torch.float32, False),    # full rotation (no pass-through)
    (3, 2, 1, 33, 32, 16, torch.float32, True),    # T spans several blocks
    (2, 4, 2, 5, 16, 8, torch.float16, True),
    (1, 2, 1, 7, 64, 32, torch.float16, False),
]


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("B,H,H_kv,T,D,R,dtype,per_batch", CASES)
def test_out_of_place_matches_reference(B, H, H_kv, T, D, R, dtype, per_batch, pairing):
    q, k, cos, sin = _inputs(B, H, H_kv, T, D, R, dtype, per_batch)
    q_out, k_out = poisoned(q.shape, dtype, q.device), poisoned(k.shape, dtype, k.device)
    qo, ko = rope_fwd(q, k, cos, sin, R, pairing, q_out=q_out, k_out=k_out, block_t=4)
    assert qo.data_ptr() == q_out.data_ptr() and ko.data_ptr() == k_out.data_ptr()
    assert_close(f"q {pairing}", apply_rope_reference(q, cos, sin, R, pairing), qo)
    assert_close(f"k {pairing}", apply_rope_reference(k, cos, sin, R, pairing), ko)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_in_place_touches_only_rotary_dims(pairing, dtype):
    q, k, cos, sin = _inputs(2, 3, 1, 7, 20, 10, dtype, True, key="inplace")
    want_q, want_k = (apply_rope_reference(t, cos, sin, 10, pairing) for t in (q, k))
    q0 = q.clone()
    qo, ko = rope_fwd(q, k, cos, sin, 10, pairing, inplace=True)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    assert torch.equal(q[..., 10:], q0[..., 10:])  # pass-through dims untouched, bit for bit
    assert_close("q in place", want_q, q)
    assert_close("k in place", want_k, k)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("dtype,inplace", [(torch.float32, False), (torch.float32, True), (torch.float16, False)])
def test_backward_matches_autograd(pairing, dtype, inplace):
    q, k, cos, sin = _inputs(2, 4, 2, 5, 16, 8, dtype, True, key="bwd")
    g = torch.Generator().manual_seed(7)
    gq, gk = (torch.randn(t.shape, generator=g).to(t.device, dtype) for t in (q, k))
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    qi, ki = (ql * 1, kl * 1) if inplace else (ql, kl)  # in-place needs non-leaf tensors
    qo, ko = rope_triton(qi, ki, cos, sin, 8, pairing, inplace)
    ((qo.float() * gq.float()).sum() + (ko.float() * gk.float()).sum()).backward()
    qr, kr = q.float().requires_grad_(), k.float().requires_grad_()
    ((apply_rope_reference(qr, cos, sin, 8, pairing) * gq.float()).sum()
     + (apply_rope_reference(kr, cos, sin, 8, pairing) * gk.float()).sum()).backward()
    assert_close("dq", qr.grad, ql.grad)
    assert_close("dk", kr.grad, kl.grad)


def test_inverse_undoes_forward_and_strided_views():
    """q and k as views of a fused [B, T, H, D] projection (strided heads), k = None, and inverse ∘ forward = id."""
    B, T, H, D, R = 2, 5, 3, 16, 8
    qkv = torch.randn(B, T, 2 * H, D, device=DEV)
    q = qkv[:, :, :H].transpose(1, 2)                     # [B, H, T, D], not contiguous
    cos, sin = rope_cos_sin(torch.arange(T, device=DEV), R)
    for pairing in ("interleaved", "half"):
        qo, none = rope_fwd(q, None, cos, sin, R, pairing)
        assert none is None
        assert_close("strided q", apply_rope_reference(q, cos, sin, R, pairing), qo)
        back, _ = rope_fwd(qo, None, cos, sin, R, pairing, inverse=True)
        assert_close("inverse", q, back, tol=1e-6)


def _hf_style(x, pos, R, theta, pairing):
    """HF's formulation, written independently: cos/sin = cat(freqs, freqs) [.., R]; glm/glm4 cut them to
    R/2 and repeat_interleave(2) with an interleaved rotate_half; glm4_moe/gpt_neox use them as is
    with a half-split rotate_half. Then x·cos + rotate_half(x)·sin on x[..., :R]."""
    inv = 1.0 / (theta ** (torch.arange(0, R, 2, device=x.device).float() / R))
    freqs = pos[..., None].float() * inv
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos(), emb.sin()
    xr, xp = x[..., :R], x[..., R:]
    if pairing == "interleaved":
        cos = cos[..., : R // 2].repeat_interleave(2, -1)
        sin = sin[..., : R // 2].repeat_interleave(2, -1)
        rot = torch.stack((-xr[..., 1::2], xr[..., 0::2]), -1).flatten(-2)
    else:
        rot = torch.cat((-xr[..., R // 2:], xr[..., : R // 2]), -1)
    return torch.cat((xr * cos + rot * sin, xp), -1)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_conventions_match_hf_formulation(pairing):
    x = torch.randn(2, 3, 11, 16, device=DEV)
    pos = torch.arange(11, device=DEV) * 7
    cos, sin = rope_cos_sin(pos, 8, 10000.0)
    want = _hf_style(x, pos, 8, 10000.0, pairing)
    assert_close(f"reference {pairing}", want, apply_rope_reference(x, cos, sin, 8, pairing), tol=1e-6)
    with use_backend("triton"):
        assert_close(f"kernel {pairing}", want, apply_rope(x, cos, sin, 8, pairing), tol=1e-6)
    other = "half" if pairing == "interleaved" else "interleaved"
    assert (apply_rope_reference(x, cos, sin, 8, other) - want).abs().max() > 0.1  # the two are not interchangeable


def test_scores_depend_on_relative_position_only():
    """The point of RoPE: q_m·k_n after rotation depends on m - n only (same vectors, shifted positions)."""
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16)
    for pairing in ("interleaved", "half"):
        s = []
        for shift in (0, 37):
            cos, sin = rope_cos_sin(torch.arange(6) + shift, 8)
            qr, kr = apply_rope_reference(q, cos, sin, 8, pairing), apply_rope_reference(k, cos, sin, 8, pairing)
            s.append(qr[0, 0] @ kr[0, 0].T)
        assert_close(f"shift invariance {pairing}", s[0], s[1], tol=1e-5)


def test_chatglm6b_2d_rope():
    x = torch.randn(1, 2, 5, 16)
    pos, block = torch.arange(5), torch.tensor([0, 0, 0, 1, 2])
    cp, sp = rope_cos_sin(pos, 8)
    cb, sb = rope_cos_sin(block, 8)
    y = apply_rope_2d(x, cp, sp, cb, sb)
    assert_close("first half", apply_rope_reference(x[..., :8], cp, sp, 8, "half"), y[..., :8])
    assert torch.equal(y[..., 8:][:, :, :3], x[..., 8:][:, :, :3])  # block position 0: no rotation
    assert_close("second half", apply_rope_reference(x[..., 8:], cb, sb, 8, "half"), y[..., 8:])


@pytest.mark.parametrize("inplace", [False, True])
def test_dispatch_both_backends(inplace):
    q, k, cos, sin = _inputs(2, 4, 2, 5, 16, 8, torch.float32, False, key="dispatch")
    res = {}
    for name in ("torch", "triton"):
        ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
        with use_backend(name):
            assert rope_path(ql) == name
            qo, ko = apply_rope_qk(ql * 1, kl * 1, cos, sin, 8, "half", inplace=inplace)
        (qo.sum() * 2 + (ko * ko).sum()).backward()
        res[name] = (qo.detach(), ko.detach(), ql.grad, kl.grad)
    for a, b in zip(res["torch"], res["triton"]):
        assert_close(f"dispatch inplace={inplace}", a, b)


def test_bad_inputs_are_named():
    q, k, cos, sin = _inputs(1, 2, 1, 5, 16, 8, torch.float32, False, key="bad")
    with pytest.raises(ValueError, match="pairing"):
        apply_rope(q, cos, sin, 8, "neox")
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope(q, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1), 8)  # HF's doubled layout
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(q, cos, sin, 7)
    with pytest.raises(ValueError, match="k must be"):
        apply_rope_qk(q, k[:, :, :3], cos, sin, 8)
    with pytest.raises(ValueError, match="q must"):
        rope_fwd(q[0], None, cos, sin, 8)
    with pytest.raises(ValueError, match="inplace"):
        rope_fwd(q, None, cos, sin, 8, inplace=True, q_out=torch.empty_like(q))
    with pytest.raises(ValueError, match="rotary_dim"):
        rope_cos_sin(torch.arange(4), 5)


# ---- native, on the H200 ----

@pytest.mark.gpu
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,H_kv,T,D,R", [(2, 32, 2, 4096, 128, 64), (1, 96, 8, 1000, 128, 64), (3, 4, 4, 77, 64, 64)])
def test_gpu_matches_reference(B, H, H_kv, T, D, R, dtype, pairing):
    q, k, cos, sin = _inputs(B, H, H_kv, T, D, R, dtype, True, device="cuda", key="gpu", theta=1e6)
    qo, ko = rope_fwd(q, k, cos, sin, R, pairing, q_out=poisoned(q.shape, dtype, "cuda"), k_out=poisoned(k.shape, dtype, "cuda"))
    assert_close("q", apply_rope_reference(q, cos, sin, R, pairing), qo)
    assert_close("k", apply_rope_reference(k, cos, sin, R, pairing), ko)
    qi, ki = q.clone(), k.clone()
    rope_fwd(qi, ki, cos, sin, R, pairing, inplace=True)
    assert_close("q in place", qo, qi, tol=0.0)
    back, _ = rope_fwd(qo, None, cos, sin, R, pairing, inverse=True)
    assert_close("inverse", q, back)


@pytest.mark.gpu
def test_gpu_autograd_bf16():
    q, k, cos, sin = _inputs(2, 32, 2, 512, 128, 64, torch.bfloat16, False, device="cuda", key="gpu-ag")
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    assert rope_path(ql) == "triton"
    qo, ko = apply_rope_qk(ql, kl, cos, sin, 64, "interleaved")
    (qo.float().sum() + ko.float().square().sum()).backward()
    qr, kr = q.float().requires_grad_(), k.float().requires_grad_()
    (apply_rope_reference(qr, cos, sin, 64).sum() + apply_rope_reference(kr, cos, sin, 64).square().sum()).backward()
    assert_close("dq", qr.grad, ql.grad)
    assert_close("dk", kr.grad, kl.grad)
