"""The one state protocol: the cache's shared bookkeeping (length, valid, room, rollback), KV states, and decoding
through the cache = a full forward, for left-padded batches too."""

from __future__ import annotations

import pytest
import torch

from glmkit.cache import Cache, KVState, kv_cache_bytes
from glmkit.models.decoder import Decoder
from glmkit.models.presets import get_config
from glmkit.testing import rel_err

TOL = 1e-5  # fp32: cached vs full forward differ only by summation order


def test_kv_cache_bytes_real_shapes():
    assert kv_cache_bytes(40, 2, 128, 1) == 40 * 1024  # GLM-4-9B, bf16: 40 KiB per token
    assert kv_cache_bytes(28, 32, 128, 8192) == 16 * kv_cache_bytes(28, 2, 128, 8192)  # ChatGLM-6B vs 2-6B
    model = Decoder(get_config("cpu-small"))
    cache = model.new_cache(3, 50)
    c = model.config
    assert cache.nbytes == kv_cache_bytes(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 50, 3, torch.float32)


def test_bookkeeping_room_and_rollback():
    states = [KVState(2, 1, 6, 4, torch.float32, "cpu") for _ in range(2)]
    cache = Cache(states, 2, 6, "cpu")
    assert cache.begin(4, torch.tensor([[False, True, True, True], [True] * 4])) == 0
    k = torch.randn(2, 1, 4, 4)
    kk, vv = states[0].append(k, k + 1, 0)
    assert torch.equal(kk, k) and torch.equal(vv, k + 1)
    cache.end(4)
    assert cache.length == 4 and cache.valid[:, :4].sum() == 7 and not cache.valid[:, 4:].any()
    with pytest.raises(ValueError, match="cache is full"):
        cache.begin(3)
    cache.rollback(2)
    assert cache.length == 2
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback(3)
    k2 = torch.randn(2, 1, 3, 4)
    kk, _ = states[0].append(k2, k2, cache.begin(3))  # rolled-back positions are overwritten
    assert torch.equal(kk[:, :, :2], k[:, :, :2]) and torch.equal(kk[:, :, 2:], k2)
    cache.reset()
    assert cache.length == 0 and not cache.valid.any()


VARIANTS = {
    "glm4-0414 (sandwich, GQA, interleaved)": {},
    "glm4 (pre-norm)": dict(sandwich_norms=False),
    "glm-4.5 style (QK-norm, half pairs, MQA)": dict(use_qk_norm=True, rope_interleave=False, num_key_value_heads=1),
    "MoE (GLM-4.5 block)": dict(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        mlp_layer_types=None,
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_chunked_decoding_equals_full_forward(name):
    model = Decoder(get_config("cpu-small", num_hidden_layers=2, **VARIANTS[name])).eval()
    B, T, sep = 2, 13, 5
    x = torch.randint(0, 264, (B, T))
    with torch.no_grad():
        full = model(x, sep=sep)
        cache = model.new_cache(B, 20)
        parts = [model(x[:, :6], sep=sep, cache=cache), model(x[:, 6:9], sep=sep, cache=cache)]
        parts += [model(x[:, t : t + 1], sep=sep, cache=cache) for t in range(9, T)]
    assert cache.length == T
    assert rel_err(full, torch.cat(parts, dim=1)) <= TOL, name


def test_rollback_then_decode_equals_a_fresh_decode():
    """Speculative decoding's move: feed 3 tokens, roll 2 back, feed others — the logits of never having fed them."""
    model = Decoder(get_config("cpu-small", num_hidden_layers=2)).eval()
    x = torch.randint(0, 264, (1, 12))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(x[:, :8], cache=cache)
        model(torch.randint(0, 264, (1, 3)), cache=cache)
        cache.rollback(3)
        step = model(x[:, 8:], cache=cache)
    assert rel_err(model(x)[:, 8:], step) <= TOL


def test_left_padded_row_equals_unpadded():
    model = Decoder(get_config("cpu-small", num_hidden_layers=2)).eval()
    short, long = torch.randint(0, 264, (1, 6)), torch.randint(0, 264, (1, 10))
    pad = 10 - 6
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :pad] = False
    pos = (torch.arange(10)[None] - torch.tensor([[pad], [0]])).clamp_min(0)
    with torch.no_grad():
        batched = model(ids, pos, attention_mask=mask)
        assert rel_err(model(short)[0], batched[0, pad:]) <= TOL
        assert rel_err(model(long)[0], batched[1]) <= TOL
        cache = model.new_cache(2, 12)  # through the cache: one decode step after the prefill
        model(ids, pos, attention_mask=mask, cache=cache)
        nxt = torch.tensor([[5], [7]])
        step = model(nxt, torch.tensor([[6], [10]]), cache=cache)
        assert rel_err(model(torch.cat([short, nxt[:1]], 1))[:, -1], step[0:1, -1]) <= TOL


def test_cache_checks():
    model = Decoder(get_config("cpu-small", num_hidden_layers=2))
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.new_cache(1, 8))
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.zeros(1, 3, dtype=torch.long), cache={})
