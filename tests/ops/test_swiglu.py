"""glmkit.ops.swiglu and its fused kernels (glmkit.kernels.swiglu) against the torch reference, and the SwiGLU
``glmkit.layers.MLP`` on both backends.

CPU: the Triton interpreter at odd sizes (I = 1, 33, 100, 300: not multiples of the block), fp32 and fp16, forward and
backward with NaN-poisoned allocations (the ``poison`` fixture). ``-m gpu``: natively, fp32/fp16/bf16, GLM-4 sizes.
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend, use_backend
from glmkit.kernels.swiglu import swiglu_bwd, swiglu_fwd
from glmkit.layers import MLP
from glmkit.ops.swiglu import swiglu, swiglu_reference
from glmkit.testing import assert_close

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _inputs(lead, I, dtype, device=DEV, key=()):
    g = torch.Generator().manual_seed(zlib.crc32(repr((lead, I, dtype, key)).encode()) % 100_000)
    gate_up = (torch.randn(*lead, 2 * I, generator=g) * 3).to(device, dtype)
    dy = torch.randn(*lead, I, generator=g).to(device, dtype)
    return gate_up, dy


def _ref_grad(gate_up, dy, limit=None):
    x = gate_up.detach().float().requires_grad_()
    swiglu_reference(x, limit).backward(dy.float())
    return x.grad


CASES = [
    ((7,), 33, torch.float32),
    ((3,), 100, torch.float32),
    ((1,), 1, torch.float32),
    ((2, 5), 64, torch.float32),
    ((4,), 300, torch.float32),
    ((7,), 33, torch.float16),
    ((2, 3), 100, torch.float16),
]


@pytest.mark.parametrize("lead,I,dtype", CASES)
def test_forward_backward_match_reference(lead, I, dtype, poison):
    gate_up, dy = _inputs(lead, I, dtype)
    y = swiglu_fwd(gate_up)
    assert y.shape == (*lead, I) and y.dtype == dtype
    assert_close(f"swiglu fwd {lead} I={I} {dtype}", swiglu_reference(gate_up), y)
    d = swiglu_bwd(dy, gate_up)
    assert d.shape == gate_up.shape and d.dtype == dtype
    assert_close(f"swiglu bwd {lead} I={I} {dtype}", _ref_grad(gate_up, dy), d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_autograd_on_strided_view(dtype, poison):
    """gate_up as a column slice of a wider tensor (row stride 2I + 4), through autograd on the "triton" backend."""
    I = 45
    base, dy = _inputs((6,), I + 2, dtype, key="strided")
    leaf = base.detach().clone().requires_grad_()
    gate_up = leaf[:, : 2 * I]
    with use_backend("triton"), backend.audit() as a:
        y = swiglu(gate_up)
    assert a.paths("swiglu") == {"triton"}
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
    hb = h.bfloat16()
    assert swiglu_reference(hb).dtype == torch.bfloat16
    assert_close("bf16 reference, fp32 inside", swiglu_reference(hb.float()), swiglu_reference(hb))


def test_mlp_module_both_backends():
    """MLP = down(silu(gate(x)) · up(x)) with the fused gate_up_proj (gate rows first): same values and gradients
    on both backends, and equal to the formula written with the two halves of the weight."""
    mlp = MLP(24, 40).to(DEV)
    x = torch.randn(2, 5, 24, device=DEV)
    gate_w, up_w = mlp.gate_up_proj.weight.detach().chunk(2, 0)
    want = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ mlp.down_proj.weight.detach().T
    res = {}
    for name in ("torch", "triton"):
        mlp.zero_grad()
        xi = x.clone().requires_grad_()
        with use_backend(name), backend.audit() as a:
            y = mlp(xi)
        assert a.paths("swiglu") == {name}
        assert_close(f"mlp formula ({name})", want, y.detach())
        y.pow(2).sum().backward()
        res[name] = [y.detach(), xi.grad] + [p.grad.clone() for p in mlp.parameters()]
    assert len(res["torch"]) == 4
    for a, b in zip(res["torch"], res["triton"]):
        assert_close("mlp torch vs triton", a, b)


# ---- clamped SwiGLU (glm5_next's swiglu_limit) ----


def _clamped_inputs(lead, I, limit, dtype, device=DEV):
    """gate_up of std 3 (about half of it beyond ±limit = 2), with some entries exactly at ±limit (the gradient
    passes there, as through torch's clamp)."""
    gate_up, dy = _inputs(lead, I, dtype, device, key=("clamp", limit))
    flat = gate_up.view(-1, 2 * I)
    flat[:, 0], flat[:, I] = limit, -limit
    flat[0, 1], flat[0, I + 1] = -limit, limit
    return gate_up, dy


@pytest.mark.parametrize(
    "lead,I,dtype", [((7,), 33, torch.float32), ((2, 5), 64, torch.float16), ((3,), 9, torch.float32)]
)
def test_clamped_forward_backward_match_reference(lead, I, dtype, poison):
    """The reference against the formula written here (gate clamped from above only, up on both sides), and the
    kernel against the reference, forward and backward (zero gradient where a value was clamped)."""
    limit = 2.0
    gate_up, dy = _clamped_inputs(lead, I, limit, dtype)
    gate, up = gate_up.float().chunk(2, -1)
    assert (gate > limit).any() and (gate < -limit).any() and (up.abs() > limit).any()
    want = F.silu(torch.minimum(gate, torch.tensor(limit))) * torch.maximum(
        torch.minimum(up, torch.tensor(limit)), torch.tensor(-limit)
    )
    assert_close("clamped reference vs the formula", want.to(dtype), swiglu_reference(gate_up, limit))
    assert_close("clamped fwd", swiglu_reference(gate_up, limit), swiglu_fwd(gate_up, limit))
    grad = _ref_grad(gate_up, dy, limit)
    g_ref, u_ref = grad.chunk(2, -1)
    assert (g_ref[gate > limit] == 0).all() and (u_ref[up.abs() > limit] == 0).all()
    assert (g_ref[gate < -limit] != 0).any()  # the gate is not clamped from below
    assert_close("clamped bwd", grad, swiglu_bwd(dy, gate_up, limit))
    assert not torch.equal(swiglu_fwd(gate_up, limit), swiglu_fwd(gate_up))


def test_clamped_mlp_matches_glm5_next():
    """glmkit's MLP with swiglu_limit against transformers' Glm5NextTextMLP (separate gate_proj / up_proj, fused
    here gate first), forward and input gradient, on both backends."""
    pytest.importorskip("transformers")
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextMLP

    cfg = Glm5NextTextConfig(
        vocab_size=64, hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=2,
        index_topk=16, swiglu_limit=1.5, pad_token_id=0,
    )  # fmt: skip
    hf = Glm5NextTextMLP(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.5)  # pre-activations of std ~2.5: the clamp bites
    mlp = MLP(24, 40, swiglu_limit=1.5)
    sd = {
        "down_proj.weight": hf.down_proj.weight,
        "gate_up_proj.weight": torch.cat((hf.gate_proj.weight, hf.up_proj.weight)),
    }
    mlp.load_state_dict(sd)
    x = torch.randn(3, 7, 24)
    xa = x.clone().requires_grad_()
    want = hf(xa)
    want.sum().backward()
    assert (hf.gate_proj(x).abs() > 1.5).float().mean() > 0.2
    for name in ("torch", "triton"):
        xb = x.clone().requires_grad_()
        with use_backend(name):
            got = mlp(xb)
        got.sum().backward()
        assert_close(f"glm5_next MLP ({name})", want.detach(), got.detach())
        assert_close(f"glm5_next MLP dx ({name})", xa.grad, xb.grad)
    with pytest.raises(ValueError, match="limit"):
        MLP(8, 8, swiglu_limit=0)
    with pytest.raises(ValueError, match="limit"):
        swiglu(torch.randn(2, 8), limit=float("inf"))


def test_bad_inputs_are_named():
    for fn in (swiglu, swiglu_reference):
        with pytest.raises(ValueError, match="even"):
            fn(torch.randn(3, 7))
        with pytest.raises(ValueError, match="gate_up"):
            fn(torch.randn(3, 0))
        with pytest.raises(TypeError, match="gate_up"):
            fn(torch.randn(3, 8).long())


# ---- native, on the H200 ----


@pytest.mark.gpu
@pytest.mark.parametrize("rows,I", [(4096, 13696), (1000, 10944), (257, 1536), (3, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_forward_backward(rows, I, dtype, poison):
    gate_up, dy = _inputs((rows,), I, dtype, device="cuda")
    y = swiglu_fwd(gate_up)
    assert_close(f"fwd {rows}x{I} {dtype}", swiglu_reference(gate_up), y)
    d = swiglu_bwd(dy, gate_up)
    assert_close(f"bwd {rows}x{I} {dtype}", _ref_grad(gate_up, dy), d)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_clamped_forward_backward(dtype, poison):
    gate_up, dy = _clamped_inputs((1000,), 10944, 2.0, dtype, device="cuda")
    assert_close(f"clamped fwd {dtype}", swiglu_reference(gate_up, 2.0), swiglu_fwd(gate_up, 2.0))
    assert_close(f"clamped bwd {dtype}", _ref_grad(gate_up, dy, 2.0), swiglu_bwd(dy, gate_up, 2.0))


@pytest.mark.gpu
def test_gpu_mlp_bf16_uses_kernel():
    mlp = MLP(4096, 13696).to("cuda", torch.bfloat16)
    x = torch.randn(2, 256, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with backend.audit() as a:
        y = mlp(x)
    assert a.paths("swiglu") == {"triton"}
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all()
