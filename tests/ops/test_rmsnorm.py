"""glmkit.ops.rmsnorm and its fused kernels (glmkit.kernels.rmsnorm) against the torch references, and the
``glmkit.layers.RMSNorm`` module on both backends.

On CPU the kernels run under the Triton interpreter at small, odd shapes (rows = 7, hidden = 33/100...) in fp32 and
fp16; ``-m gpu`` runs them natively in fp32/fp16/bf16 up to hidden = 16K. Outputs are allocated NaN-poisoned (the
``poison`` fixture); the weight gradient is checked at row counts that split unevenly over the backward's programs,
so its partial-sum reduction sees ragged chunks.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend, use_backend
from glmkit.kernels.rmsnorm import rmsnorm_bwd, rmsnorm_fwd
from glmkit.layers import RMSNorm
from glmkit.ops.rmsnorm import rmsnorm, rmsnorm_reference
from glmkit.testing import REL_TOL, assert_close

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()) % 100_000)


def _inputs(shape, dtype, device=DEV, key=(), scale=3.0):
    g = _gen(shape, dtype, key)
    x = (torch.randn(shape, generator=g) * scale + 0.5).to(device, dtype)
    w = (1.0 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, dy


def _ref_grads(x, w, dy, eps):
    """dx, dw of the reference by autograd, in fp32 (the kernel accumulates in fp32 whatever the dtype)."""
    xr = x.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    rmsnorm_reference(xr, wr, eps).backward(dy.float())
    return xr.grad, wr.grad


FWD_CASES = [
    ((7, 33), torch.float32),
    ((3, 100), torch.float32),
    ((1, 1), torch.float32),
    ((2, 3, 64), torch.float32),
    ((4, 257), torch.float32),
    ((7, 33), torch.float16),
    ((2, 5, 100), torch.float16),
]


@pytest.mark.parametrize("shape,dtype", FWD_CASES)
def test_forward_matches_reference(shape, dtype, poison):
    x, w, _ = _inputs(shape, dtype, key="fwd")
    eps = 1e-5
    y, rstd = rmsnorm_fwd(x, w, eps)
    assert y.shape == x.shape and y.dtype == dtype and rstd.shape == (x.numel() // shape[-1],)
    assert_close(f"rmsnorm fwd {shape} {dtype}", rmsnorm_reference(x, w, eps), y)
    ref_rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps).reshape(-1)
    assert_close("rstd", ref_rstd, rstd, tol=1e-6)


# rows 7 and 9 split 2/2/2/1 and 3/3/3 over the interpreter's programs; 10 rows as 2·5 (3-D)
BWD_CASES = [
    ((7, 33), torch.float32),
    ((3, 100), torch.float32),
    ((2, 5, 64), torch.float32),
    ((1, 48), torch.float32),
    ((7, 33), torch.float16),
    ((9, 100), torch.float16),
]


@pytest.mark.parametrize("shape,dtype", BWD_CASES)
def test_backward_matches_autograd(shape, dtype, poison):
    eps = 1e-6
    x, w, dy = _inputs(shape, dtype, key="bwd")
    _, rstd = rmsnorm_fwd(x, w, eps)
    dx, dw = rmsnorm_bwd(dy, x, w, rstd)
    assert dx.shape == x.shape and dx.dtype == dtype and dw.dtype == w.dtype and dw.shape == w.shape
    rdx, rdw = _ref_grads(x, w, dy, eps)
    assert_close(f"dx {shape} {dtype}", rdx, dx)
    assert_close(f"dw {shape} {dtype}", rdw, dw, tol=REL_TOL[dtype] * 2)
    dx_only, none = rmsnorm_bwd(dy, x, w, rstd, compute_dw=False)
    assert none is None
    assert_close("dx without dw", rdx, dx_only)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_on_strided_rows(dtype, poison):
    """The training path (rmsnorm on the "triton" backend, through autograd) on rows that are a strided view (row
    stride N + 5) and on a 3-D input whose rows are not contiguous."""
    N = 33
    g = _gen("strided", dtype)
    base = torch.randn(6, N + 5, generator=g).to(DEV, dtype)
    for x0 in (base[:, :N], base.view(2, 3, N + 5)[:, :, 2 : 2 + N].transpose(0, 1)):
        x = x0.detach().requires_grad_()
        w = torch.randn(N, generator=g).to(DEV, dtype).requires_grad_()
        with use_backend("triton"), backend.audit() as a:
            y = rmsnorm(x, w, 1e-5)
        assert a.paths("rmsnorm") == {"triton"}
        dy = torch.randn(y.shape, generator=g).to(DEV, dtype)
        y.backward(dy)
        assert_close("fwd", rmsnorm_reference(x.detach(), w.detach(), 1e-5), y.detach())
        rdx, rdw = _ref_grads(x, w, dy, 1e-5)
        assert_close("dx", rdx, x.grad)
        assert_close("dw", rdw, w.grad, tol=REL_TOL[dtype] * 2)


def test_module_dispatch_matches_torch_path():
    """RMSNorm (the module) gives the same values and gradients on both backends."""
    N = 100
    norm = RMSNorm(N, eps=1e-5).to(DEV)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(N))
    x = torch.randn(2, 7, N, device=DEV)
    grads = {}
    for name in ("torch", "triton"):
        norm.weight.grad = None
        xi = x.clone().requires_grad_()
        with use_backend(name), backend.audit() as a:
            y = norm(xi)
        assert a.paths("rmsnorm") == {name}
        y.backward(torch.ones_like(y) * torch.linspace(-1, 1, N, device=DEV))
        grads[name] = (y.detach(), xi.grad, norm.weight.grad.clone())
    for a, b, what in zip(grads["torch"], grads["triton"], ("y", "dx", "dw")):
        assert_close(f"module {what}", a, b)
    assert "100" in repr(norm) and "1e-05" in repr(norm)


def test_reference_agrees_with_torch():
    """The reference against torch's own RMSNorm (torch >= 2.4) and by hand; the torch path is the reference."""
    x = torch.randn(5, 48) * 2 + 1
    w = torch.randn(48)
    by_hand = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w
    assert_close("by hand", by_hand, rmsnorm_reference(x, w, 1e-5))
    assert_close("no weight", by_hand / w, rmsnorm_reference(x, None, 1e-5))
    if hasattr(torch.nn.functional, "rms_norm"):
        assert_close("torch", torch.nn.functional.rms_norm(x, (48,), w, 1e-5), rmsnorm_reference(x, w, 1e-5))
    with use_backend("torch"):
        assert torch.equal(rmsnorm_reference(x, w, 1e-5), rmsnorm(x, w, 1e-5))
    xb = x.bfloat16()
    assert rmsnorm_reference(xb, w, 1e-5).dtype == torch.bfloat16
    assert_close("bf16, fp32 inside", rmsnorm_reference(xb.float(), w, 1e-5), rmsnorm_reference(xb, w, 1e-5))


def test_bad_inputs_are_named():
    x = torch.randn(3, 8)
    for fn in (rmsnorm, rmsnorm_reference):
        with pytest.raises(ValueError, match="weight"):
            fn(x, torch.ones(7))
        with pytest.raises(TypeError, match="x must be"):
            fn(x.long(), torch.ones(8))
        with pytest.raises(TypeError, match="x must be"):
            fn(torch.randn(3, 0), torch.ones(0))


def test_empty_rows(poison):
    x = torch.empty(0, 16, device=DEV)
    w = torch.ones(16, device=DEV)
    y, rstd = rmsnorm_fwd(x, w)
    assert y.shape == (0, 16) and rstd.shape == (0,)
    dx, dw = rmsnorm_bwd(torch.empty(0, 16, device=DEV), x, w, rstd)
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros(16, device=DEV))


# ---- native, on the H200: bf16 and real hidden sizes ----


@pytest.mark.gpu
@pytest.mark.parametrize("rows,N", [(4096, 4096), (1000, 5120), (257, 8192), (64, 16384), (3, 13696)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_forward_backward(rows, N, dtype, poison):
    eps = 1e-5
    x, w, dy = _inputs((rows, N), dtype, device="cuda", key="gpu")
    y, rstd = rmsnorm_fwd(x, w, eps)
    assert_close(f"fwd {rows}x{N} {dtype}", rmsnorm_reference(x, w, eps), y)
    dx, dw = rmsnorm_bwd(dy, x, w, rstd)
    rdx, rdw = _ref_grads(x, w, dy, eps)
    assert_close("dx", rdx, dx)
    assert_close("dw", rdw, dw, tol=REL_TOL[dtype] * 2)


@pytest.mark.gpu
def test_gpu_module_bf16_training_step():
    norm = RMSNorm(4096).to("cuda", torch.bfloat16)
    x = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with backend.audit() as a:
        y = norm(x)
    assert a.paths("rmsnorm") == {"triton"}
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(norm.weight.grad).all()
    rdx, rdw = _ref_grads(x, norm.weight, 2 * y.detach().float() / y.numel(), 1e-5)
    assert_close("bf16 dx", rdx, x.grad)
    assert_close("bf16 dw", rdw, norm.weight.grad, tol=REL_TOL[torch.bfloat16] * 2)
