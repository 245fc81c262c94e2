"""glmkit.moe: router semantics, load balancing, the two expert paths, the MoE layer, HF glm4_moe parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glmkit.moe import (
    MoE,
    SigmoidGroupRouter,
    SoftmaxTopKRouter,
    Experts,
    expert_load,
    experts_loop,
    experts_sorted,
    ffn_for_layer,
    grouped_mm_ok,
    max_violation,
    pack_experts,
    sequence_aux_loss,
    sigmoid_topk_route,
    unpack_experts,
    update_all_biases,
    update_bias,
    SwiGLUMLP,
)
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
    idx, w, s = sigmoid_topk_route(logits, 0.1 * torch.randn(12), 3, norm_topk_prob=norm,
                                   routed_scaling_factor=2.5)
    if norm:
        torch.testing.assert_close(w.sum(-1), torch.full((33,), 2.5))
    else:
        torch.testing.assert_close(w, 2.5 * s.gather(1, idx))
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()            # k distinct experts per token


@pytest.mark.parametrize("n_group,topk_group,k", [(4, 2, 4), (8, 3, 5), (4, 1, 2), (2, 2, 6)])
def test_group_limited_routing_bruteforce(n_group, topk_group, k):
    N, E = 97, 32
    logits, bias = torch.randn(N, E), 0.3 * torch.randn(E)
    idx, w, s = sigmoid_topk_route(logits, bias, k, n_group, topk_group)
    choice = (logits.sigmoid() + bias).tolist()
    gsize = E // n_group
    for t in range(N):
        group_score = [sum(sorted(choice[t][g * gsize:(g + 1) * gsize], reverse=True)[:2]) for g in range(n_group)]
        top_groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        allowed = [e for e in range(E) if e // gsize in top_groups]
        chosen = set(idx[t].tolist())
        assert chosen <= set(allowed), f"token {t}: chose experts outside groups {top_groups}"
        assert chosen == set(sorted(allowed, key=lambda e: -choice[t][e])[:k])


def test_group_limited_is_a_noop_with_one_group():
    logits, bias = torch.randn(40, 16), 0.2 * torch.randn(16)
    a = sigmoid_topk_route(logits, bias, 4, 1, 1)
    b = sigmoid_topk_route(logits, bias, 4, 4, 4)            # all groups kept: same selection
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
    W = torch.randn(E, H) / H ** 0.5
    skew = torch.linspace(-2, 2, E)               # expert 15 is favoured by ~4 logits over expert 0
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
    assert bal[0] > 2.5 and col[0] > 2.5                       # both start badly skewed
    assert sum(bal[-20:]) / 20 < 0.5                            # converged near uniform
    assert sum(bal[-20:]) < sum(bal[:20]) / 5
    assert min(col) > 2.5 and (load_col == 0).any()             # without it: stays collapsed, dead experts
    assert (load_bal > 0).all()


def test_update_bias_step():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([10.0, 2.0, 5.0, 3.0]), 0.1)   # mean 5
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


# ---------------------------------------------------------------------------------------------- experts


def _routing(mode: str, N: int, E: int, k: int):
    """topk_idx [N, k] (distinct experts per row) and random positive weights."""
    if mode == "uniform":
        idx = torch.rand(N, E).topk(k, -1).indices
    elif mode == "zipf":                          # heavy skew, and experts E-3.. never chosen
        p = 1.0 / torch.arange(1, E + 1).float() ** 1.5
        p[-3:] = 0
        idx = torch.multinomial(p.expand(N, -1), k, replacement=False)
    elif mode == "one_expert_all":                # expert 5 in every token, the rest from a few experts
        rest = torch.stack([torch.randperm(4)[: k - 1] for _ in range(N)]) if k > 1 else torch.empty(N, 0)
        idx = torch.cat([torch.full((N, 1), 5), rest.long()], 1)[:, torch.randperm(k)]
    else:
        raise ValueError(mode)
    return idx, torch.rand(N, k) + 0.1


def _grads(fn, x, idx, w, experts):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    for p in experts.parameters():
        p.grad = None
    y = fn(x, idx, w, experts)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()   # a non-uniform upstream grad
    return y.detach(), x.grad, w.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()


@pytest.mark.parametrize("mode", ["uniform", "zipf", "one_expert_all"])
@pytest.mark.parametrize("N,k,H,I", [(37, 3, 32, 16), (1, 2, 32, 16), (53, 4, 20, 12), (29, 1, 13, 7)])
def test_experts_sorted_matches_loop(mode, N, k, H, I):
    E = 12
    experts = Experts(E, H, I, init_std=0.2)
    x = torch.randn(N, H)
    idx, w = _routing(mode, N, E, k)
    ref = _grads(experts_loop, x, idx, w, experts)
    paths = [False] + ([True] if grouped_mm_ok(x, experts) else [])   # H=13/I=7 are not 16-byte rows
    for gmm in paths:
        out = _grads(lambda *a: experts_sorted(*a, use_grouped_mm=gmm), x, idx, w, experts)
        for name, r, o in zip(["y", "dx", "dw", "dgate_up", "ddown"], ref, out):
            assert_close(f"{name} ({mode}, grouped_mm={gmm})", r, o, FP32)
    if mode == "one_expert_all":                               # experts that got no token get zero grads
        unused = torch.ones(E, dtype=torch.bool)
        unused[idx.unique()] = False
        assert unused.any() and (ref[3][unused] == 0).all()


def test_experts_sorted_uses_grouped_mm_when_it_can():
    experts = Experts(8, 32, 16)
    x = torch.randn(10, 32)
    assert grouped_mm_ok(x, experts) == hasattr(torch, "_grouped_mm")
    assert not grouped_mm_ok(torch.randn(10, 13), Experts(8, 13, 16))
    if hasattr(torch, "_grouped_mm"):
        idx, w = _routing("uniform", 10, 8, 2)
        assert rel_err(experts_loop(x, idx, w, experts), experts_sorted(x, idx, w, experts, use_grouped_mm=True)) < FP32


def test_experts_bf16_close_to_fp32():
    experts = Experts(8, 32, 16, init_std=0.2)
    x = torch.randn(41, 32)
    idx, w = _routing("zipf", 41, 8, 2)
    ref = experts_loop(x, idx, w, experts)
    experts_bf16 = Experts(8, 32, 16)
    experts_bf16.load_state_dict(experts.state_dict())
    experts_bf16.to(torch.bfloat16)
    for fn in (experts_loop, experts_sorted):
        out = fn(x.bfloat16(), idx, w, experts_bf16)
        assert out.dtype == torch.bfloat16
        assert_close(fn.__name__, ref, out)


def test_experts_empty_and_validation():
    experts = Experts(4, 8, 6)
    empty = torch.zeros(0, 8)
    assert experts_sorted(empty, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), experts).shape == (0, 8)
    assert experts_loop(empty, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), experts).shape == (0, 8)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="topk_idx values"):
        experts_sorted(x, torch.tensor([[0, 4]] * 3), torch.ones(3, 2), experts)
    with pytest.raises(TypeError, match="topk_idx"):
        experts_loop(x, torch.zeros(3, 2), torch.ones(3, 2), experts)
    with pytest.raises(ValueError, match="topk_weight"):
        experts_loop(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1), experts)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        experts_loop(x.view(1, 3, 8), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2), experts)
    with pytest.raises(ValueError, match="impl"):
        Experts(4, 8, 6, impl="nope")(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


def test_pack_unpack_experts():
    E, I, H = 3, 5, 4
    gates, ups, downs = torch.randn(E, I, H), torch.randn(E, I, H), torch.randn(E, H, I)
    gate_up, down = pack_experts(list(gates), list(ups), list(downs))
    assert gate_up.shape == (E, 2 * I, H) and down.shape == (E, H, I)
    g, u, d = unpack_experts(gate_up, down)
    assert torch.equal(g, gates) and torch.equal(u, ups) and torch.equal(d, downs)
    # Gate first: one expert's SwiGLU from the packed weight equals the per-expert formula.
    ex = Experts(E, H, I)
    ex.gate_up_proj.data.copy_(gate_up)
    ex.down_proj.data.copy_(down)
    x = torch.randn(1, H)
    y = experts_loop(x, torch.tensor([[1]]), torch.ones(1, 1), ex)
    torch.testing.assert_close(y, (F.silu(x @ gates[1].T) * (x @ ups[1].T)) @ downs[1].T)


# --------------------------------------------------------------------------------------------- MoE layer


def _moe(**kw):
    args = dict(hidden_size=32, n_experts=8, top_k=2, moe_intermediate_size=16, n_shared_experts=1,
                n_group=2, topk_group=1, routed_scaling_factor=2.5, init_std=0.2)
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
    ref = experts_loop(flat, idx, w, moe.experts)
    if n_shared:
        sh = moe.shared_experts
        assert sh.gate_proj.weight.shape == (16 * n_shared, 32)
        ref = ref + sh.down_proj(F.silu(sh.gate_proj(flat)) * sh.up_proj(flat))
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
    assert moe.load_accum.sum() == 0 and moe.aux_loss is None      # eval never touches the stats
    moe.train()
    moe(x)
    first = moe.load_last.clone()
    assert first.sum() == 40 * 2 and torch.equal(first, moe.load_accum)
    moe(x[:1])
    assert moe.load_last.sum() == 10 * 2 and moe.load_accum.sum() == 100 and moe.tokens_accum == 50
    load = moe.load_accum.clone()
    bias_before = moe.gate.e_score_correction_bias.clone()
    returned = update_all_biases(torch.nn.Sequential(moe), gamma=0.05)
    assert len(returned) == 1 and torch.equal(returned[0], load)
    step = moe.gate.e_score_correction_bias - bias_before
    torch.testing.assert_close(step, 0.05 * torch.sign(load.mean() - load))
    assert moe.load_accum.sum() == 0 and moe.tokens_accum == 0
    assert "load_accum" not in moe.state_dict() and "gate.e_score_correction_bias" in moe.state_dict()
    sm = _moe(router="softmax", n_group=1).train()
    sm(x)
    assert sm.update_bias(0.1).sum() == 80                         # softmax router: stats only, no bias


def test_moe_bias_hook_balances_a_skewed_layer():
    """End to end through the layer: forward in training mode, then ``update_bias`` after each "step"."""
    moe = _moe(n_experts=8, n_group=1, routed_scaling_factor=1.0).train()
    u = F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():                      # router skewed along u; the inputs lean along u too
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
    assert moe.load_accum.sum().item() == 3 * 100 * 2                # exact counts past bf16's 256


def test_ffn_for_layer_and_from_config():
    from glmkit.moe_configs import GLM_4_5_AIR

    tiny = GLM_4_5_AIR.replace(hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                               n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=2)
    assert isinstance(ffn_for_layer(tiny, 0), SwiGLUMLP) and isinstance(ffn_for_layer(tiny, 1), SwiGLUMLP)
    moe = ffn_for_layer(tiny, 2)
    assert isinstance(moe, MoE) and moe.experts.gate_up_proj.shape == (8, 32, 32) and moe.top_k == 2
    assert ffn_for_layer(tiny, 0).up_proj.weight.shape == (48, 32)


# ----------------------------------------------------------------------------------------------- HF parity


def _hf():
    return pytest.importorskip("transformers", reason="transformers not installed (the dev extra): no HF parity")


@pytest.mark.parametrize("n_group,topk_group,k,scale", [(1, 1, 3, 2.5), (4, 2, 3, 1.0), (4, 1, 2, 2.5)])
def test_parity_with_hf_glm4_moe(n_group, topk_group, k, scale):
    transformers = _hf()
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    cfg = transformers.Glm4MoeConfig(hidden_size=48, moe_intermediate_size=24, n_routed_experts=16,
                                     num_experts_per_tok=k, n_shared_experts=1, n_group=n_group,
                                     topk_group=topk_group, routed_scaling_factor=scale, norm_topk_prob=True)
    hf = Glm4MoeMoE(cfg)
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    hf.gate.e_score_correction_bias.normal_(std=0.1)              # a trained model's bias is non-zero
    mine = MoE.from_config(cfg)
    mine.load_state_dict(hf.state_dict(), strict=True)            # same names and layouts
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
