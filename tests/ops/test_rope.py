"""glmkit.ops.rope and its fused kernel (glmkit.kernels.rope) against the torch reference, and the conventions
against Hugging Face: transformers' own ``apply_rotary_pos_emb`` and rotary embeddings of ``glm``, ``glm4`` and
``glm4_moe``, and HF's formulation written out independently here.

Both pairings (interleaved: ChatGLM2/3, GLM-4; half-split: GLM-4.5), partial and full rotation, GQA (k with fewer
heads), cos/sin shared by the batch or per sample, out of place (NaN-poisoned allocations, the ``poison`` fixture) and
in place, forward and backward. CPU: the Triton interpreter at small odd shapes (T = 5, 7, 33; D = 20 with R = 10);
``-m gpu``: natively, bf16, real shapes.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend, use_backend
from glmkit.kernels.rope import rope_fwd
from glmkit.ops.rope import rope, rope_cos_sin, rope_reference
from glmkit.testing import assert_close

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
    (2, 4, 2, 5, 16, 8, torch.float32, False),  # GLM-style partial: R = D/2, GQA
    (1, 3, 1, 7, 20, 10, torch.float32, True),  # R/2 = 5, not a power of two; per-sample positions
    (2, 2, 2, 9, 12, 12, torch.float32, False),  # full rotation (no pass-through)
    (3, 2, 1, 33, 32, 16, torch.float32, True),  # T spans several blocks
    (2, 4, 2, 5, 16, 8, torch.float16, True),
    (1, 2, 1, 7, 64, 32, torch.float16, False),
]


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("B,H,H_kv,T,D,R,dtype,per_batch", CASES)
def test_out_of_place_matches_reference(B, H, H_kv, T, D, R, dtype, per_batch, pairing, poison):
    q, k, cos, sin = _inputs(B, H, H_kv, T, D, R, dtype, per_batch)
    q0, k0 = q.clone(), k.clone()
    qo, ko = rope_fwd(q, k, cos, sin, R, pairing)
    assert qo.data_ptr() != q.data_ptr() and torch.equal(q, q0) and torch.equal(k, k0)  # inputs left alone
    assert_close(f"q {pairing}", rope_reference(q, cos, sin, R, pairing), qo)
    assert_close(f"k {pairing}", rope_reference(k, cos, sin, R, pairing), ko)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_in_place_touches_only_rotary_dims(pairing, dtype):
    q, k, cos, sin = _inputs(2, 3, 1, 7, 20, 10, dtype, True, key="inplace")
    want_q, want_k = (rope_reference(t, cos, sin, 10, pairing) for t in (q, k))
    q0 = q.clone()
    qo, ko = rope_fwd(q, k, cos, sin, 10, pairing, inplace=True)
    assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
    assert torch.equal(q[..., 10:], q0[..., 10:])  # pass-through dims untouched, bit for bit
    assert_close("q in place", want_q, q)
    assert_close("k in place", want_k, k)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("dtype,inplace", [(torch.float32, False), (torch.float32, True), (torch.float16, False)])
def test_backward_matches_autograd(pairing, dtype, inplace, poison):
    q, k, cos, sin = _inputs(2, 4, 2, 5, 16, 8, dtype, True, key="bwd")
    g = torch.Generator().manual_seed(7)
    gq, gk = (torch.randn(t.shape, generator=g).to(t.device, dtype) for t in (q, k))
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    qi, ki = (ql * 1, kl * 1) if inplace else (ql, kl)  # in-place needs non-leaf tensors
    with use_backend("triton"), backend.audit() as a:
        qo, ko = rope(qi, ki, cos, sin, 8, pairing, inplace)
    assert a.paths("rope") == {"triton"}
    ((qo.float() * gq.float()).sum() + (ko.float() * gk.float()).sum()).backward()
    qr, kr = q.float().requires_grad_(), k.float().requires_grad_()
    (
        (rope_reference(qr, cos, sin, 8, pairing) * gq.float()).sum()
        + (rope_reference(kr, cos, sin, 8, pairing) * gk.float()).sum()
    ).backward()
    assert_close("dq", qr.grad, ql.grad)
    assert_close("dk", kr.grad, kl.grad)


def test_backward_with_only_k_needing_grad():
    """The autograd op rotates back whichever of dq, dk exists: here only k requires grad."""
    q, k, cos, sin = _inputs(1, 2, 1, 7, 16, 8, torch.float32, False, key="k-only")
    kl = k.clone().requires_grad_()
    with use_backend("triton"):
        qo, ko = rope(q, kl, cos, sin, 8, "half")
    assert_close("q", rope_reference(q, cos, sin, 8, "half"), qo.detach())
    (ko * torch.linspace(-1, 1, 16)).sum().backward()
    kr = k.clone().requires_grad_()
    (rope_reference(kr, cos, sin, 8, "half") * torch.linspace(-1, 1, 16)).sum().backward()
    assert_close("dk only", kr.grad, kl.grad)


def test_inverse_undoes_forward_and_strided_views(poison):
    """q and k as views of a fused [B, T, H, D] projection (strided heads), k = None, and inverse ∘ forward = id."""
    B, T, H, D, R = 2, 5, 3, 16, 8
    qkv = torch.randn(B, T, 2 * H, D, device=DEV)
    q = qkv[:, :, :H].transpose(1, 2)  # [B, H, T, D], not contiguous
    cos, sin = rope_cos_sin(torch.arange(T, device=DEV), R)
    for pairing in ("interleaved", "half"):
        qo, none = rope_fwd(q, None, cos, sin, R, pairing)
        assert none is None
        assert_close("strided q", rope_reference(q, cos, sin, R, pairing), qo)
        back, _ = rope_fwd(qo, None, cos, sin, R, pairing, inverse=True)
        assert_close("inverse", q, back, tol=1e-6)


def test_cos_sin_table():
    """angle[t, i] = pos[t] · θ^(-2i/R), one entry per frequency; per-sample positions give [B, T, R/2]."""
    pos = torch.tensor([0, 3, 11])
    cos, sin = rope_cos_sin(pos, 8, 500.0)
    want = pos[:, None].double() * 500.0 ** (-torch.arange(0, 8, 2).double() / 8)
    assert cos.shape == (3, 4) and cos.dtype == torch.float32
    assert_close("cos", want.cos(), cos, 1e-6)
    assert_close("sin", want.sin(), sin, 1e-6)
    cb, _ = rope_cos_sin(torch.stack((pos, pos + 1)), 8, 500.0)
    assert cb.shape == (2, 3, 4) and torch.equal(cb[0], cos)


# ---- the conventions against Hugging Face ----


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
        rot = torch.cat((-xr[..., R // 2 :], xr[..., : R // 2]), -1)
    return torch.cat((xr * cos + rot * sin, xp), -1)


@pytest.mark.parametrize("pairing", ["interleaved", "half"])
def test_conventions_match_hf_formulation(pairing):
    x = torch.randn(2, 3, 11, 16, device=DEV)
    pos = torch.arange(11, device=DEV) * 7
    cos, sin = rope_cos_sin(pos, 8, 10000.0)
    want = _hf_style(x, pos, 8, 10000.0, pairing)
    assert_close(f"reference {pairing}", want, rope_reference(x, cos, sin, 8, pairing), tol=1e-6)
    with use_backend("triton"):
        assert_close(f"kernel {pairing}", want, rope(x, None, cos, sin, 8, pairing)[0], tol=1e-6)
    other = "half" if pairing == "interleaved" else "interleaved"
    assert (rope_reference(x, cos, sin, 8, other) - want).abs().max() > 0.1  # the two are not interchangeable


HF_FAMILIES = [  # transformers model type, its config class name, glmkit's pairing
    ("glm", "GlmConfig", "interleaved"),
    ("glm4", "Glm4Config", "interleaved"),
    ("glm4_moe", "Glm4MoeConfig", "half"),
]


@pytest.mark.parametrize("family,config_cls,pairing", HF_FAMILIES, ids=[f[0] for f in HF_FAMILIES])
def test_matches_transformers_apply_rotary_pos_emb(family, config_cls, pairing):
    """transformers' own rotary embedding and ``apply_rotary_pos_emb`` of each GLM family against rope_cos_sin +
    rope_reference (bit-identical in fp32) and the kernel, with partial rotation, GQA and per-sample positions."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (the dev extra)")
    import importlib

    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    B, H, H_kv, T, D, theta = 2, 4, 2, 9, 32, (1e6 if family == "glm4_moe" else 1e4)
    cfg = getattr(transformers, config_cls)(
        hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H_kv, head_dim=D,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5},
    )  # fmt: skip
    rotary = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding"))(cfg)
    q, k = torch.randn(B, H, T, D), torch.randn(B, H_kv, T, D)
    pos = torch.stack((torch.arange(T), torch.arange(T) * 5 + 3))  # [B, T]
    hf_cos, hf_sin = rotary(q, pos)
    want_q, want_k = mod.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    R = D // 2
    cos, sin = rope_cos_sin(pos, R, theta)
    assert torch.equal(rope_reference(q, cos, sin, R, pairing), want_q)
    assert torch.equal(rope_reference(k, cos, sin, R, pairing), want_k)
    with use_backend("triton"):
        qo, ko = rope(q.to(DEV), k.to(DEV), cos.to(DEV), sin.to(DEV), R, pairing)
    assert_close(f"{family} kernel q", want_q, qo, tol=1e-6)
    assert_close(f"{family} kernel k", want_k, ko, tol=1e-6)


def test_scores_depend_on_relative_position_only():
    """The point of RoPE: q_m·k_n after rotation depends on m - n only (same vectors, shifted positions)."""
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 6, 16)
    for pairing in ("interleaved", "half"):
        s = []
        for shift in (0, 37):
            cos, sin = rope_cos_sin(torch.arange(6) + shift, 8)
            qr, kr = rope_reference(q, cos, sin, 8, pairing), rope_reference(k, cos, sin, 8, pairing)
            s.append(qr[0, 0] @ kr[0, 0].T)
        assert_close(f"shift invariance {pairing}", s[0], s[1], tol=1e-5)


# ---- dispatch and errors ----


@pytest.mark.parametrize("inplace", [False, True])
def test_dispatch_both_backends(inplace):
    q, k, cos, sin = _inputs(2, 4, 2, 5, 16, 8, torch.float32, False, key="dispatch")
    res = {}
    for name in ("torch", "triton"):
        ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
        with use_backend(name), backend.audit() as a:
            qo, ko = rope(ql * 1, kl * 1, cos, sin, 8, "half", inplace=inplace)
        assert a.paths("rope") == {name}
        (qo.sum() * 2 + (ko * ko).sum()).backward()
        res[name] = (qo.detach(), ko.detach(), ql.grad, kl.grad)
    assert_close("torch path is the reference", rope_reference(q, cos, sin, 8, "half"), res["torch"][0], tol=0.0)
    for a, b in zip(res["torch"], res["triton"]):
        assert_close(f"dispatch inplace={inplace}", a, b)


def test_bad_inputs_are_named():
    q, k, cos, sin = _inputs(1, 2, 1, 5, 16, 8, torch.float32, False, key="bad")
    for fn in (lambda *a: rope(a[0], None, *a[1:]), rope_reference):
        with pytest.raises(ValueError, match="pairing"):
            fn(q, cos, sin, 8, "neox")
        with pytest.raises(ValueError, match="cos/sin"):
            fn(q, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1), 8, "half")  # HF's doubled layout
        for bad in (7, 0, 18):
            with pytest.raises(ValueError, match="rotary_dim"):
                fn(q, cos, sin, bad, "half")
        with pytest.raises(ValueError, match=r"q must be|x must be"):
            fn(q[0], cos, sin, 8, "half")
    with pytest.raises(ValueError, match=r"cos/sin must be \[T, R/2\] = \(3, 4\)"):
        rope(q, k[:, :, :3], cos, sin, 8)  # k's length disagrees with the table
    with pytest.raises(ValueError, match="k must be"):
        rope(q, k.long(), cos, sin, 8)


@pytest.mark.parametrize("what", ["batch", "head_dim"])
def test_k_shaped_unlike_q_is_refused(what):
    """The one-launch kernel rotates q and k with q's batch and head dim, so rope() refuses a k that differs in
    either (before this check the kernel wrote past the end of such a k)."""
    q, _, cos, sin = _inputs(2, 2, 1, 5, 16, 8, torch.float32, False, key="unlike")
    k = torch.randn(1, 1, 5, 16) if what == "batch" else torch.randn(2, 1, 5, 20)
    for name in ("torch", "triton"):
        with use_backend(name), pytest.raises(ValueError, match="k must match q in batch and head dim"):
            rope(q, k, cos, sin, 8, "interleaved", inplace=True)


# ---- native, on the H200 ----


@pytest.mark.gpu
@pytest.mark.parametrize("pairing", ["interleaved", "half"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "B,H,H_kv,T,D,R", [(2, 32, 2, 4096, 128, 64), (1, 96, 8, 1000, 128, 64), (3, 4, 4, 77, 64, 64)]
)
def test_gpu_matches_reference(B, H, H_kv, T, D, R, dtype, pairing, poison):
    q, k, cos, sin = _inputs(B, H, H_kv, T, D, R, dtype, True, device="cuda", key="gpu", theta=1e6)
    qo, ko = rope_fwd(q, k, cos, sin, R, pairing)
    assert_close("q", rope_reference(q, cos, sin, R, pairing), qo)
    assert_close("k", rope_reference(k, cos, sin, R, pairing), ko)
    qi, ki = q.clone(), k.clone()
    rope_fwd(qi, ki, cos, sin, R, pairing, inplace=True)
    assert_close("q in place", qo, qi, tol=0.0)
    back, _ = rope_fwd(qo, None, cos, sin, R, pairing, inverse=True)
    assert_close("inverse", q, back)


@pytest.mark.gpu
def test_gpu_autograd_bf16():
    q, k, cos, sin = _inputs(2, 32, 2, 512, 128, 64, torch.bfloat16, False, device="cuda", key="gpu-ag")
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    with backend.audit() as a:
        qo, ko = rope(ql, kl, cos, sin, 64, "interleaved")
    assert a.paths("rope") == {"triton"}
    (qo.float().sum() + ko.float().square().sum()).backward()
    qr, kr = q.float().requires_grad_(), k.float().requires_grad_()
    (rope_reference(qr, cos, sin, 64).sum() + rope_reference(kr, cos, sin, 64).square().sum()).backward()
    assert_close("dq", qr.grad, ql.grad)
    assert_close("dk", kr.grad, kl.grad)
