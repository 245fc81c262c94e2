"""Attention under GLM's blank-infilling mask: the plain-torch reference and the dispatch the model uses.

GLM (Du et al. 2021) packs one training example as ``[Part A | Part B]``: Part A is the corrupted text
(spans replaced by mask tokens), Part B the spans themselves, generated left to right. Its attention
mask is therefore a mix of the two attention patterns that came before it in the lineage:

    key j →          Part A     Part B           GPT (causal)     BERT (bidirectional)   GLM (sep = 3)
    query i ↓        0 1 2      3 4 5            0 1 2 3 4 5      0 1 2 3 4 5            0 1 2 3 4 5
    0 (A)            ■ ■ ■      · · ·            ■ · · · · ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ · · ·
    1 (A)            ■ ■ ■      · · ·            ■ ■ · · · ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ · · ·
    2 (A)            ■ ■ ■      · · ·            ■ ■ ■ · · ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ · · ·
    3 (B)            ■ ■ ■      ■ · ·            ■ ■ ■ ■ · ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ ■ · ·
    4 (B)            ■ ■ ■      ■ ■ ·            ■ ■ ■ ■ ■ ·      ■ ■ ■ ■ ■ ■            ■ ■ ■ ■ ■ ·
    5 (B)            ■ ■ ■      ■ ■ ■            ■ ■ ■ ■ ■ ■      ■ ■ ■ ■ ■ ■            ■ ■ ■ ■ ■ ■

* GPT-style causal attention: query i sees keys j <= i. Good for generation, but the context is one-sided.
* BERT-style bidirectional attention: every query sees every key. Good for understanding, can't generate.
* GLM: key j is visible to query i iff ``j < sep`` (j is in Part A) or ``j <= i`` (causal). Part A is
  encoded bidirectionally; each Part-B token sees all of Part A plus the Part-B tokens before it. One
  integer per sample, ``sep`` (the Part-A length), selects the pattern: ``sep = 0`` is GPT, ``sep = T``
  is BERT. The mask itself is ``glmkit.blank_infilling.attention_mask``.

Two implementations live here:

* ``attention_reference`` — explicit math (scores, mask, fp32 softmax, weighted sum). Slow, obvious, and
  the thing every faster version is tested against.
* ``glm_attention`` — what the model calls. It dispatches through ``glmkit.backend.resolve``: the Triton
  flash-attention kernel (``glmkit.kernels.glm_attention``) for CUDA tensors, or anywhere the backend is
  forced to "triton" (on CPU: the Triton interpreter, slow but exact), and otherwise torch's
  ``F.scaled_dot_product_attention`` with the boolean mask. ``attention_path`` says which one a call
  would take. On the Triton path gradients come from the flash-attention backward kernels
  (``glmkit.kernels.glm_attention_bwd``) through the autograd op ``GLMAttentionFunction``.

Shapes: q ``[B, H, T, D]``, k/v ``[B, H_kv, T, D]`` with ``H % H_kv == 0`` (grouped-query attention:
query head h reads key/value head ``h // (H // H_kv)``; ``H_kv == H`` is ordinary multi-head attention),
sep ``[B]`` integer Part-A lengths in ``[0, T]``. The output has q's shape and dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from glmkit import backend
from glmkit.blank_infilling import attention_mask

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(q, k, v, sep, scale, *, need_sep: bool = False) -> None:
    """Raise a clear ValueError/TypeError (naming the argument) before torch fails deep inside."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, T, D] (4 dims), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Hkv, Tk, Dk = k.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(
            f"k/v must be [B, H_kv, T, D] = [{B}, H_kv, {T}, {D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads (q: H={H}) must be a multiple of k/v's heads (H_kv={Hkv})")
    if T == 0 or D == 0:
        raise ValueError(f"q must have T >= 1 and D >= 1, got shape {tuple(q.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None (= 1/sqrt(D)), got {scale!r}")
    if sep is None:
        if need_sep:
            raise ValueError("sep is required here")
        return
    if not isinstance(sep, torch.Tensor):
        raise TypeError(f"sep must be a [B] integer tensor of Part-A lengths, got {type(sep).__name__}")
    if sep.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sep must be an integer tensor (int64 Part-A lengths), got {sep.dtype}")
    if sep.shape != (B,):
        raise ValueError(f"sep must have shape [B] = [{B}], got {tuple(sep.shape)}")
    if sep.device != q.device:
        raise ValueError(f"sep must be on q's device {q.device}, got {sep.device}")
    if B and (int(sep.min()) < 0 or int(sep.max()) > T):
        raise ValueError(f"sep values must lie in [0, T] = [0, {T}], got min {int(sep.min())}, max {int(sep.max())}")


def _expand_kv(k: torch.Tensor, H: int) -> torch.Tensor:
    """[B, H_kv, T, D] → [B, H, T, D]: query head h uses key/value head h // (H // H_kv)."""
    return k.repeat_interleave(H // k.shape[1], dim=1)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention under the GLM mask, written out: the reference every faster version is checked against.

    q [B, H, T, D]; k, v [B, H_kv, T, D] (H % H_kv == 0); sep [B] int64 Part-A lengths in [0, T]
    (0 = causal, T = bidirectional) or None for no mask; scale defaults to 1/sqrt(D).
    Scores, softmax and the weighted sum are computed in fp32; returns [B, H, T, D] in q's dtype.
    """
    _check_inputs(q, k, v, sep, scale)
    B, H, T, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf, kf, vf = q.float(), _expand_kv(k, H).float(), _expand_kv(v, H).float()
    scores = torch.einsum("bhid,bhjd->bhij", qf, kf) * scale  # [B, H, T(query), T(key)]
    if sep is not None:
        visible = attention_mask(sep, T)  # [B, T, T], True = may attend
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
    # Every row keeps at least key j = i (and key 0), so no row is all -inf and softmax never gives NaN.
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhij,bhjd->bhid", probs, vf)
    return out.to(q.dtype)


def _grad_needed(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def attention_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Which implementation ``glm_attention(q, k, v, ...)`` would run: "triton" (the flash-attention
    forward kernel, and when autograd needs gradients — grad mode on and any of q/k/v requiring grad —
    also the backward kernels, through ``GLMAttentionFunction``) or "torch" (SDPA, differentiable by
    torch's own autograd)."""
    if backend.resolve(q) != "triton":
        return "torch"
    return "triton"


class GLMAttentionFunction(torch.autograd.Function):
    """The Triton kernels as one differentiable op: forward = ``glm_attention_fwd`` (which also returns
    the per-row log-sum-exp), backward = ``glm_attention_bwd`` (dq, dk, dv from dO, o and that lse).

    Saves q, k, v, o, lse and sep for the backward (O(T·D) per head, no T×T attention matrix). Only first
    derivatives: a second backward through this op raises.
    ``GLMAttentionFunction.apply(q, k, v, sep, scale)`` with the arguments of ``glm_attention``.
    """

    @staticmethod
    def forward(ctx, q, k, v, sep, scale):
        from glmkit.kernels.glm_attention import glm_attention_fwd

        o, lse = glm_attention_fwd(q, k, v, sep, scale=scale, return_lse=True, check=False)
        ctx.save_for_backward(q, k, v, o, lse, sep)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        from glmkit.kernels.glm_attention_bwd import glm_attention_bwd

        q, k, v, o, lse, sep = ctx.saved_tensors
        dq, dk, dv = glm_attention_bwd(do, q, k, v, o, lse, sep, scale=ctx.scale, check=False)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None)


def _torch_attention(q, k, v, sep, scale) -> torch.Tensor:
    """The fast torch path: SDPA with the boolean GLM mask (True = may attend), GQA handled by SDPA."""
    T = q.shape[2]
    mask = None if sep is None else attention_mask(sep, T)[:, None]  # [B, 1, T, T], broadcast over heads
    if k.shape[1] != q.shape[1]:
        k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def glm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sep: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention under the GLM mask, as the model calls it. Same arguments and result as
    ``attention_reference`` (q [B, H, T, D], k/v [B, H_kv, T, D], sep [B] or None → [B, H, T, D]).

    Dispatch (see ``glmkit.backend``; ``attention_path`` tells which one runs):
      * backend resolves to "triton" (CUDA tensors by default, or forced with ``glmkit.use_backend``):
        the Triton flash-attention forward kernel ``glmkit.kernels.glm_attention.glm_attention_fwd``;
        when autograd needs gradients (grad mode on and any of q/k/v requires grad) it runs through
        ``GLMAttentionFunction``, whose backward is the Triton kernels of
        ``glmkit.kernels.glm_attention_bwd`` (dq, dk, dv; GQA, the GLM mask).
      * otherwise: ``F.scaled_dot_product_attention`` with the boolean mask.
    """
    _check_inputs(q, k, v, sep, scale)
    path = attention_path(q, k, v)
    backend.record("attention", path)
    if path == "triton":
        if _grad_needed(q, k, v):
            return GLMAttentionFunction.apply(q, k, v, sep, scale)
        from glmkit.kernels.glm_attention import glm_attention_fwd

        return glm_attention_fwd(q, k, v, sep, scale=scale, check=False)
    return _torch_attention(q, k, v, sep, scale)
