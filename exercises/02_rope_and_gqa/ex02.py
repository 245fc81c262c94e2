"""Exercise 02 — RoPE inside attention: a GLM-4 attention layer with a KV cache, and a checkpoint's RoPE pairing.

Lesson 02 rotated vectors by hand and ran grouped-query attention on q, k and v it was given. A real layer does
both at once, from the hidden states, and keeps what it needs for the next tokens. You write:

1. ``rope_attention`` — the attention layer of ChatGLM2/3 and GLM-4 (HF ``glm``), from its weights:

       qkv = x @ qkv_weight.T + qkv_bias          one fused projection: rows q (H·D) | k (H_kv·D) | v (H_kv·D)
       q [B, H, T, D], k, v [B, H_kv, T, D]       split into heads (head h is dims h·D .. h·D + D − 1)
       q, k ← partial RoPE at position_ids        the first rotary_dim dims of every head, INTERLEAVED pairs
                                                  (x[2i], x[2i+1]), plane i turned by pos · theta^(−2i/rotary_dim);
                                                  dims rotary_dim..D−1 pass through; v is never rotated
       k, v ← past_k/past_v followed by k, v      the cache: earlier tokens' (already rotated) keys and values
       causal GQA attention                       query head h reads k/v head h // (H / H_kv); the query of the
                                                  t-th new token sees cached keys 0 .. P + t (P = past length);
                                                  scores scaled by 1/√D (D the head dim, not rotary_dim)
       y = out @ o_weight.T                       [B, T, H·D] → [B, T, d], no bias

   Each plane (x1, x2) turned by angle a becomes (x1·cos a − x2·sin a, x2·cos a + x1·sin a).

2. ``half_to_interleaved`` — porting a checkpoint trained with HALF-SPLIT pairs (GLM-4.5: plane i is
   (x[i], x[i + rotary_dim/2])) to code that only has INTERLEAVED RoPE. Both pairings turn the same planes by
   the same angles; only which two coordinates form plane i differs. So permuting the rows of the q and k
   projections (weights and biases) inside each head's rotary dims makes interleaved RoPE on the new weights
   compute exactly what half-split RoPE computed on the old ones, and the attention output is unchanged.

The notebook ex02.ipynb walks through both; write them here, then run ``self_check()`` there (or
``python -m glmkit.grading check`` in this folder). Do not import glmkit here: the grader refuses it (the
references are not available to graded code, and such a submission scores zero). torch and plain Python are fine.
"""

from __future__ import annotations

import math

import torch


def rope_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor,
    o_weight: torch.Tensor,
    position_ids: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    rotary_dim: int,
    theta: float = 10000.0,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A GLM-4 attention layer over T new tokens (see the module docstring for the steps).

    x:            [B, T, d] float32 hidden states of the new tokens.
    qkv_weight:   [(H + 2·H_kv)·D, d], qkv_bias [(H + 2·H_kv)·D]; o_weight [d, H·D]. D = head dim
                  (o_weight.shape[1] // num_heads).
    position_ids: [B, T] int64, each new token's position (P, P+1, ... after a cache of length P).
    rotary_dim:   even, 2 <= rotary_dim <= D; theta: the RoPE base.
    past_k, past_v: [B, H_kv, P, D] keys (rotated) and values of the P earlier tokens, or None (P = 0).
    Returns ``(y [B, T, d], k [B, H_kv, P + T, D], v [B, H_kv, P + T, D])``: the layer's output and the cache
    to pass as past_k/past_v with the next tokens. Compute in float32.
    """
    # BEGIN SOLUTION
    B, T, _ = x.shape
    H, Hkv = num_heads, num_kv_heads
    D = o_weight.shape[1] // H
    qkv = x @ qkv_weight.T + qkv_bias
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q = q.view(B, T, H, D).transpose(1, 2)
    k = k.view(B, T, Hkv, D).transpose(1, 2)
    v = v.view(B, T, Hkv, D).transpose(1, 2)
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angle = position_ids.float()[:, None, :, None] * inv_freq  # [B, 1, T, R/2]
    cos, sin = angle.cos(), angle.sin()

    def rotate(t):
        x1, x2 = t[..., 0:rotary_dim:2], t[..., 1:rotary_dim:2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((rot, t[..., rotary_dim:]), dim=-1)

    q, k = rotate(q), rotate(k)
    if past_k is not None:
        k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
    P = k.shape[2] - T
    kk = k.repeat_interleave(H // Hkv, dim=1)
    vv = v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(D)  # [B, H, T, P + T]
    visible = torch.arange(P + T)[None, :] <= P + torch.arange(T)[:, None]
    out = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ vv
    y = out.transpose(1, 2).reshape(B, T, H * D) @ o_weight.T
    return y, k, v
    # END SOLUTION


def half_to_interleaved(
    qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, num_heads: int, num_kv_heads: int, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a half-split checkpoint's fused q|k|v projection, reordered for interleaved RoPE.

    qkv_weight [(H + 2·H_kv)·D, d], qkv_bias [(H + 2·H_kv)·D] as in ``rope_attention``. Returns new tensors
    (the inputs are not modified) such that, for any x and positions, interleaved RoPE on the returned q and k
    equals half-split RoPE on the original ones with their dims reordered the same way, so the attention
    scores, and the layer's output, are unchanged. Within each head of q and of k only the first rotary_dim
    rows move; the v rows, and the rows rotary_dim..D−1 of each head, stay where they are.
    """
    # BEGIN SOLUTION
    n_heads = num_heads + 2 * num_kv_heads
    D = qkv_weight.shape[0] // n_heads
    half = rotary_dim // 2
    order = torch.arange(n_heads * D).view(n_heads, D)  # row index of every (head, dim)
    rotary = order[: num_heads + num_kv_heads, :rotary_dim]  # q and k heads only; v keeps its order
    # the interleaved pair (2i, 2i+1) must hold the half-split pair (i, i + half)
    order[: rotary.shape[0], :rotary_dim] = torch.stack((rotary[:, :half], rotary[:, half:]), -1).flatten(1)
    index = order.flatten()
    return qkv_weight[index].clone(), qkv_bias[index].clone()
    # END SOLUTION
