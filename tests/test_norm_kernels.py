"""The fused RMSNorm kernel (glmkit.kernels.rmsnorm) and glmkit.norms against the torch references.

On CPU the kernel runs under the Triton interpreter at small, odd shapes (rows = 7, hidden = 33/100...)
in fp32 and fp16; `-m gpu` runs it natively in fp32/fp16/bf16 up to hidden = 16K. Forward outputs and
dx are written into NaN-poisoned buffers; the weight gradient is checked with several program counts so
the partial-sum reduction is exercised with uneven row chunks.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import use_backend
from glmkit.kernels.rmsnorm import MAX_HIDDEN, rms_norm_triton, rmsnorm_bwd, rmsnorm_fwd
from glmkit.norms import RMSNorm, layer_norm_reference, rms_norm, rms_norm_path, rms_norm_reference
from glmkit.testing import REL_TOL, assert_close, poisoned

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode()) % 100_000


def _inputs(shape, dtype, device=DEV, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale + 0.5).to(device, dtype)
    w = (1.0 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, dtype)
    dy = torch.randn(shape, generator=g).to(device, dtype)
    return x, w, dy


def _ref_grads(x, w, dy, eps):
    """dx, dw of the reference by autograd, in fp32 (the kernel accumulates in fp32 whatever the dtype)."""
    xr = x.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    rms_norm_reference(xr, wr, eps).backward(dy.float())
    return xr.grad, wr.grad


FWD_CASES = [((7, 33), torch.float32), ((3, 100), torch.float32), ((1, 1), torch.float32),
             ((2, 3, 64), torch.float32), ((4, 257), torch.float32), ((7, 33), torch.float16),
             ((2, 5, 100), torch.float16)]


@pytest.mark.parametrize("shape,dtype", FWD_CASES)
def test_forward_matches_reference(shape, dtype):
    x, w, _ = _inputs(shape, dtype, seed=_seed(shape, dtype))
    eps = 1e-5
    M = x.numel() // shape[-1]
    out, rstd = poisoned(shape, dtype, x.device), poisoned((M,), torch.float32, x.device)
    y, r = rmsnorm_fwd(x, w, eps, out=out, return_rstd=True, rstd=rstd)
    assert y.data_ptr() == out.data_ptr() and r.data_ptr() == rstd.data_ptr()
    assert_close(f"rmsnorm fwd {shape} {dtype}", rms_norm_reference(x, w, eps), y)
    ref_rstd = torch.rsqrt(x.float().pow(2).mean(-1) + eps).reshape(-1)
    assert_close("rstd", ref_rstd, r, tol=1e-6)


@pytest.mark.parametrize("shape,dtype,programs", [
    ((7, 33), torch.float32, 1), ((7, 33), torch.float32, 3), ((3, 100), torch.float32, None),
    ((2, 5, 64), torch.float32, 4), ((7, 33), torch.float16, 3), ((9, 100), torch.float16, None),
])
def test_backward_matches_autograd(shape, dtype, programs):
    eps = 1e-6
    x, w, dy = _inputs(shape, dtype, seed=_seed("bwd", shape, dtype, programs))
    _, rstd = rmsnorm_fwd(x, w, eps, return_rstd=True)
    dx_buf = poisoned(shape, dtype, x.device)
    dx, dw = rmsnorm_bwd(dy, x, w, rstd, dx=dx_buf, num_programs=programs)
    assert dx.data_ptr() == dx_buf.data_ptr() and dw.dtype == w.dtype and dw.shape == w.shape
    rdx, rdw = _ref_grads(x, w, dy, eps)
    assert_close(f"dx {shape} {dtype}", rdx, dx)
    assert_close(f"dw {shape} {dtype} programs={programs}", rdw, dw, tol=REL_TOL[dtype] * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_function_and_strided_rows(dtype):
    """Training path: rms_norm_triton through autograd, on rows that are a strided view (row stride
    N + 5) and on a 3-D input whose rows are not contiguous (copied by the wrapper)."""
    N = 33
    g = torch.Generator().manual_seed(_seed("strided", dtype))
    base = torch.randn(6, N + 5, generator=g).to(DEV, dtype)
    for x0 in (base[:, :N], base.view(2, 3, N + 5)[:, :, 2:2 + N].transpose(0, 1)):
        x = x0.detach().clone().requires_grad_() if x0.is_contiguous() else x0.detach().requires_grad_()
        w = torch.randn(N, generator=g).to(DEV, dtype).requires_grad_()
        y = rms_norm_triton(x, w, 1e-5)
        dy = torch.randn(y.shape, generator=g).to(DEV, dtype)
        y.backward(dy)
        assert_close("fwd", rms_norm_reference(x.detach(), w.detach(), 1e-5), y.detach())
        rdx, rdw = _ref_grads(x, w, dy, 1e-5)
        assert_close("dx", rdx, x.grad)
        assert_close("dw", rdw, w.grad, tol=REL_TOL[dtype] * 2)


def test_module_dispatch_matches_torch_path():
    """RMSNorm (the module) gives the same values and gradients on both backends."""
    N = 100
    norm = RMSNorm(N, eps=1e-5, device=DEV)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(N))
    x = torch.randn(2, 7, N, device=DEV)
    grads = {}
    for name in ("torch", "triton"):
        norm.weight.grad = None
        xi = x.clone().requires_grad_()
        with use_backend(name):
            assert rms_norm_path(xi) == name
            y = norm(xi)
        y.backward(torch.ones_like(y) * torch.linspace(-1, 1, N, device=DEV))
        grads[name] = (y.detach(), xi.grad, norm.weight.grad.clone())
    for a, b, what in zip(grads["torch"], grads["triton"], ("y", "dx", "dw")):
        assert_close(f"module {what}", a, b)
    assert "100" in repr(norm) and "1e-05" in repr(norm)


def test_references_agree_with_torch():
    """The references against torch's own modules (LayerNorm; RMSNorm on torch >= 2.4)."""
    x = torch.randn(5, 48) * 2 + 1
    w, b = torch.randn(48), torch.randn(48)
    assert_close("layernorm", torch.nn.functional.layer_norm(x, (48,), w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))
    if hasattr(torch.nn.functional, "rms_norm"):
        assert_close("rmsnorm", torch.nn.functional.rms_norm(x, (48,), w, 1e-5), rms_norm_reference(x, w, 1e-5))
    assert_close("rms_norm torch path", rms_norm_reference(x, w, 1e-5), rms_norm(x, w, 1e-5))


def test_bad_inputs_are_named():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm_fwd(x, torch.ones(7))
    with pytest.raises(TypeError, match="x must be"):
        rmsnorm_fwd(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="hidden size"):
        rmsnorm_fwd(torch.empty(1, MAX_HIDDEN + 1), torch.empty(MAX_HIDDEN + 1))
    with pytest.raises(ValueError, match="out must be"):
        rmsnorm_fwd(x, torch.ones(8), out=torch.empty(3, 9))
    with pytest.raises(ValueError, match="rstd"):
        rmsnorm_bwd(x, x, torch.ones(8), torch.empty(2))
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(3))
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(8, eps=-1.0)


def test_empty_rows():
    x = torch.empty(0, 16, device=DEV)
    y, rstd = rmsnorm_fwd(x, torch.ones(16, device=DEV), return_rstd=True)
    assert y.shape == (0, 16) and rstd.shape == (0,)


# ---- native, on the H200: bf16 and real hidden sizes ----

@pytest.mark.gpu
@pytest.mark.parametrize("rows,N", [(4096, 4096), (1000, 5120), (257, 8192), (64, 16384), (3, 13696)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_forward_backward(rows, N, dtype):
    eps = 1e-5
    x, w, dy = _inputs((rows, N), dtype, device="cuda", seed=_seed("gpu", rows, N, dtype))
    out = poisoned((rows, N), dtype, "cuda")
    y, rstd = rmsnorm_fwd(x, w, eps, out=out, return_rstd=True)
    assert_close(f"fwd {rows}x{N} {dtype}", rms_norm_reference(x, w, eps), y)
    dx, dw = rmsnorm_bwd(dy, x, w, rstd, dx=poisoned((rows, N), dtype, "cuda"))
    rdx, rdw = _ref_grads(x, w, dy, eps)
    assert_close("dx", rdx, dx)
    assert_close("dw", rdw, dw, tol=REL_TOL[dtype] * 2)


@pytest.mark.gpu
def test_gpu_module_bf16_training_step():
    norm = RMSNorm(4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert rms_norm_path(x) == "triton"
    norm(x).float().square().mean().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(norm.weight.grad).all()
