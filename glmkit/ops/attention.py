"""Softmax attention under GLM's blank-infilling mask: the reference, the explicit-mask decode math, and the
dispatch to the flash-attention kernels (``kernels/attention.py``) with their autograd wiring.

GLM (Du et al. 2021) packs one training example as ``[Part A | Part B]``: Part A is the corrupted text, Part B
the spans, generated left to right. Its mask mixes the two patterns that came before it in the lineage:

    key j →          Part A     Part B           GPT (causal)     BERT (bidirectional)   GLM (sep = 3)
    query i ↓        0 1 2      3 4 5            0 1 2 3 4 5      0 1 2 3 4 5            0 1 2 3 4 5
    0 (A)            ■ ■ ■      · · ·            ■ · · · · ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ · · ·
    1 (A)            ■ ■ ■      · · ·            ■ ■ · · · ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ · · ·
    2 (A)            ■ ■ ■      · · ·            ■ ■ ■ · · ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ · · ·
    3 (B)            ■ ■ ■      ■ · ·            ■ ■ ■ ■ · ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ ■ · ·
    4 (B)            ■ ■ ■      ■ ■ ·            ■ ■ ■ ■ ■ ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ ■ ■ ·
    5 (B)            ■ ■ ■      ■ ■ ■            ■ ■ ■ ■ ■ ■      ■ ■ ■ ■ ■ ■            ■ ■ ■ ■ ■ ■

Key j is visible to query i iff ``j < sep`` (Part A) or ``j <= i`` (causal). One integer per sample, ``sep``,
selects the pattern: 0 is GPT (every GLM since ChatGLM2 is causal), T is BERT. ChatGLM-6B's prompt is Part A.

* ``attention_reference`` — explicit math (scores, mask, fp32 softmax, weighted sum): slow, obvious, and what
  every faster version is tested against.
* ``attention`` — what the models call for a prefill or training step: the Triton kernels
  (``kernels/attention.py``, forward and backward) where ``glmkit.backend`` resolves to "triton", else
  ``F.scaled_dot_product_attention`` with the boolean mask.
* ``attention_masked`` — attention under an explicit [B, T, L] mask (a decode step against a cache, left-padded
  batches), plain torch math.

Shapes: q, k ``[B, H, T, D]``/``[B, H_kv, T, D]``, v ``[B, H_kv, T, Dv]`` with ``H % H_kv == 0`` (grouped-query
attention: query head h reads k/v head ``h // (H / H_kv)``), sep ``[B]`` integer Part-A lengths in [0, T]. Outputs
are ``[B, H, T, Dv]`` in q's dtype. Dv = D for every GQA model; MLA (``glmkit.mixers.mla``) is the first whose value
head differs from its q·k head (GLM-4.7-Flash: 192 + 64 and 256), so D and Dv are checked apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def attention_mask(sep: torch.Tensor, T: int) -> torch.Tensor:
    """The GLM mask [B, T, T] (True = may attend) from Part-A lengths sep [B]: key j visible to query i iff
    j < sep or j <= i."""
    i = torch.arange(T, device=sep.device)
    return (i[None, None, :] < sep[:, None, None]) | (i[None, None, :] <= i[None, :, None])


def _check(q, k, v, sep, scale) -> None:
    """Shapes, dtypes and devices (never values: that would cost a host sync inside the forward)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a [B, H, T, D] tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise TypeError(
            f"q, k, v must share one dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}"
        )
    B, H, T, D = q.shape
    if k.shape[:3] != v.shape[:3] or (k.shape[0], k.shape[2], k.shape[3]) != (B, T, D) or v.shape[3] == 0:
        raise ValueError(
            f"k and v must be [B, H_kv, T, D] = [{B}, H_kv, {T}, {D}] and [B, H_kv, T, Dv] to match q, "
            f"got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"the query heads (H={H}) must be a multiple of the k/v heads (H_kv={k.shape[1]})")
    if T == 0 or D == 0:
        raise ValueError(f"q must have T >= 1 and D >= 1, got {tuple(q.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None (= 1/sqrt(D)), got {scale!r}")
    if sep is not None and (
        not isinstance(sep, torch.Tensor)
        or sep.dtype not in (torch.int32, torch.int64)
        or tuple(sep.shape) != (B,)
        or sep.device != q.device
    ):
        raise ValueError(
            f"sep must be a [B] = [{B}] integer tensor of Part-A lengths on {q.device}, got "
            f"{getattr(sep, 'dtype', type(sep).__name__)} {tuple(getattr(sep, 'shape', ()))}"
        )


def _expand_kv(k: torch.Tensor, H: int) -> torch.Tensor:
    """[B, H_kv, T, D] → [B, H, T, D]: query head h uses key/value head h // (H / H_kv)."""
    return k.repeat_interleave(H // k.shape[1], dim=1)


def attention_reference(q, k, v, sep: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention under the GLM mask, written out. sep [B] in [0, T] (0 = causal, T = bidirectional) or None
    for no mask; scale defaults to 1/sqrt(D). Scores, softmax and the weighted sum in fp32."""
    _check(q, k, v, sep, scale)
    B, H, T, D = q.shape
    if sep is not None and B and (int(sep.min()) < 0 or int(sep.max()) > T):
        raise ValueError(f"sep values must lie in [0, T] = [0, {T}], got [{int(sep.min())}, {int(sep.max())}]")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    scores = torch.einsum("bhid,bhjd->bhij", q.float(), _expand_kv(k, H).float()) * scale
    if sep is not None:
        scores = scores.masked_fill(~attention_mask(sep, T)[:, None], float("-inf"))
    # every row keeps key 0 (and key i), so no row is all -inf and the softmax never gives NaN
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), _expand_kv(v, H).float()).to(q.dtype)


def attention_masked(q, k, v, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention with an explicit mask: q [B, H, Tq, D], k [B, H_kv, L, D], v [B, H_kv, L, Dv], visible [B, Tq, L]
    bool (True = may attend) → [B, H, Tq, Dv]. Scores and softmax in fp32; query heads grouped by their k/v head."""
    Hkv = k.shape[1]
    qg = rearrange(q.float(), "b (hkv g) t d -> b hkv g t d", hkv=Hkv)
    scores = torch.einsum("bkgtd,bkld->bkgtl", qg, k.float()) * scale
    probs = scores.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1)
    out = torch.einsum("bkgtl,bkld->bkgtd", probs, v.float())
    return rearrange(out, "b hkv g t d -> b (hkv g) t d").to(q.dtype)


class AttentionFunction(torch.autograd.Function):
    """The kernels as one differentiable op: forward = ``attention_fwd`` (which also returns the per-row
    log-sum-exp), backward = ``attention_bwd``. Saves q, k, v, o, lse and sep: O(T·D) per head, no T×T
    matrix. First derivatives only."""

    @staticmethod
    def forward(ctx, q, k, v, sep, scale):
        from glmkit.kernels.attention import attention_fwd

        o, lse = attention_fwd(q, k, v, sep, scale, return_lse=True)
        ctx.save_for_backward(q, k, v, o, lse, sep)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        from glmkit.kernels.attention import attention_bwd

        q, k, v, o, lse, sep = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, sep, ctx.scale)
        return dq, dk, dv, None, None


def attention(q, k, v, sep: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention under the GLM mask as the models call it: same arguments and result as
    ``attention_reference``. The Triton kernels when ``glmkit.backend`` resolves to "triton" (and both head dims,
    D and Dv, are ones the kernel takes: 16, 32, 64, 128, 256), else SDPA with the boolean mask;
    ``glmkit.backend.audit`` records which ran."""
    _check(q, k, v, sep, scale)
    from glmkit.kernels.attention import SUPPORTED_HEAD_DIMS

    dims_ok = q.shape[-1] in SUPPORTED_HEAD_DIMS and v.shape[-1] in SUPPORTED_HEAD_DIMS
    path = "triton" if backend.resolve(q) == "triton" and dims_ok else "torch"
    backend.record("attention", path)
    if path == "triton":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return AttentionFunction.apply(q, k, v, sep, scale)
        from glmkit.kernels.attention import attention_fwd

        return attention_fwd(q, k, v, sep, scale)
    mask = None if sep is None else attention_mask(sep, q.shape[2])[:, None]
    if k.shape[1] != q.shape[1]:
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
