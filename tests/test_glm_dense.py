"""The dense GLM family: config validation, presets at real sizes, the variants, sampling and generation."""

from __future__ import annotations

import math

import pytest
import torch

from glmkit.attention import attention_reference
from glmkit.models.glm_dense import (PRESETS, PUBLISHED_PARAMS, GLMDenseConfig, GLMDenseModel,
                                     attention_masked, get_config)
from glmkit.sampling import generate, sample_next
from glmkit.testing import rel_err


# -- config --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["chatglm2-6b", "glm-4-9b", "glm-4-9b-0414"])
def test_real_presets_match_published_size(name):
    with torch.device("meta"):
        model = GLMDenseModel(get_config(name))
    n = model.num_parameters()
    assert abs(n / PUBLISHED_PARAMS[name] - 1) < 0.01, f"{name}: {n:,} vs published {PUBLISHED_PARAMS[name]:,}"
    assert next(model.parameters()).device.type == "meta"


def test_exact_counts_of_the_real_shapes():
    counts = {}
    for name in ("chatglm2-6b", "glm-4-9b", "glm-4-9b-0414"):
        with torch.device("meta"):
            counts[name] = GLMDenseModel(get_config(name)).num_parameters()
    assert counts["chatglm2-6b"] == 6_243_584_000
    assert counts["glm-4-9b-0414"] - counts["glm-4-9b"] == 2 * 4096 * 40   # the sandwich norms


@pytest.mark.parametrize("name", ["cpu-small", "gpu-small"])
def test_small_presets_build(name):
    with torch.device("meta"):
        model = GLMDenseModel(get_config(name))
    assert model.num_parameters() < 30e6


@pytest.mark.parametrize("fields, match", [
    (dict(hidden_size=100, n_heads=3), "does not divide hidden_size"),
    (dict(n_heads=4, n_kv_heads=3), "does not divide n_heads"),
    (dict(head_dim=18, partial_rotary_factor=0.5), "must be even"),
    (dict(position="alibi"), "position='alibi'"),
    (dict(block="sandwich", norm="layernorm"), "sandwich"),
    (dict(rope_pairing="neox"), "rope_pairing"),
    (dict(partial_rotary_factor=1.5), "partial_rotary_factor"),
    (dict(position="rope2d", head_dim=18), "rope2d"),
    (dict(eos_token_ids=(999,)), "eos_token_ids"),
])
def test_config_errors_are_named(fields, match):
    base = dict(vocab_size=264, hidden_size=128, n_layers=2, n_heads=4, intermediate_size=64)
    with pytest.raises(ValueError, match=match):
        GLMDenseConfig(**{**base, **fields})


def test_config_types_and_unknown_preset():
    with pytest.raises(TypeError, match="n_layers"):
        GLMDenseConfig(vocab_size=8, hidden_size=8, n_layers=2.0, n_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("glm-5")
    with pytest.raises(ValueError, match="unknown fields"):
        get_config("cpu-small", n_layer=3)


# -- the model -----------------------------------------------------------------------------------------
def test_forward_shapes_and_padded_vocab():
    cfg = get_config("cpu-small", n_layers=2, pad_vocab_multiple=128, tie_word_embeddings=False)
    model = GLMDenseModel(cfg)
    assert model.embed_tokens.weight.shape[0] == 384 and cfg.padded_vocab_size == 384
    out = model(torch.randint(0, 264, (3, 7)))
    assert out.shape == (3, 7, 264)
    with pytest.raises(ValueError, match="outside"):
        model(torch.full((1, 3), 264))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


@pytest.mark.parametrize("kv", [4, 2, 1])   # MHA, GQA, MQA
def test_gqa_variants_run(kv):
    model = GLMDenseModel(get_config("cpu-small", n_layers=1, n_kv_heads=kv))
    assert model.layers[0].attn.qkv_proj.weight.shape[0] == (4 + 2 * kv) * 32
    assert torch.isfinite(model(torch.randint(0, 264, (2, 5)))).all()


def test_masked_attention_matches_reference():
    B, H, Hkv, T, D = 2, 4, 2, 9, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    sep = torch.tensor([0, 4])
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    visible = (j <= i)[None] | (j[None] < sep[:, None, None])
    out = attention_masked(q, k, v, visible, 1 / math.sqrt(D))
    assert rel_err(attention_reference(q, k, v, sep), out) <= 1e-5


def test_sep_makes_prefix_bidirectional():
    model = GLMDenseModel(get_config("cpu-small", n_layers=2)).eval()
    x = torch.randint(0, 264, (1, 8))
    y = x.clone()
    y[0, 3] = (x[0, 3] + 1) % 264       # change a token inside the prefix
    with torch.no_grad():
        causal_a, causal_b = model(x), model(y)
        prefix_a, prefix_b = model(x, sep=5), model(y, sep=5)
    assert torch.equal(causal_a[:, :3], causal_b[:, :3])            # causal: earlier positions can't see it
    assert not torch.allclose(prefix_a[:, :3], prefix_b[:, :3])     # prefix: they can


def test_rope_pairing_changes_the_model():
    torch.manual_seed(1)
    a = GLMDenseModel(get_config("cpu-small", n_layers=2)).eval()
    b = GLMDenseModel(get_config("cpu-small", n_layers=2, rope_pairing="half")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 264, (1, 12))
    with torch.no_grad():
        assert rel_err(a(x), b(x)) > 1e-4
        assert torch.equal(a(x[:, :1]), b(x[:, :1]))       # position 0: no rotation, identical


def test_cpu_small_trains():
    torch.manual_seed(0)
    model = GLMDenseModel(get_config("cpu-small", n_layers=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 264, (4, 33))
    losses = []
    for _ in range(25):
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


# -- sampling ------------------------------------------------------------------------------------------
def test_sample_next_rules():
    logits = torch.randn(5, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-6), greedy)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(sample_next(logits, 0.8, 10, 0.9, g1), sample_next(logits, 0.8, 10, 0.9, g2))
    # top-k: only the k best ever come out
    top3 = torch.topk(logits, 3).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = sample_next(logits, temperature=5.0, top_k=3, generator=g)
        assert (top3 == s[:, None]).any(-1).all()
    # top-p: a token with probability 0.7 and p=0.5 → only it
    two = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    assert all(int(sample_next(two, 1.0, top_p=0.5, generator=g)) == 0 for _ in range(10))
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)


@pytest.mark.parametrize("variant", [{}, dict(position="rope2d", block="deepnorm", norm="layernorm",
                                              activation="gelu")])
def test_generate_cached_equals_uncached_batched(variant):
    model = GLMDenseModel(get_config("cpu-small", n_layers=2, **variant)).eval()
    prompts = [torch.randint(0, 264, (n,)).tolist() for n in (3, 9, 6)]
    kw = dict(max_new_tokens=10, stop_tokens=())
    a = generate(model, prompts, use_cache=True, **kw)
    b = generate(model, prompts, use_cache=False, **kw)
    assert a.tokens == b.tokens and all(len(t) == 10 for t in a.tokens)
    # sampling too, with the same generator seed
    s1 = generate(model, prompts, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(0), **kw)
    s2 = generate(model, prompts, temperature=1.0, top_k=20, top_p=0.9, use_cache=False,
                  generator=torch.Generator().manual_seed(0), **kw)
    assert s1.tokens == s2.tokens
    # and each row alone gives what it gave in the padded batch
    for p, t in zip(prompts, a.tokens):
        assert generate(model, [p], **kw).tokens[0] == t


def test_generate_with_prefix_sep_cached_equals_uncached():
    model = GLMDenseModel(get_config("cpu-small", n_layers=2, position="learned2d", norm="layernorm",
                                     activation="gelu", block="pre")).eval()
    prompts = [torch.randint(0, 264, (n,)).tolist() for n in (4, 7)]
    a = generate(model, prompts, 6, sep=[4, 7], stop_tokens=())
    b = generate(model, prompts, 6, sep=[4, 7], stop_tokens=(), use_cache=False)
    assert a.tokens == b.tokens


def test_generate_stops():
    model = GLMDenseModel(get_config("cpu-small", n_layers=2)).eval()
    prompt = torch.randint(0, 264, (5,)).tolist()
    free = generate(model, prompt, 8, stop_tokens=())
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    out = generate(model, [prompt, prompt[:3]], 8, stop_tokens=[stop])
    assert out.tokens[0] == free.tokens[0][:first] and out.stop_reasons[0] == "stop"
    assert free.stop_reasons == ["length"]
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, 0)


def test_model_on_the_triton_kernels():
    """The same model with attention, RMSNorm, SwiGLU and RoPE on glmkit's Triton kernels (under the
    interpreter on CPU): prefill with a GLM prefix and a cached continuation match the torch path."""
    pytest.importorskip("triton", reason="needs triton (the kernels run under its interpreter on CPU)")
    import glmkit

    model = GLMDenseModel(get_config("cpu-small", n_layers=1, n_heads=2, n_kv_heads=1, head_dim=64)).eval()
    x = torch.randint(0, 264, (2, 19))
    with torch.no_grad():
        ref = model(x, sep=5)
        with glmkit.use_backend("triton"):
            out = model(x, sep=5)
            cache = model.new_cache(2, 24)
            parts = [model(x[:, :10], sep=5, cache=cache), model(x[:, 10:], cache=cache)]
    assert rel_err(ref, out) <= 1e-5
    assert rel_err(ref, torch.cat(parts, 1)) <= 1e-5
