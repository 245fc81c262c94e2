"""KV cache: the buffers, the memory calculator, and decoding through the cache = a full forward."""

from __future__ import annotations

import pytest
import torch

from glmkit.kv_cache import KVCache, kv_cache_bytes
from glmkit.models.glm_dense import GLMDenseModel, get_config
from glmkit.testing import rel_err

TOL = 1e-5  # fp32: cached vs full forward differ only by summation order


def test_kv_cache_bytes_real_shapes():
    # GLM-4-9B: 40 layers, 2 KV heads of 128 dims, bf16 → 40 KiB per token.
    assert kv_cache_bytes(40, 2, 128, 1) == 40 * 1024
    # ChatGLM-6B (MHA, 32 heads) vs ChatGLM2-6B (GQA, 2 KV heads), same 28 layers: 16x smaller.
    assert kv_cache_bytes(28, 32, 128, 8192) == 16 * kv_cache_bytes(28, 2, 128, 8192)
    assert kv_cache_bytes(1, 1, 4, 3, batch_size=2, dtype=torch.float32) == 2 * 2 * 3 * 4 * 4
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes(1, 1, 4, -1)


def test_cache_write_advance_and_overflow():
    c = KVCache(n_layers=2, batch_size=3, n_kv_heads=2, head_dim=4, max_len=7)
    assert c.nbytes == kv_cache_bytes(2, 2, 4, 7, batch_size=3, dtype=torch.float32)
    k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    for layer in range(2):
        kk, vv = c.write(layer, k, v)
        assert kk.shape == (3, 2, 5, 4) and torch.equal(kk, k) and torch.equal(vv, v)
    c.set_valid(None, 5)
    c.advance(5)
    k2 = torch.randn(3, 2, 2, 4)
    kk, _ = c.write(0, k2, k2)
    assert kk.shape == (3, 2, 7, 4) and torch.equal(kk[:, :, :5], k) and torch.equal(kk[:, :, 5:], k2)
    with pytest.raises(ValueError, match="KVCache is full"):
        c.write(1, torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4))
    with pytest.raises(ValueError, match=r"\[B, H_kv, T, D\]"):
        c.write(1, torch.randn(3, 1, 1, 4), torch.randn(3, 1, 1, 4))
    c.reset()
    assert c.length == 0 and not c.valid.any()


VARIANTS = {
    "glm4-0414 (sandwich, GQA, interleaved)": {},
    "glm4 (pre-norm)": dict(block="pre"),
    "glm-4.5 style (qk-norm, half pairs, MQA)": dict(qk_norm=True, rope_pairing="half", n_kv_heads=1),
    "chatglm-6b (rope2d, deepnorm, LN, gelu)": dict(position="rope2d", block="deepnorm", norm="layernorm",
                                                    activation="gelu", o_bias=True, mlp_bias=True),
    "glm-2021 (learned2d, LN, gelu, tied)": dict(position="learned2d", norm="layernorm", activation="gelu",
                                                 block="pre", o_bias=True, mlp_bias=True),
    "glm-130b (full rope, half, geglu)": dict(partial_rotary_factor=1.0, rope_pairing="half", block="deepnorm",
                                              norm="layernorm", activation="geglu"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_decoding_equals_full_forward(name):
    model = GLMDenseModel(get_config("cpu-small", n_layers=2, **VARIANTS[name])).eval()
    B, T, sep = 2, 13, 5
    x = torch.randint(0, model.config.vocab_size, (B, T))
    with torch.no_grad():
        full = model(x, sep=sep)
        cache = model.new_cache(B, 20)
        parts = [model(x[:, :6], sep=sep, cache=cache), model(x[:, 6:9], cache=cache)]
        parts += [model(x[:, t:t + 1], cache=cache) for t in range(9, T)]
    assert cache.length == T
    err = rel_err(full, torch.cat(parts, dim=1))
    assert err <= TOL, f"{name}: {err:.2e}"


def test_left_padded_row_equals_unpadded():
    model = GLMDenseModel(get_config("cpu-small", n_layers=2)).eval()
    short, long = torch.randint(0, 264, (1, 6)), torch.randint(0, 264, (1, 10))
    pad = 10 - 6
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :pad] = False
    pos = (torch.arange(10)[None] - torch.tensor([[pad], [0]])).clamp_min(0)
    with torch.no_grad():
        batched = model(ids, pos, attention_mask=mask)
        alone = model(short)
        assert rel_err(alone[0], batched[0, pad:]) <= TOL
        assert rel_err(model(long)[0], batched[1]) <= TOL
        # and through the cache, one decode step after the padded prefill
        cache = model.new_cache(2, 12)
        model(ids, pos, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[5], [7]])
        step = model(nxt, torch.tensor([[6], [10]]), cache=cache)
        ref0 = model(torch.cat([short, nxt[:1]], 1))[:, -1]
        assert rel_err(ref0, step[0:1, -1]) <= TOL


def test_cache_checks():
    model = GLMDenseModel(get_config("cpu-small", n_layers=2))
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.new_cache(1, 8))
    with pytest.raises(TypeError, match="KVCache"):
        model(torch.zeros(1, 3, dtype=torch.long), cache={})
