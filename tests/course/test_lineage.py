"""glmkit.course.lineage: the generations no checkpoint needs. LayerNorm, GeLU and GeGLU against torch and their
formulas, ChatGLM-6B's 2D RoPE against two 1D rotations, and the toy stack of lesson 03 in its four norm placements
(post-LN, DeepNorm, pre-LN, sandwich): each builds and is causal, DeepNorm defaults to DeepNet's decoder-only
α = (2N)^¼ and β = (8N)^-¼ (the values written here from arXiv:2203.00555, Table 1), α and β are set one by one
(GLM-130B's α = √(2N)), post-LN is DeepNorm with α = β = 1, GLM-130B's embedding-gradient shrink scales the gradient
and nothing else, and a loss's gradient reaches every weight."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glmkit.course.lineage import (
    SCHEMES,
    HistoricBlock,
    ToyStack,
    deepnet_constants,
    geglu_reference,
    gelu_reference,
    glm130b_alpha,
    layer_norm_reference,
    rope_2d,
    shrink_embedding_gradient,
)
from glmkit.ops.rope import rope_cos_sin, rope_reference
from glmkit.ops.swiglu import swiglu_reference
from glmkit.testing import assert_close


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation written out (Hendrycks & Gimpel 2016)."""
    x = x.double()
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


# ---- references ----


def test_layer_norm_reference_agrees_with_torch():
    x = torch.randn(5, 48) * 2 + 1
    w, b = torch.randn(48), torch.randn(48)
    assert_close("layernorm", F.layer_norm(x, (48,), w, b, 1e-5), layer_norm_reference(x, w, b, 1e-5))
    assert_close("no affine", F.layer_norm(x, (48,), eps=1e-5), layer_norm_reference(x, None, None, 1e-5))
    by_hand = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt() * w + b
    assert_close("by hand", by_hand, layer_norm_reference(x, w, b, 1e-5))
    xb = x.bfloat16()
    out = layer_norm_reference(xb, w, b)
    assert out.dtype == torch.bfloat16
    assert_close("bf16, fp32 inside", layer_norm_reference(xb.float(), w, b), out)


def test_gelu_and_geglu_references():
    x = torch.randn(7, 33) * 3
    assert_close("gelu", _gelu_tanh(x), gelu_reference(x))
    assert_close("gelu vs torch", F.gelu(x, approximate="tanh"), gelu_reference(x))
    assert not torch.allclose(gelu_reference(x), F.gelu(x))  # the tanh form, not the erf one
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    h = torch.cat((a, b), -1)
    # GLM-130B's GeGLU puts the activation on the *second* half (SwiGLU, ChatGLM2 on: the first)
    assert_close("geglu", a.double() * _gelu_tanh(b), geglu_reference(h))
    assert (geglu_reference(h) - _gelu_tanh(a).float() * b).abs().max() > 0.1
    assert geglu_reference(h.half()).dtype == torch.float16


def test_chatglm6b_2d_rope():
    """The first half of each head rotates by the position, the second by the block position (half-split pairs)."""
    x = torch.randn(1, 2, 5, 16)
    pos, block = torch.arange(5), torch.tensor([0, 0, 0, 1, 2])
    cp, sp = rope_cos_sin(pos, 8)
    cb, sb = rope_cos_sin(block, 8)
    y = rope_2d(x, cp, sp, cb, sb)
    assert y.shape == x.shape
    assert_close("first half", rope_reference(x[..., :8], cp, sp, 8, "half"), y[..., :8])
    assert torch.equal(y[..., 8:][:, :, :3], x[..., 8:][:, :, :3])  # block position 0: no rotation
    assert_close("second half", rope_reference(x[..., 8:], cb, sb, 8, "half"), y[..., 8:])
    assert (y[..., 8:][:, :, 3:] - x[..., 8:][:, :, 3:]).abs().max() > 1e-3  # block positions 1, 2 rotate
    # relative in both coordinates: shifting both position rows leaves q·k unchanged
    q, k = torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16)
    scores = []
    for shift in (0, 9):
        c1, s1 = rope_cos_sin(pos + shift, 8)
        c2, s2 = rope_cos_sin(block + shift, 8)
        scores.append(rope_2d(q, c1, s1, c2, s2)[0, 0] @ rope_2d(k, c1, s1, c2, s2)[0, 0].T)
    assert_close("shift invariance", scores[0], scores[1], 1e-5)


# ---- the toy stack ----


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_scheme_builds_and_is_causal(scheme):
    model = ToyStack(scheme, n_layers=3, d=32, heads=4, vocab=64).eval()
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, 11, 64) and torch.isfinite(logits).all()
        changed = ids.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % 64  # change the future: the past's logits stay
        later = model(changed)
    assert torch.equal(logits[:, :7], later[:, :7])
    assert not torch.allclose(logits[:, 7:], later[:, 7:])
    block = model.layers[0]
    norm_type = torch.nn.RMSNorm if scheme == "sandwich" else torch.nn.LayerNorm
    assert isinstance(block.n1, norm_type) and isinstance(block.n2, norm_type)
    assert hasattr(block, "n1b") == (scheme == "sandwich")
    assert block.act is (geglu_reference if scheme in ("post-LN", "DeepNorm") else swiglu_reference)


def _beta_scaled(name: str) -> bool:
    return name.endswith(("o.weight", "up.weight", "down.weight"))


@pytest.mark.parametrize("n_layers", [2, 6])
def test_deepnorm_defaults_to_deepnet_decoder_constants(n_layers):
    """α = (2N)^¼ on the residual, β = (8N)^-¼ on the value, output and MLP weights at init: with one seed, DeepNorm's
    weights are post-LN's, those scaled by β."""
    deep, post = ToyStack("DeepNorm", n_layers, seed=3), ToyStack("post-LN", n_layers, seed=3)
    alpha, beta = (2 * n_layers) ** 0.25, (8 * n_layers) ** -0.25
    assert deepnet_constants(n_layers) == pytest.approx((alpha, beta))
    assert all(layer.alpha == pytest.approx(alpha) for layer in deep.layers)
    d = deep.embed.weight.shape[1]
    p_post = dict(post.named_parameters())
    for name, p in deep.named_parameters():
        want = p_post[name].detach().clone()
        if _beta_scaled(name):
            want *= beta
        elif name.endswith("qkv.weight"):
            want[2 * d :] *= beta  # the value rows only
        assert torch.allclose(p, want, rtol=1e-6, atol=0), name
    overridden = ToyStack("DeepNorm", n_layers, alpha=2.0, beta=0.5, seed=3)
    assert overridden.layers[0].alpha == 2.0
    assert torch.allclose(overridden.layers[0].o.weight, 0.5 * post.layers[0].o.weight)


def test_glm130b_alpha_and_alpha_beta_set_independently():
    assert glm130b_alpha(70) == pytest.approx(11.832, abs=1e-3)  # √140, GLM-130B's 70 layers
    post = ToyStack("post-LN", 4, seed=2)
    only_alpha = ToyStack("DeepNorm", 4, alpha=glm130b_alpha(4), beta=1.0, seed=2)  # β's init off
    assert only_alpha.layers[0].alpha == pytest.approx(math.sqrt(8))
    assert all(torch.equal(v, only_alpha.state_dict()[k]) for k, v in post.state_dict().items() if "weight" in k)
    only_beta = ToyStack("DeepNorm", 4, alpha=1.0, seed=2)  # DeepNet's β, α off
    assert only_beta.layers[0].alpha == 1.0
    assert torch.allclose(only_beta.layers[0].o.weight, 32**-0.25 * post.layers[0].o.weight)
    with pytest.raises(ValueError, match="n_layers"):
        deepnet_constants(0)


def test_embedding_gradient_shrink_scales_the_gradient_only():
    x = torch.randn(3, 4, requires_grad=True)
    y = shrink_embedding_gradient(x, 0.1)
    assert torch.allclose(y, x.detach(), rtol=1e-6, atol=1e-7)  # 0.1·x + 0.9·x, up to rounding
    (y * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, 0.1 * torch.arange(4.0).expand(3, 4))
    full, shrunk = ToyStack("pre-LN", 2, seed=5), ToyStack("pre-LN", 2, seed=5, embedding_grad_shrink=0.1)
    ids = torch.randint(0, 64, (2, 7))
    for m in (full, shrunk):
        m.loss(ids[:, :-1], ids[:, 1:]).backward()
    assert torch.allclose(full(ids), shrunk(ids), rtol=1e-5, atol=1e-6)
    assert_close("shrunk embedding grad", 0.1 * full.embed.weight.grad, shrunk.embed.weight.grad, 1e-5)
    assert_close("head grad", full.head.weight.grad, shrunk.head.weight.grad, 1e-5)
    with pytest.raises(ValueError, match="alpha"):
        shrink_embedding_gradient(x, 1.5)


def test_post_ln_is_deepnorm_with_alpha_and_beta_one():
    post = ToyStack("post-LN", 4, seed=1)
    assert all(layer.alpha == 1.0 for layer in post.layers)
    deep1 = ToyStack("DeepNorm", 4, alpha=1.0, beta=1.0, seed=1)
    sd = deep1.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in post.state_dict().items())
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(post(ids), deep1(ids))
    # α enters the residual: the same weights with α = 8^¼ compute something else
    deep = ToyStack("DeepNorm", 4, beta=1.0, seed=1)
    assert not torch.allclose(post(ids), deep(ids))


def test_deepnorm_block_computes_its_formula():
    """post-LN / DeepNorm: a = n1(x); m = n2(α·a + Attn(a)); y = α·m + MLP(m), with the attention a causal softmax
    attention written here from the block's qkv and o weights."""
    torch.manual_seed(4)
    block = HistoricBlock(16, 2, "DeepNorm", alpha=1.7)
    x = torch.randn(2, 5, 16)

    def attn(a):
        q, k, v = block.qkv(a).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        mask = torch.ones(5, 5, dtype=torch.bool).tril()
        probs = ((q @ k.transpose(-1, -2)) / math.sqrt(8)).masked_fill(~mask, float("-inf")).softmax(-1)
        return block.o((probs @ v).transpose(1, 2).reshape(2, 5, 16))

    a = block.n1(x)
    m = block.n2(1.7 * a + attn(a))
    up = block.up(m)
    want = 1.7 * m + block.down(up[..., :32] * _gelu_tanh(up[..., 32:]).float())
    assert_close("DeepNorm block", want.detach(), block(x).detach(), 1e-5)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_loss_backward_reaches_every_weight(scheme):
    model = ToyStack(scheme, n_layers=2, vocab=64)
    ids, targets = torch.randint(0, 64, (2, 12)), torch.randint(0, 64, (2, 12))
    loss = model.loss(ids, targets)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert_close("loss", F.cross_entropy(model(ids).reshape(-1, 64), targets.reshape(-1)), loss.detach(), 1e-6)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="scheme"):
        ToyStack("rezero", 2)
