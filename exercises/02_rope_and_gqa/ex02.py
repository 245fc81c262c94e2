"""Exercise 02 — partial RoPE in both pairings, and grouped-query attention with a KV cache.

Part 1: partial RoPE (ChatGLM2/3, GLM-4, GLM-4.5). Only the first ``rotary_dim`` dims of each head are
rotated; the rest pass through unchanged. Plane i (i < rotary_dim/2) turns by the angle whose cos and
sin are ``cos[t, i]``, ``sin[t, i]`` at position t. Which two coordinates form plane i is the *pairing*:

    interleaved (ChatGLM2/3, GLM-4):  (x[2i], x[2i+1])
    half        (GLM-4.5, GPT-NeoX):  (x[i],  x[i + rotary_dim/2])

and each plane (x1, x2) becomes (x1·cos − x2·sin,  x2·cos + x1·sin).

Part 2: grouped-query attention (ChatGLM2's "multi-query", GLM-4's 2 KV heads). q has H heads, k and v
have H_kv heads, H a multiple of H_kv: query head h reads k/v head h // (H // H_kv). Causal: the query
at absolute position p sees keys 0..p. Generation keeps the keys and values of earlier tokens in a
KV cache instead of recomputing them.

The notebook ex02.ipynb walks through each function; write them here, then run ``self_check()`` there
(or ``python -m glmkit.grading check`` in this folder). Do not import ``glmkit.ops.rope``,
``glmkit.ops.attention``, ``glmkit.cache`` or ``glmkit.mixers.attention``: they are the references you are
re-implementing, and the grader does not make them importable (such a submission scores zero). torch and
plain Python are fine.
"""

from __future__ import annotations

import math

import torch


def apply_partial_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, pairing: str
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` dims of every head; pass the others through.

    x:          [B, H, T, D] float (float32, float16 or bfloat16).
    cos, sin:   [T, rotary_dim // 2] float32 — one entry per plane (frequency), per position.
    rotary_dim: even, 2 <= rotary_dim <= D.
    pairing:    "interleaved" or "half" (see the module docstring).
    Returns a new [B, H, T, D] tensor of x's dtype (compute in float32, convert back once at the end).
    x itself must not be modified.
    """
    # BEGIN SOLUTION
    R = rotary_dim
    xr = x[..., :R].float()
    if pairing == "interleaved":
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    elif pairing == "half":
        x1, x2 = xr[..., : R // 2], xr[..., R // 2 :]
        rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        raise ValueError(f"pairing must be 'interleaved' or 'half', got {pairing!r}")
    return torch.cat((rot.to(x.dtype), x[..., R:]), dim=-1)
    # END SOLUTION


def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """Causal grouped-query attention for Tq queries against L cached keys.

    q:        [B, H, Tq, D]; its rows are the tokens at absolute positions q_offset .. q_offset + Tq - 1.
    k, v:     [B, H_kv, L, D] with L = q_offset + Tq (the keys of positions 0 .. L - 1); H % H_kv == 0.
    Query head h uses k/v head h // (H // H_kv). The query at position p sees keys j <= p.
    Scale the scores by 1 / sqrt(D); softmax and the weighted sum in float32.
    Returns [B, H, Tq, D] in q's dtype.
    (q_offset = 0 and Tq = L is the prefill; Tq = 1, q_offset = L - 1 is one decode step.)
    """
    # BEGIN SOLUTION
    B, H, Tq, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    g = H // Hkv
    kf = k.float().repeat_interleave(g, dim=1)  # [B, H, L, D]
    vf = v.float().repeat_interleave(g, dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q.float(), kf) / math.sqrt(D)
    pos_q = torch.arange(Tq)[:, None] + q_offset
    visible = torch.arange(L)[None, :] <= pos_q  # [Tq, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("bhij,bhjd->bhid", torch.softmax(scores, dim=-1), vf)
    return out.to(q.dtype)
    # END SOLUTION


def decode_with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefill: int) -> torch.Tensor:
    """Run a sequence the way generation does: a prefill of the first ``prefill`` tokens, then one
    token at a time through a KV cache.

    q: [B, H, T, D]; k, v: [B, H_kv, T, D] — the queries, keys and values every token will have
    (in a model they come from the token's hidden state; here they are given). 1 <= prefill <= T.
      1. Allocate the cache: k_cache, v_cache of shape [B, H_kv, T, D] (q's dtype).
      2. Prefill: store the first ``prefill`` keys/values in the cache and attend the first ``prefill``
         queries to them with ``gqa_attention``.
      3. For each later position t: store k[:, :, t], v[:, :, t] at position t of the cache, and attend
         the single query q[:, :, t:t+1] to the cached keys/values 0..t.
    Returns the outputs of every position stacked: [B, H, T, D] in q's dtype — which must equal
    one causal ``gqa_attention(q, k, v)`` over the whole sequence.
    """
    # BEGIN SOLUTION
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    k_cache = torch.zeros(B, Hkv, T, D, dtype=q.dtype)
    v_cache = torch.zeros(B, Hkv, T, D, dtype=q.dtype)
    k_cache[:, :, :prefill] = k[:, :, :prefill]
    v_cache[:, :, :prefill] = v[:, :, :prefill]
    outs = [gqa_attention(q[:, :, :prefill], k_cache[:, :, :prefill], v_cache[:, :, :prefill], 0)]
    for t in range(prefill, T):
        k_cache[:, :, t] = k[:, :, t]
        v_cache[:, :, t] = v[:, :, t]
        outs.append(gqa_attention(q[:, :, t : t + 1], k_cache[:, :, : t + 1], v_cache[:, :, : t + 1], t))
    return torch.cat(outs, dim=2)
    # END SOLUTION


def kv_cache_size(
    n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch_size: int = 1, bytes_per_element: int = 2
) -> int:
    """Bytes a full KV cache takes: keys AND values, for every layer, batch row, KV head, position and
    head dim (bytes_per_element = 2 for bf16/fp16, 4 for fp32). Returns a Python int.
    Example: GLM-4-9B (40 layers, 2 KV heads of 128 dims), one token in bf16 -> 40960 bytes (40 KiB)."""
    # BEGIN SOLUTION
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch_size * bytes_per_element
    # END SOLUTION
