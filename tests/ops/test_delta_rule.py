"""glmkit.ops.delta_rule and its kernels (glmkit.kernels.delta_rule): the lineage, the chunkwise form, the kernels.

(a) Each step of the lineage against the next with its extra freedom switched off: linear attention is DeltaNet
with keys that never interfere; DeltaNet is Gated DeltaNet with g = 0; Gated DeltaNet is KDA with the same decay on
every channel; the papers' state convention is fla's transposed. (b) The chunkwise reference against the recurrent
one in fp64 (odd lengths, several chunk sizes, initial and final state, gradients of the torch path). (c) The
chunked kernels against the recurrent reference, forward and backward (dq, dk, dv, dg, dbeta, d initial state),
under the Triton interpreter in fp32/fp16 at small odd shapes (chunk 32 = two sub-chunks there), every output
allocated NaN-poisoned. (d) The decode kernel against the recurrence. (e) ``-m gpu``: natively in fp32/fp16/bf16
at model sizes (K = V = 128, chunk 64), and against fla-core when it is installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import glmkit.kernels  # noqa: F401  (sets TRITON_INTERPRET=1 on machines without CUDA)
from glmkit import backend
from glmkit.ops.delta_rule import (
    chunk_gated_delta_rule_reference,
    delta_rule_reference,
    gated_delta_rule,
    gated_delta_rule_reference,
    gated_delta_rule_step,
    linear_attention_reference,
)
from glmkit.testing import REL_TOL, assert_close, rel_err

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _inputs(B, T, H, K, V, gate, dtype=torch.float32, device="cpu", decay=1.0, h0=True):
    """Random q, k (L2-normalised, as the layers feed them), v, beta ∈ (0, 1), a log-decay g ≤ 0 ([B, T, H]
    for gate "scalar", [B, T, H, K] for "channel"; ``decay`` scales it) and an fp32 initial state or None."""
    q = torch.randn(B, T, H, K, device=device)
    k = F.normalize(torch.randn(B, T, H, K, device=device), dim=-1)
    v = torch.randn(B, T, H, V, device=device)
    beta = torch.rand(B, T, H, device=device)
    shape = (B, T, H) if gate == "scalar" else (B, T, H, K)
    g = decay * F.logsigmoid(torch.randn(shape, device=device) + 2.0)
    s0 = torch.randn(B, H, K, V, device=device) if h0 else None
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype), s0


def _fp64(*ts):
    return [None if t is None else t.double() for t in ts]


# ---- (a) the lineage, step by step --------------------------------------------------------------------------


def test_delta_rule_with_orthogonal_keys_is_linear_attention():
    """Keys that never overlap leave nothing to correct: Hᵀk_t = 0, u = β v, and with β = 1 the delta rule
    writes exactly what linear attention writes. Overlapping keys make them differ."""
    B, T, H, K, V = 2, 6, 2, 8, 5
    q, _, v, _, _, _ = _inputs(B, T, H, K, V, "scalar", h0=False)
    basis = torch.linalg.qr(torch.randn(B, H, K, K))[0]  # orthonormal columns
    k = basis[..., :T].permute(0, 3, 1, 2).contiguous()  # k_t = column t: [B, T, H, K]
    ones = torch.ones(B, T, H)
    o_lin, s_lin = linear_attention_reference(q, k, v, output_final_state=True)
    o_delta, s_delta = delta_rule_reference(q, k, v, ones, output_final_state=True)
    assert_close("o", o_lin, o_delta, tol=1e-6)
    assert_close("state", s_lin, s_delta, tol=1e-6)
    k_overlap = F.normalize(k + 0.5 * k.roll(1, dims=1), dim=-1)
    o_delta2, _ = delta_rule_reference(q, k_overlap, v, ones)
    o_lin2, _ = linear_attention_reference(q, k_overlap, v)
    assert (o_delta2 - o_lin2).abs().max() > 0.1


@pytest.mark.parametrize("initial", [False, True])
def test_gated_delta_rule_with_zero_gate_is_delta_rule(initial):
    q, k, v, _, beta, s0 = _inputs(2, 19, 2, 8, 6, "scalar", h0=initial)
    o_d, s_d = delta_rule_reference(q, k, v, beta, initial_state=s0, output_final_state=True)
    o_g, s_g = gated_delta_rule_reference(
        q, k, v, torch.zeros(2, 19, 2), beta, initial_state=s0, output_final_state=True
    )
    assert_close("o", o_d, o_g, tol=1e-6)
    assert_close("state", s_d, s_g, tol=1e-6)


def test_kda_with_a_channel_constant_gate_is_gated_deltanet():
    q, k, v, g, beta, s0 = _inputs(2, 19, 2, 8, 6, "scalar")
    g_channels = g[..., None].expand(-1, -1, -1, 8)
    o_s, s_s = gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_c, s_c = gated_delta_rule_reference(q, k, v, g_channels, beta, initial_state=s0, output_final_state=True)
    assert_close("o", o_s, o_c, tol=1e-6)
    assert_close("state", s_s, s_c, tol=1e-6)
    g_varied = g_channels + 0.3 * torch.linspace(-1, 0, 8)  # channels fading at their own rates
    o_v, _ = gated_delta_rule_reference(q, k, v, g_varied, beta, initial_state=s0)
    assert (o_v - o_s).abs().max() > 1e-2


def test_paper_convention_is_the_transposed_state():
    """The papers' S_t = S_{t−1} α_t (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t, with S = Hᵀ [V, K]."""
    B, T, H, K, V = 1, 11, 2, 6, 4
    q, k, v, g, beta, s0 = _fp64(*_inputs(B, T, H, K, V, "scalar"))
    S, eye, outs = s0.transpose(-1, -2).clone(), torch.eye(K, dtype=torch.float64), []
    for t in range(T):
        kt, a, b = k[:, t], g[:, t].exp()[..., None, None], beta[:, t, :, None, None]
        S = S @ (a * (eye - b * kt[..., :, None] * kt[..., None, :])) + b * v[:, t, :, :, None] * kt[..., None, :]
        outs.append((S @ (q[:, t] * K**-0.5)[..., None])[..., 0])
    o_ref, s_ref = gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert_close("o", o_ref, torch.stack(outs, 1), tol=1e-12)
    assert_close("state", s_ref, S.transpose(-1, -2), tol=1e-12)


# ---- (b) chunkwise reference vs recurrent -------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("chunk_size,T", [(8, 37), (16, 16), (64, 37), (16, 70)])
def test_chunk_reference_matches_recurrent(gate, chunk_size, T):
    q, k, v, g, beta, s0 = _fp64(*_inputs(2, T, 2, 8, 6, gate, decay=3.0))
    o_r, s_r = gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o_c, s_c = chunk_gated_delta_rule_reference(q, k, v, g, beta, None, s0, True, chunk_size=chunk_size)
    assert_close("o", o_r, o_c, tol=1e-12)
    assert_close("state", s_r, s_c, tol=1e-12)


@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_torch_path_gradients_match_recurrent(gate):
    """The torch path of ``gated_delta_rule`` is the chunk reference; autograd through it (the triangular
    solve included) gives the recurrence's gradients, in fp32."""
    ins = _inputs(1, 45, 2, 8, 6, gate)
    a = [t.clone().requires_grad_() for t in ins]
    b = [t.clone().requires_grad_() for t in ins]
    with backend.use_backend("torch"):
        o1, s1 = gated_delta_rule(*a[:5], initial_state=a[5], output_final_state=True)
    o2, s2 = gated_delta_rule_reference(*b[:5], initial_state=b[5], output_final_state=True)
    do, ds = torch.randn_like(o1), torch.randn_like(s1)
    torch.autograd.backward((o1, s1), (do, ds))
    torch.autograd.backward((o2, s2), (do, ds))
    assert_close("o", o2, o1)
    for name, x, y in zip(("q", "k", "v", "g", "beta", "h0"), b, a):
        assert_close(f"d{name}", x.grad, y.grad, tol=1e-5)


# ---- (c) the chunked kernels, forward and backward ------------------------------------------------------------


def _check_kernels(B, T, H, K, V, gate, dtype, device, h0=True, final=True, decay=1.0, tol=None):
    """gated_delta_rule on the kernels vs autograd through the recurrent reference (fp32 inputs upcast from
    the same low-precision values): o, final state, and every gradient. In fp16/bf16 the gradients get twice the
    output's budget: they pass through the recomputed forward's rounded intermediates and then the backward's."""
    q, k, v, g, beta, s0 = _inputs(B, T, H, K, V, gate, dtype, device, decay=decay, h0=h0)
    ins = [q, k, v, g, beta, s0]
    ker = [None if t is None else t.clone().requires_grad_() for t in ins]
    ref = [None if t is None else t.detach().float().requires_grad_() for t in ins]
    with backend.use_backend("triton"), backend.audit() as audit:
        o, s = gated_delta_rule(*ker[:5], initial_state=ker[5], output_final_state=final)
    assert audit.paths("delta_rule") == {"triton"}
    o_ref, s_ref = gated_delta_rule_reference(*ref[:5], initial_state=ref[5], output_final_state=final)
    do = torch.randn_like(o_ref)
    ds = torch.randn_like(s_ref) if final else None
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    tol = REL_TOL[dtype] if tol is None else tol
    assert_close("o", o_ref, o, tol)
    if final:
        assert s.dtype == torch.float32
        assert_close("final state", s_ref, s, tol)
        torch.autograd.backward((o, s), (do.to(dtype), ds))
        torch.autograd.backward((o_ref, s_ref), (do, ds))
    else:
        assert s is None
        o.backward(do.to(dtype))
        o_ref.backward(do)
    grad_tol = tol if dtype == torch.float32 else 2 * tol
    for name, x, y in zip(("q", "k", "v", "g", "beta", "initial state"), ref, ker):
        if x is not None:
            assert y.grad.dtype == y.dtype
            assert_close(f"d{name}", x.grad, y.grad, grad_tol)


@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernels_match_reference(poison, gate, dtype):
    """T = 45: a full chunk and a partial one; K = 32 and V = 16 cross the 16-wide K blocks."""
    _check_kernels(2, 45, 2, 32, 16, gate, dtype, "cpu")


@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("T", [70, 7])
def test_kernels_without_states(poison, gate, T):
    """No initial state, no final state (the state kernels' other branches); three chunks, or less than one;
    V blocks of 16."""
    _check_kernels(1, T, 1, 16, 32, gate, torch.float32, "cpu", h0=False, final=False)


@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_kernels_strong_decay(poison, gate):
    """Decays down to exp(−30) per token: the sub-chunk factorisation keeps every exponential ≤ 1."""
    _check_kernels(1, 40, 1, 16, 16, gate, torch.float32, "cpu", decay=30.0)


def test_dispatch_paths_and_validation():
    q, k, v, g, beta, s0 = _inputs(1, 5, 1, 16, 16, "scalar")
    with backend.audit() as audit:
        gated_delta_rule(q, k, v, g, beta)
    assert audit.paths("delta_rule") == {"torch"}  # CPU tensors, backend "auto"
    with pytest.raises(ValueError, match="g must be"):
        gated_delta_rule(q, k, v, g[..., None], beta)
    with pytest.raises(ValueError, match="beta must be"):
        gated_delta_rule(q, k, v, g, beta[..., None])
    with pytest.raises(TypeError, match="initial_state must be a float32"):
        gated_delta_rule(q, k, v, g, beta, initial_state=s0.half())
    with pytest.raises(TypeError, match="share one dtype"):
        gated_delta_rule(q, k.half(), v, g, beta)
    with backend.use_backend("triton"), pytest.raises(ValueError, match="the kernels take"):
        gated_delta_rule(q[..., :8], k[..., :8], v, g, beta)


# ---- (d) decode ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("T", [1, 3])
def test_decode_step_matches_recurrence(poison, gate, T):
    q, k, v, g, beta, s0 = _inputs(2, T, 2, 16, 32, gate)
    state = s0.clone()
    with backend.use_backend("triton"), backend.audit() as audit:
        o = gated_delta_rule_step(q, k, v, g, beta, state)
    assert audit.paths("delta_rule_step") == {"triton"}
    o_ref, s_ref = gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert_close("o", o_ref, o)
    assert_close("state (in place)", s_ref, state)
    state_t = s0.clone()
    with backend.use_backend("torch"):
        assert_close("o, torch path", o_ref, gated_delta_rule_step(q, k, v, g, beta, state_t))
    assert_close("state, torch path", s_ref, state_t)


# ---- (e) on the GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "gate,dtype",
    [
        ("scalar", torch.float32),
        ("channel", torch.float32),
        ("scalar", torch.bfloat16),
        ("channel", torch.bfloat16),
        ("scalar", torch.float16),
    ],
)
def test_kernels_gpu(gate, dtype):
    """Model sizes: K = V = 128, chunk 64, T = 300 (four full chunks and a partial one), B·H = 8. (Each dtype and
    gate kind compiles and autotunes its own kernels: fp16 is checked on one gate kind.)"""
    _check_kernels(2, 300, 4, 128, 128, gate, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_kernels_gpu_other_sizes_and_long(gate):
    """K = 64, V = 32 (blocks wider than the head) in fp32 with no states, then a long bf16 sequence (T = 4100)
    forward against the fp32 chunk reference."""
    _check_kernels(3, 129, 2, 64, 32, gate, torch.float32, "cuda", h0=False, final=False)
    q, k, v, g, beta, s0 = _inputs(1, 4100, 2, 128, 128, gate, torch.bfloat16, "cuda")
    with torch.no_grad():
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
        o_ref, s_ref = chunk_gated_delta_rule_reference(*[t.float() for t in (q, k, v, g, beta)], None, s0, True)
    assert_close("o, T = 4100", o_ref, o)
    assert_close("state, T = 4100", s_ref, s, tol=REL_TOL[torch.bfloat16])  # fp32 state from bf16 inputs


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["scalar", "channel"])
@pytest.mark.parametrize("B,H", [(1, 16), (32, 16), (128, 64)])
def test_decode_gpu(gate, B, H):
    q, k, v, g, beta, s0 = _inputs(B, 1, H, 128, 128, gate, torch.bfloat16, "cuda")
    state = s0.clone()
    o = gated_delta_rule_step(q, k, v, g, beta, state)
    o_ref, s_ref = gated_delta_rule_reference(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    assert_close("o", o_ref, o)
    assert_close("state", s_ref, state, tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["scalar", "channel"])
def test_forward_matches_fla_gpu(gate):
    """Same inputs through fla-core's chunk_gated_delta_rule / chunk_kda (skipped when fla is not installed):
    both against the fp32 reference, ours no worse than fla's error by more than 1.5×."""
    if gate == "scalar":
        fla_op = pytest.importorskip("fla.ops.gated_delta_rule").chunk_gated_delta_rule
    else:
        fla_op = pytest.importorskip("fla.ops.kda").chunk_kda
    q, k, v, g, beta, s0 = _inputs(2, 1000, 4, 128, 128, gate, torch.bfloat16, "cuda")
    with torch.no_grad():
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
        o_fla = fla_op(q, k, v, g, beta, initial_state=s0.clone(), output_final_state=True)[0]
        o_ref, s_ref = chunk_gated_delta_rule_reference(*[t.float() for t in (q, k, v, g, beta)], None, s0, True)
    err, err_fla = rel_err(o_ref, o), rel_err(o_ref, o_fla)
    assert err <= max(1.5 * err_fla, 1e-3), f"ours {err:.2e} vs fla {err_fla:.2e}"
    assert_close("state", s_ref, s, tol=REL_TOL[torch.bfloat16])  # fp32 state from bf16 inputs
