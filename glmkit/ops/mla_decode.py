"""Absorbed Multi-head Latent Attention over the latent cache (lesson 05): the reference, and the dispatch to the decode
kernel (``kernels/mla_decode.py``).

Where it sits in the lineage. Every GLM up to GLM-4.5 caches a key and a value per KV head and token (GQA:
2 · H_kv · D values; GLM-4.5: 2 · 8 · 128 = 2048). MLA (DeepSeek-V2, then GLM-4.7-Flash and GLM-5) caches one shared
latent per token instead: c_KV (kv_lora_rank = 512 values, normalised) and one RoPE key k_rot shared by all heads
(qk_rope_head_dim = 64): 576 values. The per-head keys and values are up-projections of the latent, k_nope_h =
W_UK_h c_KV and v_h = W_UV_h c_KV, so they never need to be materialised: a query folds W_UK into itself,

    q_nope_h · k_nope_h(j) = q_nope_h · (W_UK_h c_KV(j)) = (W_UK_hᵀ q_nope_h) · c_KV(j) = q_lat_h · c_KV(j),

and the output folds W_UV in after the weighted sum, o_h = W_UV_h (Σ_j p_j c_KV(j)). This op is the middle part,
the attention of H query heads over one shared [L, R + P] latent ("MQA mode", the DeepSeek-V3.2 report's term):

    s[h, j] = scale · (q_lat[h] · c_kv[j] + q_rope[h] · k_rot[j]),   o_lat[h] = Σ_j softmax_j(s[h]) · c_kv[j]

(the RoPE part cannot be absorbed: a rotation by position sits between W_UK and the key, which is why MLA keeps a
separate, un-compressed rotary key).

* ``mla_decode_reference`` — the formula above in fp32 einsums: what the kernel is tested against.
* ``mla_decode`` — the models' call: the Triton kernel where ``glmkit.backend`` resolves to "triton" and no
  gradient is needed, else the reference (recorded as "mla_decode" in ``glmkit.backend.audit``).

Shapes: q_lat [B, Tq, H, R], q_rope [B, Tq, H, P], c_kv [B, L, R], k_rot [B, L, P] (views of the cache buffer are
fine), lengths [B] integers (row b's cache holds keys [0, lengths[b]); None: all L), visible [B, Tq, L] bool or None.
Which keys query t of row b sees: with ``visible``, those it marks below lengths[b]; without,
j < lengths[b] − Tq + 1 + t (the Tq queries are the newest tokens, causal). A query with no visible key gets zeros.
Output [B, Tq, H, R] in q's dtype.
"""

from __future__ import annotations

import math

import torch

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _keys_visible(B: int, Tq: int, L: int, lengths, visible, device) -> torch.Tensor:
    """[B, Tq, L] bool: which keys each query sees (the rule in the module docstring)."""
    j = torch.arange(L, device=device)
    n = torch.full((B,), L, device=device) if lengths is None else lengths.to(device)
    keep = j[None, None, :] < n[:, None, None]
    if visible is not None:
        return keep & visible
    t = torch.arange(Tq, device=device)
    return keep & (j[None, None, :] < (n[:, None, None] - Tq + 1 + t[None, :, None]))


def _check(q_lat, q_rope, c_kv, k_rot, scale, lengths, visible) -> None:
    """Shapes, dtypes, devices (never values: a host sync)."""
    for name, t, dim in (("q_lat", q_lat, 4), ("q_rope", q_rope, 4), ("c_kv", c_kv, 3), ("k_rot", k_rot, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != dim:
            shape = "[B, Tq, H, R]" if dim == 4 else "[B, L, R]"
            raise ValueError(f"{name} must be a {shape}-style tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q_lat.dtype or t.device != q_lat.device:
            raise TypeError(
                f"q_lat, q_rope, c_kv, k_rot must share one dtype and device; {name} is {t.dtype} on {t.device}, "
                f"q_lat {q_lat.dtype} on {q_lat.device}"
            )
    B, Tq, H, R = q_lat.shape
    L, P = c_kv.shape[1], k_rot.shape[-1]
    if q_rope.shape[:3] != (B, Tq, H) or tuple(c_kv.shape) != (B, L, R) or tuple(k_rot.shape[:2]) != (B, L):
        raise ValueError(
            f"shapes do not fit: q_lat {tuple(q_lat.shape)} = [B, Tq, H, R], q_rope {tuple(q_rope.shape)} = "
            f"[B, Tq, H, P], c_kv {tuple(c_kv.shape)} = [B, L, R], k_rot {tuple(k_rot.shape)} = [B, L, P]"
        )
    if q_rope.shape[-1] != P or min(B, Tq, H, R, L, P) == 0:
        raise ValueError(f"q_rope and k_rot must share P >= 1, and no dim may be 0: got P {q_rope.shape[-1]} vs {P}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if lengths is not None and (
        not isinstance(lengths, torch.Tensor)
        or lengths.dtype not in (torch.int32, torch.int64)
        or tuple(lengths.shape) != (B,)
        or lengths.device != q_lat.device
    ):
        raise ValueError(
            f"lengths must be a [B] = [{B}] int32/int64 tensor on {q_lat.device}, got "
            f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}"
        )
    if visible is not None and (
        not isinstance(visible, torch.Tensor)
        or visible.dtype != torch.bool
        or tuple(visible.shape) != (B, Tq, L)
        or visible.device != q_lat.device
    ):
        raise ValueError(
            f"visible must be a [B, Tq, L] = [{B}, {Tq}, {L}] bool tensor on {q_lat.device}, got "
            f"{getattr(visible, 'dtype', type(visible).__name__)} {tuple(getattr(visible, 'shape', ()))}"
        )


def mla_decode_reference(q_lat, q_rope, c_kv, k_rot, scale: float, lengths=None, visible=None) -> torch.Tensor:
    """The absorbed attention written out (module docstring): scores, mask, softmax and the weighted sum of latent
    rows in fp32. Differentiable."""
    _check(q_lat, q_rope, c_kv, k_rot, scale, lengths, visible)
    B, Tq, H, R = q_lat.shape
    L = c_kv.shape[1]
    s = torch.einsum("bthr,blr->bthl", q_lat.float(), c_kv.float())
    s = (s + torch.einsum("bthp,blp->bthl", q_rope.float(), k_rot.float())) * scale
    keep = _keys_visible(B, Tq, L, lengths, visible, q_lat.device)[:, :, None]  # [B, Tq, 1, L]
    p = s.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0)  # a query that sees nothing: zeros
    return torch.einsum("bthl,blr->bthr", p, c_kv.float()).to(q_lat.dtype)


def mla_decode(q_lat, q_rope, c_kv, k_rot, scale: float, lengths=None, visible=None) -> torch.Tensor:
    """Absorbed MLA attention as the mixer calls it: ``mla_decode_reference``'s result. The Triton kernel
    (``kernels/mla_decode.py``: all heads of a token on one tile, split-K over long caches) where
    ``glmkit.backend`` resolves to "triton" and no input needs a gradient; otherwise the reference."""
    _check(q_lat, q_rope, c_kv, k_rot, scale, lengths, visible)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_lat, q_rope, c_kv, k_rot))
    path = "triton" if backend.resolve(q_lat) == "triton" and not grad else "torch"
    backend.record("mla_decode", path)
    if path == "torch":
        return mla_decode_reference(q_lat, q_rope, c_kv, k_rot, scale, lengths, visible)
    from glmkit.kernels.mla_decode import mla_decode_fwd

    return mla_decode_fwd(q_lat, q_rope, c_kv, k_rot, float(scale), lengths, visible)
