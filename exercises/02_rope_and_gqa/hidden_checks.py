"""Hidden checks of exercise 02 — instructor only: `release` never ships this file.

Their failure messages are what a learner sees: the property checked and a hint, never these inputs,
their expected values or this source.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check, load_sibling

public = load_sibling(__file__, "checks.py")  # reuse the public input generators and comparisons


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "rotary_dim can be the whole head (GLM-130B rotates all D dims) or a single pair (rotary_dim = 2); "
        "both pairings must handle both ends, and nothing may be lost or duplicated at the boundary."
    ),
)
def rope_edges(ctx):
    for pairing in public.PAIRINGS:
        D = ctx.rng.choice([8, 16, 32])
        for R in (D, 2):
            x, cos, sin = public.rope_inputs(ctx, 1, 2, ctx.rng.randint(1, 9), D, R)
            public.compare_rope(ctx, x, cos, sin, R, pairing)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "apply_partial_rope must keep x's dtype (float16, bfloat16) and compute the rotation in float32, "
        "rounding once at the end; the dims after rotary_dim must come back bit for bit."
    ),
)
def rope_low_precision(ctx):
    for dtype in (torch.bfloat16, torch.float16):
        for pairing in public.PAIRINGS:
            x, cos, sin = public.rope_inputs(ctx, 2, 2, 13, 32, 16, dtype=dtype)
            public.compare_rope(ctx, x, cos, sin, 16, pairing)


@Check(
    hidden=True,
    points=1,
    timeout=20,
    message=(
        "Use the cos and sin you are given, row t for token t: positions are not always 0, 1, ..., T-1 (GLM "
        "repeats the [gMASK] position for generated tokens, a batch can be left-padded) and θ is not always "
        "10000. Do not recompute the angles yourself."
    ),
)
def rope_uses_given_angles(ctx):
    from glmkit.ops.rope import rope_cos_sin

    T, D, R = 9, 16, 8
    positions = torch.tensor(sorted(ctx.rng.randint(0, 40) for _ in range(T)))  # repeats allowed
    cos, sin = rope_cos_sin(positions, R, ctx.rng.choice([500.0, 1e6]))
    x = public.randn(ctx, 2, 2, T, D)
    for pairing in public.PAIRINGS:
        public.compare_rope(ctx, x, cos, sin, R, pairing)


@Check(
    hidden=True,
    points=2,
    timeout=30,
    message=(
        "Multi-query attention is the extreme of GQA: one k/v head (H_kv = 1) shared by every query head; "
        "and a chunk of several new queries (Tq > 1) after cached tokens must use absolute positions."
    ),
)
def mqa_and_chunks(ctx):
    q, k, v = public.qkv(ctx, 1, 6, 1, 10, 10, 16)
    public.compare_gqa(ctx, q, k, v, 0)
    for _ in range(2):
        L = ctx.rng.randint(8, 24)
        Tq = ctx.rng.randint(2, L - 2)
        q, k, v = public.qkv(ctx, 2, 4, 2, Tq, L, 16)
        public.compare_gqa(ctx, q, k, v, L - Tq)


@Check(
    hidden=True,
    points=2,
    timeout=40,
    message=(
        "decode_with_cache must work for every prefill length: prefill = 1 (everything after the first token "
        "is decoded one by one) and prefill = T (nothing is decoded), with grouped heads and in bfloat16."
    ),
)
def decode_extremes(ctx):
    T = ctx.rng.randint(6, 12)
    q, k, v = public.qkv(ctx, 1, 4, 2, T, T, 16)
    public.compare_decode(ctx, q, k, v, 1)
    public.compare_decode(ctx, q, k, v, T)
    q, k, v = public.qkv(ctx, 2, 8, 2, T, T, 32, dtype=torch.bfloat16)
    public.compare_decode(ctx, q, k, v, ctx.rng.randint(1, T))


@Check(
    hidden=True,
    points=1,
    timeout=10,
    message=(
        "kv_cache_size must use every argument: the batch size and the bytes per element (4 for float32) "
        "multiply the cache too. Try the real shapes of ChatGLM2-6B and GLM-4.5."
    ),
)
def cache_size_all_arguments(ctx):
    public.compare_cache_size(ctx, 28, 2, 128, 32768, ctx.rng.randint(2, 8), 2)  # ChatGLM2-6B
    public.compare_cache_size(ctx, 92, 8, 128, 131072, 1, 2)  # GLM-4.5
    public.compare_cache_size(
        ctx, ctx.rng.randint(1, 50), ctx.rng.randint(1, 8), 64, ctx.rng.randint(1, 999), ctx.rng.randint(1, 4), 4
    )
