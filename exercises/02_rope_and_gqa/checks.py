"""Public checks of exercise 02 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it
fails. Inputs are random (fresh each run, reproducible with the run's seed); the expected answers are
computed here, in the grading process, by glmkit's references (glmkit.ops.rope,
glmkit.ops.attention, glmkit.cache) — never stored. ``ctx.call`` runs your function in a separate
process and brings its result back as plain data.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check

PAIRINGS = ("interleaved", "half")  # ChatGLM2/3 & GLM-4, GLM-4.5
# relative-error budgets: fp32 math gives ~1e-7; half precisions are rounded once at the end
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def randn(ctx, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=ctx.gen).to(dtype)


# -- partial RoPE -------------------------------------------------------------------------------------
def rope_inputs(ctx, B, H, T, D, R, theta=10000.0, dtype=torch.float32, start=None):
    """x [B, H, T, D] and cos/sin [T, R/2] for positions start .. start + T - 1 (random start)."""
    from glmkit.ops.rope import rope_cos_sin

    start = ctx.rng.randint(0, 500) if start is None else start
    cos, sin = rope_cos_sin(torch.arange(start, start + T), R, theta)
    return randn(ctx, B, H, T, D, dtype=dtype), cos, sin


def compare_rope(ctx, x, cos, sin, R, pairing):
    from glmkit.ops.rope import rope_reference

    ctx.note_inputs(
        f"x {list(x.shape)} {str(x.dtype)[6:]}, cos/sin {list(cos.shape)}, rotary_dim={R}, pairing={pairing!r}"
    )
    want = rope_reference(x, cos, sin, R, pairing)
    got = ctx.call("apply_partial_rope", x, cos, sin, R, pairing)
    if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype:
        if R < x.shape[-1]:
            ctx.expect_tensor("the dims after rotary_dim (they pass through)", got[..., R:], want[..., R:], tol=0.0)
        ctx.expect_tensor("the rotated dims [0, rotary_dim)", got[..., :R], want[..., :R], tol=TOL[x.dtype])
    ctx.expect_tensor("apply_partial_rope(...)", got, want, tol=TOL[x.dtype])


# -- attention ----------------------------------------------------------------------------------------
def qkv(ctx, B, H, Hkv, Tq, L, D, dtype=torch.float32):
    return (
        randn(ctx, B, H, Tq, D, dtype=dtype),
        randn(ctx, B, Hkv, L, D, dtype=dtype),
        randn(ctx, B, Hkv, L, D, dtype=dtype),
    )


def reference_gqa(q, k, v, q_offset):
    """Causal attention of queries at positions q_offset.. against keys 0..L-1: glmkit's references."""
    import math

    from glmkit.ops.attention import attention_masked, attention_reference

    B, Tq, D, L = q.shape[0], q.shape[2], q.shape[3], k.shape[2]
    if q_offset == 0 and Tq == L:  # a prefill: the GLM mask with sep = 0
        return attention_reference(q, k, v, torch.zeros(B, dtype=torch.int64))
    visible = torch.arange(L)[None, :] <= (torch.arange(Tq)[:, None] + q_offset)
    return attention_masked(q, k, v, visible[None].expand(B, Tq, L), 1.0 / math.sqrt(D))


def compare_gqa(ctx, q, k, v, q_offset):
    ctx.note_inputs(f"q {list(q.shape)}, k/v {list(k.shape)}, q_offset={q_offset}, {str(q.dtype)[6:]}")
    got = ctx.call("gqa_attention", q, k, v, q_offset)
    ctx.expect_tensor("gqa_attention(q, k, v, q_offset)", got, reference_gqa(q, k, v, q_offset), tol=TOL[q.dtype])


def compare_decode(ctx, q, k, v, prefill):
    ctx.note_inputs(f"q {list(q.shape)}, k/v {list(k.shape)}, prefill={prefill}, {str(q.dtype)[6:]}")
    got = ctx.call("decode_with_cache", q, k, v, prefill)
    want = reference_gqa(q, k, v, 0)
    if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == want.dtype:
        ctx.expect_tensor(
            "the prefill part (positions < prefill)", got[:, :, :prefill], want[:, :, :prefill], tol=TOL[q.dtype]
        )
        if prefill < q.shape[2]:
            ctx.expect_tensor(
                "the decoded part (positions >= prefill)", got[:, :, prefill:], want[:, :, prefill:], tol=TOL[q.dtype]
            )
    ctx.expect_tensor("decode_with_cache(...)", got, want, tol=TOL[q.dtype])


def reference_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch_size, bytes_per_element):
    from glmkit.cache import kv_cache_bytes

    dtype = {1: torch.float8_e4m3fn, 2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[bytes_per_element]
    return kv_cache_bytes(n_layers, n_kv_heads, head_dim, seq_len, batch_size, dtype=dtype)


def compare_cache_size(ctx, *args):
    ctx.note_inputs("n_layers, n_kv_heads, head_dim, seq_len, batch_size, bytes_per_element = " + str(args))
    ctx.expect_int("kv_cache_size(...)", ctx.call("kv_cache_size", *args), reference_cache_bytes(*args))


# -- public checks ------------------------------------------------------------------------------------
@Check(
    points=2,
    timeout=20,
    title="partial RoPE, interleaved (ChatGLM2/3, GLM-4)",
    message=(
        "Interleaved pairs: plane i is (x[2i], x[2i+1]) and turns by cos[t, i], sin[t, i]; the new pair is "
        "(x1·cos - x2·sin, x2·cos + x1·sin). Only the first rotary_dim dims rotate; the rest must come back "
        "unchanged, and the output keeps x's shape and dtype."
    ),
)
def rope_interleaved(ctx):
    x, cos, sin = rope_inputs(ctx, 2, 3, 7, 16, 8)
    compare_rope(ctx, x, cos, sin, 8, "interleaved")


@Check(
    points=2,
    timeout=20,
    title="partial RoPE, half-split (GLM-4.5)",
    message=(
        "Half-split pairs: plane i is (x[i], x[i + rotary_dim/2]) — the first half of the rotary dims against "
        "the second half — with the same angles and the same rotation formula as the interleaved pairing."
    ),
)
def rope_half(ctx):
    x, cos, sin = rope_inputs(ctx, 2, 3, 7, 16, 8)
    compare_rope(ctx, x, cos, sin, 8, "half")


@Check(
    points=2,
    timeout=30,
    title="partial RoPE, random shapes and rotary dims",
    message=(
        "apply_partial_rope works on the small examples but not on other shapes: rotary_dim can be any even "
        "number up to D (not always D/2), T is not always 7, and cos/sin come from arbitrary start positions."
    ),
)
def rope_random(ctx):
    for _ in range(4):
        D = ctx.rng.choice([8, 16, 32, 64])
        R = 2 * ctx.rng.randint(1, D // 2)
        x, cos, sin = rope_inputs(
            ctx,
            ctx.rng.randint(1, 3),
            ctx.rng.randint(1, 4),
            ctx.rng.randint(1, 20),
            D,
            R,
            theta=ctx.rng.choice([1e4, 1e6]),
        )
        compare_rope(ctx, x, cos, sin, R, ctx.rng.choice(PAIRINGS))


@Check(
    points=2,
    timeout=20,
    title="prefill, multi-head (H_kv = H)",
    message=(
        "With q_offset = 0 and as many queries as keys this is ordinary causal attention: query i sees keys "
        "0..i, scores scaled by 1/sqrt(D), softmax over the keys, then the weighted sum of v."
    ),
)
def prefill_mha(ctx):
    q, k, v = qkv(ctx, 2, 4, 4, 9, 9, 16)
    compare_gqa(ctx, q, k, v, 0)


@Check(
    points=2,
    timeout=20,
    title="prefill, grouped-query (H_kv < H)",
    message=(
        "With H_kv < H key/value heads, consecutive query heads share one: query head h reads k/v head "
        "h // (H // H_kv) (so with H = 8, H_kv = 2, heads 0-3 read k/v head 0 and heads 4-7 read head 1)."
    ),
)
def prefill_gqa(ctx):
    q, k, v = qkv(ctx, 2, 8, 2, 11, 11, 16)
    compare_gqa(ctx, q, k, v, 0)


@Check(
    points=2,
    timeout=20,
    title="one decode step (Tq = 1, q_offset = L - 1)",
    message=(
        "A decode step has one query, at absolute position q_offset = L - 1, and it sees every cached key "
        "0..L-1. The causal mask compares absolute positions: the query's row index plus q_offset."
    ),
)
def decode_step(ctx):
    for _ in range(3):
        L = ctx.rng.randint(2, 20)
        q, k, v = qkv(ctx, 2, 4, 2, 1, L, 16)
        compare_gqa(ctx, q, k, v, L - 1)


@Check(
    points=2,
    timeout=30,
    title="prefill + decode through the cache",
    message=(
        "decode_with_cache must give, position by position, exactly what one causal attention over the whole "
        "sequence gives. The prefill attends the first `prefill` queries to the first `prefill` keys; each "
        "later token first writes its k/v into the cache at its position, then attends to cache[0..t]."
    ),
)
def decode_matches_full(ctx):
    T = ctx.rng.randint(8, 16)
    q, k, v = qkv(ctx, 2, 4, 2, T, T, 16)
    compare_decode(ctx, q, k, v, ctx.rng.randint(2, T - 2))


@Check(
    points=1,
    timeout=10,
    title="KV-cache size (GLM-4-9B)",
    message=(
        "The cache holds keys and values (x2) for every layer, batch row, KV head, position and head dim, "
        "times the bytes per element. Only the KV heads count, not the query heads."
    ),
)
def cache_size_glm4(ctx):
    compare_cache_size(ctx, 40, 2, 128, 1, 1, 2)  # GLM-4-9B, one token, bf16
    compare_cache_size(ctx, 40, 2, 128, ctx.rng.randint(1000, 9000), 1, 2)
