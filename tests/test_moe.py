"""glmkit.moe: router semantics, load balancing, the MoE layer (routed experts + the shared MLP), HF glm4_moe parity.

The experts' computation itself (loop, sorted, kernels) is tested in tests/ops/test_moe_experts.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glmkit.moe import (
    MoE,
    SigmoidGroupRouter,
    SoftmaxTopKRouter,
    expert_load,
    max_violation,
    sequence_aux_loss,
    sigmoid_topk_route,
    update_bias,
)
from glmkit.ops.moe_experts import moe_experts_reference
from glmkit.testing import assert_close, rel_err

FP32 = 1e-5


# ---------------------------------------------------------------------------------------------- routers


def test_bias_changes_selection_not_weights():
    N, E, k, scale = 64, 16, 4, 2.5
    logits = torch.randn(N, E)
    idx0, w0, s0 = sigmoid_topk_route(logits, torch.zeros(E), k, routed_scaling_factor=scale)
    # A large bias on experts 0..3 forces them into every token's selection ...
    bias = torch.zeros(E)
    bias[:k] = 10.0
    idx1, w1, s1 = sigmoid_topk_route(logits, bias, k, routed_scaling_factor=scale)
    assert (idx1.sort(-1).values == torch.arange(k)).all()
    assert not torch.equal(idx0.sort(-1).values, idx1.sort(-1).values)
    # ... but the scores are unbiased and the weights are the unbiased scores of the chosen experts.
    assert torch.equal(s0, s1) and torch.equal(s1, logits.sigmoid())
    expect = s1.gather(1, idx1)
    torch.testing.assert_close(w1, expect / expect.sum(-1, keepdim=True) * scale)
    # A constant shift of the whole bias changes nothing at all.
    idx2, w2, _ = sigmoid_topk_route(logits, torch.full((E,), -0.7), k, routed_scaling_factor=scale)
    o0, o2 = idx0.sort(-1), idx2.sort(-1)
    assert torch.equal(o0.values, o2.values)
    torch.testing.assert_close(w0.gather(1, o0.indices), w2.gather(1, o2.indices))


@pytest.mark.parametrize("norm", [True, False])
def test_weights_normalised_and_scaled(norm):
    logits = torch.randn(33, 12)
    idx, w, s = sigmoid_topk_route(logits, 0.1 * torch.randn(12), 3, norm_topk_prob=norm, routed_scaling_factor=2.5)
    if norm:
        torch.testing.assert_close(w.sum(-1), torch.full((33,), 2.5))
    else:
        torch.testing.assert_close(w, 2.5 * s.gather(1, idx))
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token


@pytest.mark.parametrize("n_group,topk_group,k", [(4, 2, 4), (8, 3, 5), (4, 1, 2), (2, 2, 6)])
def test_group_limited_routing_bruteforce(n_group, topk_group, k):
    N, E = 97, 32
    logits, bias = torch.randn(N, E), 0.3 * torch.randn(E)
    idx, w, s = sigmoid_topk_route(logits, bias, k, n_group, topk_group)
    choice = (logits.sigmoid() + bias).tolist()
    gsize = E // n_group
    for t in range(N):
        group_score = [sum(sorted(choice[t][g * gsize : (g + 1) * gsize], reverse=True)[:2]) for g in range(n_group)]
        top_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(E) if e // gsize in top_groups]
        chosen = set(idx[t].tolist())
        assert chosen <= set(allowed), f"token {t}: chose experts outside groups {top_groups}"
        assert chosen == set(sorted(allowed, key=lambda e: -choice[t][e])[:k])


def test_group_limited_is_a_noop_with_one_group():
    logits, bias = torch.randn(40, 16), 0.2 * torch.randn(16)
    a = sigmoid_topk_route(logits, bias, 4, 1, 1)
    b = sigmoid_topk_route(logits, bias, 4, 4, 4)  # all groups kept: same selection
    assert torch.equal(a[0].sort(-1).values, b[0].sort(-1).values)


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk_vs_manual(norm):
    router = SoftmaxTopKRouter(24, 10, 3, norm_topk_prob=norm)
    x = torch.randn(2, 9, 24)
    idx, w, p = router(x)
    logits = x.reshape(-1, 24) @ router.weight.T
    for t in range(18):
        probs = [math.exp(v) for v in logits[t].tolist()]
        probs = [q / sum(probs) for q in probs]
        top = sorted(range(10), key=lambda e: -probs[e])[:3]
        ww = [probs[e] for e in top]
        if norm:
            ww = [q / sum(ww) for q in ww]
        assert idx[t].tolist() == top
        torch.testing.assert_close(w[t], torch.tensor(ww), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.sum(-1), torch.ones(18))


def test_router_validation():
    with pytest.raises(ValueError, match="n_group"):
        SigmoidGroupRouter(8, 10, 2, n_group=4)
    with pytest.raises(ValueError, match="top_k"):
        SigmoidGroupRouter(8, 16, 9, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="topk_group"):
        SigmoidGroupRouter(8, 16, 2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="top_k"):
        SoftmaxTopKRouter(8, 4, 5)
    with pytest.raises(ValueError, match="hidden"):
        SigmoidGroupRouter(8, 16, 2)(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating"):
        SigmoidGroupRouter(8, 16, 2)(torch.ones(3, 8, dtype=torch.int64))


def test_bias_buffer_stays_fp32():
    r = SigmoidGroupRouter(8, 16, 2).to(torch.bfloat16)
    assert r.weight.dtype == torch.bfloat16 and r.e_score_correction_bias.dtype == torch.float32
    idx, w, _ = r(torch.randn(5, 8, dtype=torch.bfloat16))
    assert w.dtype == torch.float32 and "e_score_correction_bias" in r.state_dict()


# --------------------------------------------------------------------------------------- load balancing


def _simulate(gamma, steps=150, E=16, k=2, N=512, H=32):
    """Routing under a fixed per-expert skew (as a badly initialised or collapsing router would have);
    returns MaxVio per step."""
    W = torch.randn(E, H) / H**0.5
    skew = torch.linspace(-2, 2, E)  # expert 15 is favoured by ~4 logits over expert 0
    bias, hist = torch.zeros(E), []
    for _ in range(steps):
        idx, _, _ = sigmoid_topk_route(torch.randn(N, H) @ W.T + skew, bias, k)
        load = expert_load(idx, E)
        hist.append(max_violation(load))
        update_bias(bias, load, gamma)
    return hist, load


def test_update_bias_balances_a_skewed_router():
    bal, load_bal = _simulate(gamma=0.01)
    col, load_col = _simulate(gamma=0.0)
    assert bal[0] > 2.5 and col[0] > 2.5  # both start badly skewed
    assert sum(bal[-20:]) / 20 < 0.5  # converged near uniform
    assert sum(bal[-20:]) < sum(bal[:20]) / 5
    assert min(col) > 2.5 and (load_col == 0).any()  # without it: stays collapsed, dead experts
    assert (load_bal > 0).all()


def test_update_bias_step():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10.0, 2.0, 5.0, 3.0]), 0.1)  # mean 5
    torch.testing.assert_close(bias, torch.tensor([-0.1, 0.1, 0.0, 0.1]))
    with pytest.raises(ValueError, match="bias and load"):
        update_bias(bias, torch.ones(5), 0.1)


def test_expert_load_and_max_violation():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert expert_load(idx, 4).tolist() == [3.0, 2.0, 1.0, 0.0]
    assert max_violation(torch.ones(8)) == 0.0
    assert max_violation(torch.tensor([8.0, 0, 0, 0])) == pytest.approx(3.0)


def test_sequence_aux_loss():
    B, T, E, k, alpha = 3, 16, 8, 2, 1e-3
    # Uniform: every expert picked equally often and uniform scores → α.
    idx = torch.arange(T * k).remainder(E).view(1, T, k).expand(B, -1, -1)
    assert sequence_aux_loss(torch.full((B, T, E), 0.3), idx, alpha).item() == pytest.approx(alpha)
    # Collapse onto experts 0 and 1 with the scores agreeing → α·E/k.
    scores = torch.full((B, T, E), 1e-6)
    scores[..., :2] = 1.0
    loss = sequence_aux_loss(scores, torch.tensor([0, 1]).expand(B, T, k), alpha)
    assert loss.item() == pytest.approx(alpha * E / k, rel=1e-4)
    # Against a per-sequence loop, and differentiable in the scores.
    s = torch.rand(B, T, E, requires_grad=True)
    idx = torch.rand(B, T, E).topk(k, -1).indices
    loss = sequence_aux_loss(s, idx, alpha)
    ref = 0.0
    for b in range(B):
        sn = s[b] / s[b].sum(-1, keepdim=True)
        f = torch.bincount(idx[b].reshape(-1), minlength=E).float() * E / (k * T)
        ref = ref + alpha * (f * sn.mean(0)).sum()
    torch.testing.assert_close(loss, ref / B)
    loss.backward()
    assert s.grad.abs().sum() > 0
    torch.testing.assert_close(sequence_aux_loss(s[0], idx[0], alpha), sequence_aux_loss(s[:1], idx[:1], alpha))


# --------------------------------------------------------------------------------------------- MoE layer


def _moe(**kw):
    args = dict(
        hidden_size=32,
        n_experts=8,
        top_k=2,
        moe_intermediate_size=16,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        init_std=0.2,
    )
    args.update(kw)
    return MoE(**args)


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_moe_layer_is_routed_plus_shared(router, n_shared):
    kw = {} if router == "sigmoid" else dict(n_group=1, topk_group=1)
    moe = _moe(router=router, n_shared_experts=n_shared, **kw)
    x = torch.randn(3, 11, 32)
    y = moe(x)
    assert y.shape == x.shape
    flat = x.reshape(-1, 32)
    idx, w, _ = moe.gate(flat)
    ref = moe_experts_reference(flat, idx, w, moe.experts.gate_up_proj, moe.experts.down_proj)
    if n_shared:  # one SwiGLU MLP of width I · n_shared, gate and up fused (gate rows first)
        sh = moe.shared_experts
        assert sh.gate_up_proj.weight.shape == (2 * 16 * n_shared, 32)
        gate, up = sh.gate_up_proj.weight.chunk(2, 0)
        ref = ref + sh.down_proj(F.silu(flat @ gate.T) * (flat @ up.T))
    else:
        assert moe.shared_experts is None
    assert_close("moe", ref.view_as(x), y, FP32)
    moe.experts.impl = "loop"
    assert_close("moe loop", ref.view_as(x), moe(x), FP32)


def test_moe_backward_reaches_router_and_experts():
    moe = _moe(aux_loss_alpha=1e-2).train()
    x = torch.randn(2, 9, 32, requires_grad=True)
    (moe(x).square().mean() + moe.aux_loss).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert moe.gate.e_score_correction_bias.grad is None


def test_moe_load_stats_and_bias_hook():
    moe = _moe()
    x = torch.randn(4, 10, 32)
    moe.eval()
    moe(x)
    assert moe.load_accum.sum() == 0 and moe.aux_loss is None  # eval never touches the stats
    moe.train()
    moe(x)
    first = moe.load_last.clone()
    assert first.sum() == 40 * 2 and torch.equal(first, moe.load_accum)
    moe(x[:1])
    assert moe.load_last.sum() == 10 * 2 and moe.load_accum.sum() == 100
    assert torch.equal(moe.load_accum, first + moe.load_last)
    assert torch.equal(moe.load_last, expert_load(moe.gate(x[:1])[0], 8))
    load = moe.load_accum.clone()
    bias_before = moe.gate.e_score_correction_bias.clone()
    returned = moe.update_bias(0.05)
    assert torch.equal(returned, load)
    step = moe.gate.e_score_correction_bias - bias_before
    torch.testing.assert_close(step, 0.05 * torch.sign(load.mean() - load))
    assert moe.load_accum.sum() == 0
    assert "load_accum" not in moe.state_dict() and "gate.e_score_correction_bias" in moe.state_dict()
    sm = _moe(router="softmax", n_group=1).train()
    sm(x)
    assert sm.update_bias(0.1).sum() == 80  # softmax router: stats only, no bias


def test_moe_bias_hook_balances_a_skewed_layer():
    """End to end through the layer: forward in training mode, then ``update_bias`` after each "step"."""
    moe = _moe(n_experts=8, n_group=1, routed_scaling_factor=1.0).train()
    u = F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():  # router skewed along u; the inputs lean along u too
        moe.gate.weight.add_(torch.linspace(-2, 2, 8)[:, None] * u)
    vio = []
    for _ in range(60):
        moe(torch.randn(256, 32) + u)
        vio.append(max_violation(moe.update_bias(0.02)))
    assert vio[0] > 1.0 and sum(vio[-10:]) / 10 < 0.4 * vio[0]


def test_moe_bf16():
    moe = _moe().to(torch.bfloat16)
    x = torch.randn(2, 5, 32)
    ref = _moe()
    ref.load_state_dict(moe.state_dict())
    assert moe.gate.e_score_correction_bias.dtype == torch.float32 and moe.load_accum.dtype == torch.float32
    assert_close("bf16 moe", ref.float()(x), moe(x.bfloat16()))
    moe.train().reset_load()
    for _ in range(3):
        moe(torch.randn(100, 32, dtype=torch.bfloat16))
    assert moe.load_accum.sum().item() == 3 * 100 * 2  # exact counts past bf16's 256


def test_moe_validation():
    with pytest.raises(ValueError, match="router"):
        _moe(router="relu")
    with pytest.raises(ValueError, match="hidden"):
        _moe()(torch.randn(3, 31))
    with pytest.raises(TypeError, match="floating"):
        _moe()(torch.ones(3, 32, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------- HF parity


def _hf():
    return pytest.importorskip("transformers", reason="transformers not installed (the dev extra): no HF parity")


@pytest.mark.parametrize("n_group,topk_group,k,scale", [(1, 1, 3, 2.5), (4, 2, 3, 1.0), (4, 1, 2, 2.5)])
def test_parity_with_hf_glm4_moe(n_group, topk_group, k, scale):
    transformers = _hf()
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    cfg = transformers.Glm4MoeConfig(
        hidden_size=48,
        moe_intermediate_size=24,
        n_routed_experts=16,
        num_experts_per_tok=k,
        n_shared_experts=1,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
        norm_topk_prob=True,
    )
    hf = Glm4MoeMoE(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    hf.gate.e_score_correction_bias.normal_(std=0.1)  # a trained model's bias is non-zero
    mine = MoE(
        48,
        16,
        k,
        24,
        n_shared_experts=1,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=scale,
        norm_topk_prob=True,
    )
    sd = hf.state_dict()  # HF's names and layouts, but the shared
    gate, up = sd.pop("shared_experts.gate_proj.weight"), sd.pop("shared_experts.up_proj.weight")
    sd["shared_experts.gate_up_proj.weight"] = torch.cat((gate, up))  # expert's gate and up fused, gate first
    mine.load_state_dict(sd, strict=True)
    x = torch.randn(3, 13, 48)
    # Router: same expert sets and weights.
    _, w_hf, idx_hf = hf.gate(x)
    idx, w, _ = mine.gate(x)
    o_hf, o = idx_hf.sort(-1), idx.sort(-1)
    assert torch.equal(o_hf.values, o.values)
    torch.testing.assert_close(w_hf.gather(1, o_hf.indices), w.gather(1, o.indices), rtol=1e-6, atol=1e-7)
    # Layer output and gradient wrt the input, both expert paths.
    xa = x.clone().requires_grad_()
    ref = hf(xa)
    ref.backward(torch.ones_like(ref) * torch.linspace(-1, 1, 48))
    for impl in ("sorted", "loop"):
        mine.experts.impl = impl
        xb = x.clone().requires_grad_()
        out = mine(xb)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, 48))
        assert_close(f"HF parity ({impl})", ref, out, FP32)
        assert_close(f"HF parity dx ({impl})", xa.grad, xb.grad, FP32)


@pytest.mark.parametrize("impl", ["sorted", "loop", "triton"])
def test_clamped_swiglu_matches_hf_glm5_next_moe(impl):
    """GLM-5.3-Flash's MoE (HF ``glm5_next``): the same router as glm4_moe, and ``swiglu_limit`` clamping the SwiGLU of
    the routed and the shared experts alike. Weights large enough that a third of the pre-activations are clamped."""
    _hf()
    from transformers.models.glm5_next.configuration_glm5_next import Glm5NextTextConfig
    from transformers.models.glm5_next.modeling_glm5_next import Glm5NextTextMoE

    cfg = Glm5NextTextConfig(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        index_topk=16,
        pad_token_id=0,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        swiglu_limit=1.0,
    )
    hf = Glm5NextTextMoE(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.25)
    hf.gate.e_score_correction_bias.normal_(std=0.1)
    mine = MoE(32, 8, 2, 16, n_shared_experts=1, routed_scaling_factor=2.5, impl=impl, swiglu_limit=1.0)
    sd = hf.state_dict()
    gate, up = sd.pop("shared_experts.gate_proj.weight"), sd.pop("shared_experts.up_proj.weight")
    sd["shared_experts.gate_up_proj.weight"] = torch.cat((gate, up))
    mine.load_state_dict(sd, strict=True)
    x = torch.randn(2, 9, 32)
    assert (hf.shared_experts.gate_proj(x).abs() > 1.0).float().mean() > 0.3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = hf(xa), mine(xb)
    for y in (ref, out):
        y.backward(torch.ones_like(y) * torch.linspace(-1, 1, 32))
    assert_close(f"glm5_next MoE ({impl})", ref, out, FP32)
    assert_close(f"glm5_next MoE dx ({impl})", xa.grad, xb.grad, FP32)
    plain = MoE(32, 8, 2, 16, n_shared_experts=1, routed_scaling_factor=2.5, impl=impl)
    plain.load_state_dict(sd)
    assert rel_err(ref, plain(x)) > 1e-2  # the clamp matters here
    assert "swiglu_limit=1.0" in repr(mine.experts)
