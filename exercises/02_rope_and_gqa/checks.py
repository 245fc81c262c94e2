"""Public checks of exercise 02 (shipped to learners; the hidden ones stay with the instructor).

Each check is declared with its points, time limit (seconds) and the message a learner sees when it fails. Inputs
are random (fresh each run, reproducible with the run's seed); the expected answers are computed here, in the
grading process, by glmkit's references (``glmkit.ops.rope.rope_reference``, ``glmkit.ops.attention.
attention_reference``) — never stored. ``ctx.call`` runs your function in a separate process and brings its
result back as plain data.

A decode is checked against one forward over the whole sequence: causal attention over T tokens computed at once
equals the same tokens fed a few at a time through the cache.
"""

from __future__ import annotations

import torch

from glmkit.grading import Check

TOL = 1e-5  # relative error, float32 throughout


def layer(ctx, d, H, Hkv, D, scale=0.5):
    """Random weights of one attention layer: (qkv_weight, qkv_bias, o_weight)."""
    g = ctx.gen
    rows = (H + 2 * Hkv) * D
    return (
        torch.randn(rows, d, generator=g) * scale / d**0.5 * 2,
        torch.randn(rows, generator=g) * 0.3,
        torch.randn(d, H * D, generator=g) / (H * D) ** 0.5,
    )


def reference(x, w, b, wo, pos, H, Hkv, R, theta, pairing="interleaved"):
    """(y, k, v) of the whole sequence from glmkit's references (k rotated, as the cache holds it)."""
    from glmkit.ops.attention import attention_reference
    from glmkit.ops.rope import rope_cos_sin, rope_reference

    B, T = x.shape[0], x.shape[1]
    D = wo.shape[1] // H
    q, k, v = (x @ w.T + b).split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    cos, sin = rope_cos_sin(pos, R, theta)
    q, k = rope_reference(q, cos, sin, R, pairing), rope_reference(k, cos, sin, R, pairing)
    out = attention_reference(q, k, v, torch.zeros(B, dtype=torch.int64))
    return out.transpose(1, 2).reshape(B, T, H * D) @ wo.T, k, v


def compare_prefill(ctx, B, T, d, H, Hkv, D, R, theta=1e4, start=None):
    w, b, wo = layer(ctx, d, H, Hkv, D)
    x = torch.randn(B, T, d, generator=ctx.gen)
    start = torch.zeros(B, dtype=torch.int64) if start is None else torch.as_tensor(start)
    pos = start[:, None] + torch.arange(T)
    ctx.note_inputs(
        f"x [{B}, {T}, {d}], H={H}, H_kv={Hkv}, D={D}, rotary_dim={R}, theta={theta:g}, "
        f"position_ids start at {start.tolist()}, no cache"
    )
    want = reference(x, w, b, wo, pos, H, Hkv, R, theta)
    got = ctx.expect_tuple("rope_attention(...)", ctx.call("rope_attention", x, w, b, wo, pos, H, Hkv, R, theta), 3)
    for name, g_, w_ in zip(("y (the layer's output)", "k (the cache's keys)", "v (the cache's values)"), got, want):
        ctx.expect_tensor(name, g_, w_, tol=TOL)


def compare_decode(ctx, B, P, chunks, d, H, Hkv, D, R, theta=1e4):
    """Prefill P tokens from the reference's cache, then feed ``chunks`` new tokens a few at a time."""
    w, b, wo = layer(ctx, d, H, Hkv, D)
    T = P + sum(chunks)
    x = torch.randn(B, T, d, generator=ctx.gen)
    pos = torch.arange(T).expand(B, T).contiguous()
    y_all, k_all, v_all = reference(x, w, b, wo, pos, H, Hkv, R, theta)
    k, v, t = k_all[:, :, :P], v_all[:, :, :P], P
    for n in chunks:
        ctx.note_inputs(
            f"H={H}, H_kv={Hkv}, D={D}, rotary_dim={R}: a cache of {t} tokens (past_k [{B}, {Hkv}, {t}, {D}]), "
            f"then {n} new token(s) at positions {t}..{t + n - 1}"
        )
        got = ctx.expect_tuple(
            "rope_attention(..., past_k, past_v)",
            ctx.call("rope_attention", x[:, t : t + n], w, b, wo, pos[:, t : t + n], H, Hkv, R, theta, k, v),
            3,
        )
        ctx.expect_tensor(f"y of tokens {t}..{t + n - 1}", got[0], y_all[:, t : t + n], tol=TOL)
        ctx.expect_tensor("the returned k (past keys followed by the new ones)", got[1], k_all[:, :, : t + n], tol=TOL)
        ctx.expect_tensor("the returned v", got[2], v_all[:, :, : t + n], tol=TOL)
        k, v, t = k_all[:, :, : t + n], v_all[:, :, : t + n], t + n


def compare_port(ctx, d, H, Hkv, D, R, theta=1e6):
    """Judged by what the weights do: interleaved RoPE on the returned weights must give the half-split layer's
    output; the v rows, and the rows past rotary_dim of every head, must not move."""
    w, b, wo = layer(ctx, d, H, Hkv, D)
    ctx.note_inputs(f"qkv_weight [{w.shape[0]}, {d}], H={H}, H_kv={Hkv}, D={D}, rotary_dim={R}")
    got = ctx.expect_tuple("half_to_interleaved(...)", ctx.call("half_to_interleaved", w, b, H, Hkv, R), 2)
    ctx.expect_tensor("the returned qkv_weight's shape and dtype", got[0], w, tol=float("inf"))
    ctx.expect_tensor("the returned qkv_bias's shape and dtype", got[1], b, tol=float("inf"))
    v_rows = slice((H + Hkv) * D, None)
    ctx.expect_tensor("the v rows of qkv_weight (they must not move)", got[0][v_rows], w[v_rows], tol=0.0)
    kept = torch.tensor([h * D + r for h in range(H + Hkv) for r in range(R, D)], dtype=torch.long)
    if len(kept):
        ctx.expect_tensor(
            "the rows past rotary_dim of each q/k head (they must not move)", got[0][kept], w[kept], tol=0.0
        )
    x = torch.randn(2, 9, d, generator=ctx.gen)
    pos = torch.arange(9).expand(2, 9)
    y_half = reference(x, w, b, wo, pos, H, Hkv, R, theta, "half")[0]
    y_port = reference(x, got[0], got[1], wo, pos, H, Hkv, R, theta, "interleaved")[0]
    ctx.expect_tensor("the layer's output with your weights and interleaved RoPE", y_port, y_half, tol=TOL)


@Check(
    points=3,
    timeout=30,
    title="attention: a prefill",
    message=(
        "Project with the fused weight AND bias, split q | k | v into heads, rotate only the first rotary_dim dims "
        "of q and k with interleaved pairs (x[2i], x[2i+1]) and angle pos · theta^(-2i/rotary_dim), leave v "
        "alone, scale scores by 1/sqrt(D), mask causally, let query head h read k/v head h // (H / H_kv), and "
        "return (y, k, v) with k already rotated."
    ),
)
def prefill(ctx):
    compare_prefill(ctx, 2, 11, 32, 4, 2, 8, 4)
    compare_prefill(ctx, 1, 7, 24, 6, 2, 8, 8)


@Check(
    points=2,
    timeout=30,
    title="attention: the given positions",
    message=(
        "Rotate each token by ITS position from position_ids (they need not start at 0, and rows of a batch may "
        "differ); the causal mask is by order in the sequence, the rotation by position."
    ),
)
def prefill_positions(ctx):
    compare_prefill(ctx, 3, 9, 32, 4, 2, 8, 4, start=[5, 0, 17])


@Check(
    points=3,
    timeout=40,
    title="attention: decoding through the cache",
    message=(
        "With a cache of P tokens, the t-th new token is at absolute index P + t: it sees every cached key and "
        "the new ones up to itself. Return the cache extended by the new keys and values (past first)."
    ),
)
def decode(ctx):
    compare_decode(ctx, 2, 6, [3, 1, 1], 32, 4, 2, 8, 4)


@Check(
    points=3,
    timeout=30,
    title="porting half-split weights",
    message=(
        "Interleaved plane i is the pair (slot 2i, slot 2i+1); it must hold what half-split plane i held, "
        "(dim i, dim i + rotary_dim/2). Reorder the q and k rows of every head that way, rotary dims only; "
        "v rows and the dims past rotary_dim stay where they are; biases move with their rows."
    ),
)
def port_half_split(ctx):
    compare_port(ctx, 32, 4, 2, 8, 4)
    compare_port(ctx, 24, 2, 1, 12, 8)
