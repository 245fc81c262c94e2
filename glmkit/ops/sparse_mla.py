"""Sparse MLA attention (DSA, GLM-5): every query token attends only to the keys its indexer selected
(kernels: ``kernels/sparse_mla.py``; the selection: ``glmkit.ops.lightning_indexer``). Facts: glm-lineage.md §5.2–§5.3.

Dense MLA (lesson 05) scores all L cached latents per query: O(T·L) work in prefill, O(L) reads per decoded token.
DSA keeps MLA's weights and cache and changes one thing, the set each query sees: idx[b, t] lists N ≤ k key rows
(k = 2048 in GLM-5), and softmax runs over those only. Work per token is then O(k), whatever the context length.

It runs in MLA's absorbed "MQA mode" (DeepSeek-V3.2 Appendix A): W_UK is folded into the query, so every head scores
the same per-token latent row [c_KV ‖ k_rope] (512 + 64 values in GLM-5) and reads c_KV itself as its value; the
output is still in latent space (the mixer applies W_UV and o_proj). A query token's selected rows therefore serve
all of its heads at once, which is why DSA selects per token and not per head.

    s[t, h, j] = scale · (q_nope[t, h] · c_kv[idx_j] + q_rope[t, h] · k_rope[idx_j])
    o[t, h]    = Σ_j softmax_j(s[t, h]) · c_kv[idx_j]

Shapes: q_nope [B, T, H, R], q_rope [B, T, H, DR], c_kv [B, L, R], k_rope [B, L, DR] (one float dtype), idx [B, T, N]
integer, scale > 0 (MLA's: qk_head_dim^-½ of the unabsorbed heads, e.g. 256^-½ in GLM-5 — not (R + DR)^-½, so it has
no default). Output o [B, T, H, R] in q's dtype.

Index format: each entry is a row in [0, L) or −1 = an empty slot (skipped; any number of them — the indexer pads a
query with fewer than k visible keys). Entries of one token must be distinct: the masked reference counts a key once,
a gather would count a repeat twice. The op attends to exactly the listed rows (causality is the indexer's job), and
it does not check values (a host sync). A token with no valid slot gets o = 0.

Three paths that agree (tests/ops/test_sparse_mla.py):
* ``sparse_mla_reference`` — the readable definition: dense attention over all L keys with the selected set as the
  mask (what HF's eager ``glm_moe_dsa`` does). O(T·L) memory, no speed-up.
* ``sparse_mla_gather`` — gather the N selected rows per token, attend to them: O(T·N) work, plain torch.
* the Triton kernels — ``sparse_mla`` (prefill/training, forward and backward) and ``sparse_mla_decode`` (a few
  tokens against a long cache: the slots split across programs, inference only).
"""

from __future__ import annotations

import torch

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # fp64: references only
_INT_DTYPES = (torch.int32, torch.int64)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The torch paths compute in fp32 (fp64 when given fp64, for exact cross-checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check(q_nope, q_rope, c_kv, k_rope, idx, scale) -> None:
    """Shapes, dtypes and devices (never values: that would cost a host sync)."""
    named = (("q_nope", q_nope), ("q_rope", q_rope), ("c_kv", c_kv), ("k_rope", k_rope))
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{name} must be a float tensor (float32/16, bfloat16; float64 on the torch path), "
                f"got {getattr(t, 'dtype', type(t))}"
            )
        if t.dtype != q_nope.dtype or t.device != q_nope.device:
            raise TypeError(f"{name} is {t.dtype} on {t.device}; q_nope is {q_nope.dtype} on {q_nope.device}")
    if q_nope.dim() != 4 or 0 in q_nope.shape:
        raise ValueError(f"q_nope must be [B, T, H, R] with no empty dimension, got {tuple(q_nope.shape)}")
    B, T, H, R = q_nope.shape
    if q_rope.dim() != 4 or q_rope.shape[:3] != (B, T, H) or q_rope.shape[3] == 0:
        raise ValueError(f"q_rope must be [B, T, H, DR] = [{B}, {T}, {H}, DR], got {tuple(q_rope.shape)}")
    DR = q_rope.shape[3]
    if c_kv.dim() != 3 or c_kv.shape[0] != B or c_kv.shape[2] != R or c_kv.shape[1] == 0:
        raise ValueError(f"c_kv must be [B, L, R] = [{B}, L >= 1, {R}], got {tuple(c_kv.shape)}")
    if tuple(k_rope.shape) != (B, c_kv.shape[1], DR):
        raise ValueError(f"k_rope must be [B, L, DR] = [{B}, {c_kv.shape[1]}, {DR}], got {tuple(k_rope.shape)}")
    if (
        not isinstance(idx, torch.Tensor)
        or idx.dtype not in _INT_DTYPES
        or idx.dim() != 3
        or idx.shape[:2] != (B, T)
        or idx.shape[2] == 0
        or idx.device != q_nope.device
    ):
        raise ValueError(
            f"idx must be an int32/int64 [B, T, N] = [{B}, {T}, N >= 1] tensor on {q_nope.device} (−1 = empty slot), "
            f"got {getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number (MLA's qk_head_dim^-0.5), got {scale!r}")


def _softmax_or_zero(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim; a row that is all −inf (no valid slot) gives zeros, not NaN."""
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def selected_mask(idx: torch.Tensor, L: int) -> torch.Tensor:
    """[B, T, L] bool: key s is in query t's set (−1 slots select nothing)."""
    slots = torch.where(idx < 0, L, idx).long()  # −1 → a scratch column L, dropped below
    mask = torch.zeros(*idx.shape[:2], L + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, slots, True)[..., :L]


def sparse_mla_reference(q_nope, q_rope, c_kv, k_rope, idx, scale: float) -> torch.Tensor:
    """The definition: dense MLA attention (MQA mode) over all L keys, with every key outside the token's set masked.
    fp32 scores and softmax; differentiable; O(B·H·T·L) memory."""
    _check(q_nope, q_rope, c_kv, k_rope, idx, scale)
    scores = torch.einsum("bthr,blr->bthl", _acc(q_nope), _acc(c_kv))
    scores = (scores + torch.einsum("bthr,blr->bthl", _acc(q_rope), _acc(k_rope))) * scale
    scores = scores.masked_fill(~selected_mask(idx, c_kv.shape[1])[:, :, None, :], float("-inf"))
    return torch.einsum("bthl,blr->bthr", _softmax_or_zero(scores), _acc(c_kv)).to(q_nope.dtype)


def sparse_mla_gather(q_nope, q_rope, c_kv, k_rope, idx, scale: float) -> torch.Tensor:
    """The same result from the N selected rows only: gather them per token, attend. O(B·T·N·(R + DR)) memory,
    differentiable (the gather's backward scatters into c_kv, k_rope); fp32 math."""
    _check(q_nope, q_rope, c_kv, k_rope, idx, scale)
    rows = torch.arange(q_nope.shape[0], device=idx.device)[:, None, None]
    sel = idx.clamp_min(0).long()
    c_sel, kr_sel = _acc(c_kv[rows, sel]), _acc(k_rope[rows, sel])  # [B, T, N, R], [B, T, N, DR]
    scores = torch.einsum("bthr,btnr->bthn", _acc(q_nope), c_sel)
    scores = (scores + torch.einsum("bthr,btnr->bthn", _acc(q_rope), kr_sel)) * scale
    scores = scores.masked_fill((idx < 0)[:, :, None, :], float("-inf"))
    return torch.einsum("bthn,btnr->bthr", _softmax_or_zero(scores), c_sel).to(q_nope.dtype)


class SparseMLAFunction(torch.autograd.Function):
    """The kernels as one differentiable op: forward ``sparse_mla_fwd`` (o and the per-(token, head) log-sum-exp),
    backward ``sparse_mla_bwd``. Saves the inputs, o and lse: O(T·H·R), nothing of size T×N×H."""

    @staticmethod
    def forward(ctx, q_nope, q_rope, c_kv, k_rope, idx, scale):
        from glmkit.kernels.sparse_mla import sparse_mla_fwd

        o, lse = sparse_mla_fwd(q_nope, q_rope, c_kv, k_rope, idx, scale)
        ctx.save_for_backward(q_nope, q_rope, c_kv, k_rope, idx, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        from glmkit.kernels.sparse_mla import sparse_mla_bwd

        q_nope, q_rope, c_kv, k_rope, idx, o, lse = ctx.saved_tensors
        dqn, dqr, dc, dkr = sparse_mla_bwd(do, q_nope, q_rope, c_kv, k_rope, idx, o, lse, ctx.scale)
        return dqn, dqr, dc, dkr, None, None


def sparse_mla(q_nope, q_rope, c_kv, k_rope, idx, scale: float) -> torch.Tensor:
    """Sparse MLA attention as the models call it in prefill and training: ``sparse_mla_reference``'s result, on the
    Triton kernels (forward and backward) where ``glmkit.backend`` resolves to "triton", else ``sparse_mla_gather``;
    ``glmkit.backend.audit`` records which ran ("sparse_mla")."""
    _check(q_nope, q_rope, c_kv, k_rope, idx, scale)
    path = "triton" if backend.resolve(q_nope) == "triton" and q_nope.dtype != torch.float64 else "torch"
    backend.record("sparse_mla", path)
    if path == "torch":
        return sparse_mla_gather(q_nope, q_rope, c_kv, k_rope, idx, scale)
    idx = idx.to(torch.int32)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_nope, q_rope, c_kv, k_rope)):
        return SparseMLAFunction.apply(q_nope, q_rope, c_kv, k_rope, idx, float(scale))
    from glmkit.kernels.sparse_mla import sparse_mla_fwd

    return sparse_mla_fwd(q_nope, q_rope, c_kv, k_rope, idx, float(scale))[0]


@torch.no_grad()
def sparse_mla_decode(q_nope, q_rope, c_kv, k_rope, idx, scale: float) -> torch.Tensor:
    """Decoding: a few new tokens (usually one) per sequence against the latent cache. Same arguments and result as
    ``sparse_mla``, inference only; the kernel path splits each token's slots across programs (flash-decoding) so
    that a batch of single tokens still fills the GPU. Records "sparse_mla_decode"."""
    _check(q_nope, q_rope, c_kv, k_rope, idx, scale)
    path = "triton" if backend.resolve(q_nope) == "triton" and q_nope.dtype != torch.float64 else "torch"
    backend.record("sparse_mla_decode", path)
    if path == "torch":
        return sparse_mla_gather(q_nope, q_rope, c_kv, k_rope, idx, scale)
    from glmkit.kernels.sparse_mla import sparse_mla_decode_fwd

    return sparse_mla_decode_fwd(q_nope, q_rope, c_kv, k_rope, idx.to(torch.int32), float(scale))[0]
