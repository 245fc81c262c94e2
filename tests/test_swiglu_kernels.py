"""The fused SwiGLU kernel (glmkit.kernels.swiglu) and glmkit.mlp against the torch references.

CPU: the Triton interpreter at odd sizes (I = 1, 33, 100, 300 — not multiples of the block), fp32 and
fp16, forward and backward into NaN-poisoned buffers. `-m gpu`: natively, fp32/fp16/bf16, GLM-4 sizes.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import use_backend
from glmkit.kernels.swiglu import swiglu_bwd, swiglu_fwd, swiglu_triton
from glmkit.mlp import MLP, geglu_reference, swiglu, swiglu_path, swiglu_reference
from glmkit.testing import assert_close, poisoned

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _inputs(lead, I, dtype, device=DEV, key=()):
    g = torch.Generator().manual_seed(zlib.crc32(repr((lead, I, dtype, key)).encode()) % 100_000)
    gate_up = (torch.randn(*lead, 2 * I, generator=g) * 3).to(device, dtype)
    dy = torch.randn(*lead, I, generator=g).to(device, dtype)
    return gate_up, dy


def _ref_grad(gate_up, dy):
    x = gate_up.detach().float().requires_grad_()
    swiglu_reference(x).backward(dy.float())
    return x.grad


CASES = [((7,), 33, torch.float32), ((3,), 100, torch.float32), ((1,), 1, torch.float32),
         ((2, 5), 64, torch.float32), ((4,), 300, torch.float32), ((7,), 33, torch.float16),
         ((2, 3), 100, torch.float16)]


@pytest.mark.parametrize("lead,I,dtype", CASES)
def test_forward_backward_match_reference(lead, I, dtype):
    gate_up, dy = _inputs(lead, I, dtype)
    out = poisoned((*lead, I), dtype, gate_up.device)
    y = swiglu_fwd(gate_up, out=out)
    assert y.data_ptr() == out.data_ptr()
    assert_close(f"swiglu fwd {lead} I={I} {dtype}", swiglu_reference(gate_up), y)
    dbuf = poisoned(gate_up.shape, dtype, gate_up.device)
    d = swiglu_bwd(dy, gate_up, out=dbuf)
    assert d.data_ptr() == dbuf.data_ptr()
    assert_close(f"swiglu bwd {lead} I={I} {dtype}", _ref_grad(gate_up, dy), d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_on_strided_view(dtype):
    """gate_up as a column slice of a wider tensor (row stride 2I + 3), through autograd."""
    I = 45
    base, dy = _inputs((6,), I + 2, dtype, key="strided")
    leaf = base.detach().clone().requires_grad_()
    gate_up = leaf[:, : 2 * I]
    y = swiglu_triton(gate_up)
    dy = dy[:, :I].contiguous()
    y.backward(dy)
    assert_close("fwd", swiglu_reference(gate_up.detach()), y.detach())
    want = torch.zeros_like(base, dtype=torch.float32)
    want[:, : 2 * I] = _ref_grad(gate_up, dy)
    assert_close("grad", want, leaf.grad)


def test_gate_is_first_half():
    """The layout is gate ‖ up (ChatGLM2, HF Phi3MLP): silu acts on the first half."""
    gate, up = torch.randn(4, 8, device=DEV), torch.randn(4, 8, device=DEV)
    h = torch.cat((gate, up), -1)
    assert_close("reference", F.silu(gate) * up, swiglu_reference(h))
    with use_backend("triton"):
        assert_close("kernel", F.silu(gate) * up, swiglu(h))
    # GLM-130B's GeGLU puts the activation on the second half by default
    assert_close("geglu", gate * F.gelu(up, approximate="tanh"), geglu_reference(h))
    assert_close("geglu gate first", F.gelu(gate, approximate="tanh") * up, geglu_reference(h, gate_first=True))


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu"])
def test_mlp_module_both_backends(activation):
    mlp = MLP(24, 40, activation, device=DEV)
    x = torch.randn(2, 5, 24, device=DEV)
    res = {}
    for name in ("torch", "triton"):
        mlp.zero_grad()
        xi = x.clone().requires_grad_()
        with use_backend(name):
            if activation == "swiglu":
                assert swiglu_path(xi) == name
            y = mlp(xi)
        y.pow(2).sum().backward()
        res[name] = [y.detach(), xi.grad] + [p.grad.clone() for p in mlp.parameters()]
    for a, b in zip(res["torch"], res["triton"]):
        assert_close(f"mlp {activation}", a, b)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="even"):
        swiglu_fwd(torch.randn(3, 7))
    with pytest.raises(TypeError, match="gate_up"):
        swiglu_fwd(torch.randn(3, 8).long())
    with pytest.raises(ValueError, match="out must be"):
        swiglu_fwd(torch.randn(3, 8), out=torch.empty(3, 8))
    with pytest.raises(ValueError, match="dy"):
        swiglu_bwd(torch.randn(3, 3), torch.randn(3, 8))
    with pytest.raises(ValueError, match="gate_up"):
        swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="activation"):
        MLP(8, 8, "relu")


# ---- native, on the H200 ----

@pytest.mark.gpu
@pytest.mark.parametrize("rows,I", [(4096, 13696), (1000, 10944), (257, 1536), (3, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_forward_backward(rows, I, dtype):
    gate_up, dy = _inputs((rows,), I, dtype, device="cuda")
    y = swiglu_fwd(gate_up, out=poisoned((rows, I), dtype, "cuda"))
    assert_close(f"fwd {rows}x{I} {dtype}", swiglu_reference(gate_up), y)
    d = swiglu_bwd(dy, gate_up, out=poisoned((rows, 2 * I), dtype, "cuda"))
    assert_close(f"bwd {rows}x{I} {dtype}", _ref_grad(gate_up, dy), d)


@pytest.mark.gpu
def test_gpu_mlp_bf16_uses_kernel():
    mlp = MLP(4096, 13696, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 256, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert swiglu_path(x) == "triton"
    mlp(x).float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
