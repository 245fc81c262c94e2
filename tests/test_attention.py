"""glmkit.attention: the torch reference against a naive loop, the mask's special cases, and the dispatch
of glm_attention (backend choice, gradients on both paths, errors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import glmkit
from glmkit import attention as A
from glmkit.attention import attention_path, attention_reference, glm_attention
from glmkit.testing import assert_close


def _qkv(B, H, H_kv, T, D, dtype=torch.float32, device="cpu", requires_grad=False):
    q = torch.randn(B, H, T, D, dtype=dtype, device=device, requires_grad=requires_grad)
    k = torch.randn(B, H_kv, T, D, dtype=dtype, device=device, requires_grad=requires_grad)
    v = torch.randn(B, H_kv, T, D, dtype=dtype, device=device, requires_grad=requires_grad)
    return q, k, v


def _naive(q, k, v, sep, scale=None):
    """One query at a time, visibility spelled out as in the paper: j < sep or j <= i."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = [j for j in range(T) if sep is None or j < int(sep[b]) or j <= i]
                kk = k[b, h // group, js].double()
                w = torch.softmax((kk @ q[b, h, i].double()) * scale, dim=0)
                out[b, h, i] = w @ v[b, h // group, js].double()
    return out


@pytest.mark.parametrize("B,H,H_kv,T,D", [(2, 2, 2, 7, 8), (3, 4, 2, 9, 16), (2, 4, 1, 5, 4), (1, 1, 1, 1, 8)])
def test_reference_matches_naive_loop(B, H, H_kv, T, D):
    q, k, v = _qkv(B, H, H_kv, T, D)
    sep = torch.randint(0, T + 1, (B,))
    sep[0] = 1 if T > 1 else 0
    assert_close("reference vs naive", _naive(q, k, v, sep), attention_reference(q, k, v, sep), 1e-6)
    assert_close("reference vs naive (no mask)", _naive(q, k, v, None), attention_reference(q, k, v, None), 1e-6)
    assert_close("scale", _naive(q, k, v, sep, 0.7), attention_reference(q, k, v, sep, scale=0.7), 1e-6)


def test_sep_zero_is_causal_and_sep_T_is_bidirectional():
    q, k, v = _qkv(2, 2, 2, 11, 8)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    full = F.scaled_dot_product_attention(q, k, v)
    assert_close("sep=0 is GPT", causal, attention_reference(q, k, v, torch.zeros(2, dtype=torch.long)))
    assert_close("sep=T is BERT", full, attention_reference(q, k, v, torch.full((2,), 11)))


def test_reference_keeps_dtype_and_computes_in_fp32():
    q, k, v = _qkv(1, 2, 2, 6, 8, dtype=torch.bfloat16)
    sep = torch.tensor([3])
    o = attention_reference(q, k, v, sep)
    assert o.dtype == torch.bfloat16
    assert_close("bf16 reference", attention_reference(q.float(), k.float(), v.float(), sep), o)


@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2), (4, 1)])
def test_torch_path_matches_reference(H, H_kv):
    q, k, v = _qkv(2, H, H_kv, 13, 16)
    sep = torch.tensor([0, 6])
    with glmkit.use_backend("torch"):
        assert attention_path(q, k, v) == "torch"
        assert_close("torch path", attention_reference(q, k, v, sep), glm_attention(q, k, v, sep))
        assert_close("torch path, no mask", attention_reference(q, k, v, None), glm_attention(q, k, v, None))


def test_auto_backend_on_cpu_is_torch():
    q, k, v = _qkv(1, 2, 2, 4, 16)
    with glmkit.use_backend("auto"):
        assert attention_path(q, k, v) == ("triton" if q.is_cuda else "torch")


def test_triton_backend_runs_the_kernel(monkeypatch):
    """Forced to "triton" on CPU: the kernel runs (interpreter) and matches the reference."""
    import glmkit.kernels.glm_attention as kmod

    calls = []
    real = kmod.glm_attention_fwd
    monkeypatch.setattr(kmod, "glm_attention_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(2, 4, 2, 21, 16)
    sep = torch.tensor([5, 21])
    with glmkit.use_backend("triton"):
        assert attention_path(q, k, v) == "triton"
        o = glm_attention(q, k, v, sep)
    assert calls == [1]
    assert_close("triton via dispatch", attention_reference(q, k, v, sep), o)


def test_grad_on_triton_path_uses_the_kernels(monkeypatch):
    """Gradients needed on the triton path: the forward kernel runs inside the autograd op (no torch
    fallback any more) and the backward kernels give the reference's gradients."""
    import glmkit.kernels.glm_attention as kmod

    calls = []
    real = kmod.glm_attention_fwd
    monkeypatch.setattr(kmod, "glm_attention_fwd", lambda *a, **kw: calls.append(kw.get("return_lse")) or real(*a, **kw))
    q, k, v = _qkv(1, 2, 1, 9, 16, requires_grad=True)
    sep = torch.tensor([4])
    with glmkit.use_backend("triton"):
        assert attention_path(q, k, v) == "triton"
        o = glm_attention(q, k, v, sep)
        o.square().sum().backward()
        assert q.grad is not None and k.grad is not None and torch.isfinite(v.grad).all()
        with torch.no_grad():
            assert attention_path(q, k, v) == "triton"
    assert calls == [True]  # one forward, asked for the lse the backward needs
    # gradients agree with the reference's
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attention_reference(q2, k2, v2, sep).square().sum().backward()
    for name, a, b in (("dq", q2.grad, q.grad), ("dk", k2.grad, k.grad), ("dv", v2.grad, v.grad)):
        assert_close(name, a, b, 1e-5)


def test_torch_path_stays_differentiable():
    q, k, v = _qkv(2, 4, 2, 11, 8, requires_grad=True)
    sep = torch.tensor([3, 11])
    with glmkit.use_backend("torch"):
        assert attention_path(q, k, v) == "torch"
        glm_attention(q, k, v, sep).square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attention_reference(q2, k2, v2, sep).square().sum().backward()
    for name, a, b in (("dq", q2.grad, q.grad), ("dk", k2.grad, k.grad), ("dv", v2.grad, v.grad)):
        assert_close(name, a, b, 1e-5)


def _bad(**over):
    q, k, v = _qkv(2, 4, 2, 6, 8)
    args = dict(q=q, k=k, v=v, sep=torch.tensor([1, 2]), scale=None)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(q=torch.randn(4, 6, 8)), ValueError, "q must have shape"),
        (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float64)), TypeError, "k must be float32"),
        (dict(v=torch.randn(2, 2, 6, 8).half()), TypeError, "share one dtype"),
        (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "multiple"),
        (dict(k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8)), ValueError, "k/v must be"),
        (dict(v=torch.randn(2, 1, 6, 8)), ValueError, "same shape"),
        (dict(sep=torch.tensor([1.0, 2.0])), TypeError, "sep must be an integer"),
        (dict(sep=torch.tensor([1, 2, 3])), ValueError, r"sep must have shape \[B\]"),
        (dict(sep=torch.tensor([1, 7])), ValueError, r"\[0, T\]"),
        (dict(sep=torch.tensor([-1, 2])), ValueError, r"\[0, T\]"),
        (dict(sep=[1, 2]), TypeError, "sep must be"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("fn", [attention_reference, glm_attention], ids=["reference", "glm_attention"])
def test_errors_name_the_argument(fn, over, exc, match):
    with pytest.raises(exc, match=match):
        fn(**_bad(**over))


def test_module_documents_the_mask():
    assert "j < sep" in A.__doc__ and "GPT" in A.__doc__ and "BERT" in A.__doc__


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_gpu_dispatch_uses_kernel(dtype, tol, monkeypatch):
    import glmkit.kernels.glm_attention as kmod

    calls = []
    real = kmod.glm_attention_fwd
    monkeypatch.setattr(kmod, "glm_attention_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(2, 8, 2, 1000, 128, dtype=dtype, device="cuda")
    sep = torch.tensor([500, 0], device="cuda")
    with glmkit.use_backend("auto"):
        assert attention_path(q, k, v) == "triton"
        o = glm_attention(q, k, v, sep)
    assert calls == [1]
    assert_close("gpu dispatch", attention_reference(q, k, v, sep), o, tol)
    with glmkit.use_backend("torch"):
        assert_close("gpu torch path", attention_reference(q, k, v, sep), glm_attention(q, k, v, sep), tol)


@pytest.mark.gpu
def test_gpu_grad_through_kernels():
    q, k, v = _qkv(1, 4, 4, 300, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    sep = torch.tensor([100], device="cuda")
    assert attention_path(q, k, v) == "triton"
    out = glm_attention(q, k, v, sep)
    assert "GLMAttentionFunction" in type(out.grad_fn).__name__
    out.float().sum().backward()
    assert torch.isfinite(q.grad.float()).all()
