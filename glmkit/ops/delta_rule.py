"""Linear attention with a delta rule: DeltaNet → Gated DeltaNet → KDA (kernels: ``kernels/delta_rule.py``).

A linear-attention layer replaces the growing KV cache with a fixed-size state per head, a matrix
H ∈ R^{K×V} that maps keys to values. Every step of the lineage changes only how a token writes into it:

    linear attention   H ← H + k vᵀ                                         (Katharopoulos et al. 2020)
    DeltaNet           H ← H + k uᵀ,  u = β (v − Hᵀk)                      (Schlag et al. 2021; Yang et al. 2024)
    Gated DeltaNet     H ← exp(g) H, then the DeltaNet write               (Yang et al. 2024, arXiv:2412.06464)
    KDA                H ← Diag(exp(g)) H, g ∈ R^K, then the DeltaNet write (Kimi Linear; GLM-5.3-Flash)

and every one reads the same way: o = Hᵀ q · scale (scale = 1/√K by default).

* Linear attention only adds: two keys that are not orthogonal interfere, and nothing is ever forgotten.
* DeltaNet writes the *error*: Hᵀk is what the memory currently predicts for k, u = β (v − Hᵀk) corrects it with
  step size β ∈ (0, 1) (one step of online regression on ‖Hᵀk − v‖²). With keys that never overlap (orthonormal,
  β = 1) there is nothing to correct and it is linear attention again.
* Gated DeltaNet adds a forget gate α = exp(g) ∈ (0, 1], one scalar per head and token (g = log α ≤ 0, shape
  [B, T, H]); the decay is applied *before* the delta read. g = 0 is DeltaNet.
* KDA (Kimi Delta Attention) makes the gate per key channel (g of shape [B, T, H, K]): each row of H fades at its
  own rate. A g that is the same for every channel is Gated DeltaNet.

Two state conventions for the same recurrence (glm-lineage §6.1). The papers keep S = Hᵀ ∈ R^{V×K} and read
o = S q: ``S_t = S_{t−1} α_t (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ``. fla and Hugging Face (and this module) keep
H ∈ R^{K×V} (``initial_state`` / ``final_state`` are [B, H, K, V], fp32), decay it, then read and write. They
are the same numbers, transposed: α(I − βkkᵀ) = αI − αβkkᵀ, and the read uses the decayed state.

The recurrent references below run one token at a time. Training runs the chunkwise-parallel form
(``chunk_gated_delta_rule_reference``, the "WY"/"UT transform"; glm-lineage §6.2): inside a chunk of C tokens
the sequential writes become a C×C triangular solve and a few matmuls, and only the chunk boundaries are
sequential. ``gated_delta_rule`` runs that form on the Triton kernels (or the chunk reference on the torch
path), forward and backward; ``gated_delta_rule_step`` is the decode step on the fused recurrent kernel.
Layouts as fla/HF: q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H], g [B, T, H] or [B, T, H, K].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from glmkit import backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_KEY_DIM = 256  # the kernels keep a [K, block of V] fp32 state tile in registers
MIN_HEAD_DIM = 16  # K and V: the smallest tile tl.dot accepts


# ---- recurrent references: one token at a time, fp32, H ∈ R^{K×V} -------------------------------------------


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The references compute in fp32 (fp64 when given fp64, for exact cross-checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _start(q, v, initial_state):
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=_acc(q).dtype, device=q.device)
    return S if initial_state is None else initial_state.to(S.dtype).clone()


def linear_attention_reference(q, k, v, scale=None, initial_state=None, output_final_state=False):
    """Causal linear attention: H ← H + k vᵀ, o = Hᵀ q · scale. q, k [B, T, H, K], v [B, T, H, V] →
    (o [B, T, H, V] in q's dtype, final state [B, H, K, V] fp32 or None)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S, o = _start(q, v, initial_state), []
    for t in range(q.shape[1]):
        S = S + torch.einsum("bhk,bhv->bhkv", _acc(k[:, t]), _acc(v[:, t]))
        o.append(torch.einsum("bhkv,bhk->bhv", S, _acc(q[:, t]) * scale))
    return torch.stack(o, 1).to(q.dtype), (S if output_final_state else None)


def delta_rule_reference(q, k, v, beta, scale=None, initial_state=None, output_final_state=False):
    """DeltaNet: u = β (v − Hᵀk), H ← H + k uᵀ, o = Hᵀ q · scale. beta [B, T, H]; the rest as
    ``linear_attention_reference``."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S, o = _start(q, v, initial_state), []
    for t in range(q.shape[1]):
        kt = _acc(k[:, t])
        u = _acc(beta[:, t, :, None]) * (_acc(v[:, t]) - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + torch.einsum("bhk,bhv->bhkv", kt, u)
        o.append(torch.einsum("bhkv,bhk->bhv", S, _acc(q[:, t]) * scale))
    return torch.stack(o, 1).to(q.dtype), (S if output_final_state else None)


def gated_delta_rule_reference(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Gated DeltaNet (g [B, T, H]) and KDA (g [B, T, H, K]): H ← Diag(exp(g)) H, then u = β (v − Hᵀk),
    H ← H + k uᵀ, o = Hᵀ q · scale. g is the log-decay (≤ 0 in the models; any value is accepted)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S, o = _start(q, v, initial_state), []
    for t in range(q.shape[1]):
        decay = _acc(g[:, t]).exp()  # [B, H] or [B, H, K]
        S = S * (decay[..., None, None] if g.dim() == 3 else decay[..., None])
        kt = _acc(k[:, t])
        u = _acc(beta[:, t, :, None]) * (_acc(v[:, t]) - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + torch.einsum("bhk,bhv->bhkv", kt, u)
        o.append(torch.einsum("bhkv,bhk->bhv", S, _acc(q[:, t]) * scale))
    return torch.stack(o, 1).to(q.dtype), (S if output_final_state else None)


# ---- chunkwise-parallel reference (the WY / UT transform), the algorithm of the kernels ----------------------


def _pair_sum(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Σ_c x_rc y_jc Γ_rjc over the key channels: [..., C, K] × [..., C, K] × [..., C, C, 1 or K] → [..., C, C]."""
    if gamma.shape[-1] == 1:  # one decay for every channel: Γ factors out of the sum
        return (x @ y.transpose(-1, -2)) * gamma[..., 0]
    return torch.einsum("...rc,...jc,...rjc->...rj", x, y, gamma)


def chunk_gated_delta_rule_reference(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """``gated_delta_rule_reference`` computed chunk by chunk (glm-lineage §6.2), both gate shapes, in fp32
    (fp64 for fp64 inputs).

    Inside a chunk of C tokens (rows r, j), with G the in-chunk cumulative sum of g ([C, 1] for Gated DeltaNet,
    [C, K] for KDA) and the per-channel decay between two tokens Γ_rjc = exp(G_rc − G_jc) for j ≤ r:

        A   = StrictLower( β_r Σ_c k_rc k_jc Γ_rjc )          the writes' interference       [C, C]
        T   = (I + A)^{-1}                                    the UT transform (triangular solve)
        W   = T diag(β) (K ⊙ exp(G)),   U = T diag(β) V       decay-weighted keys, pseudo-values
        V'  = U − W H                                         the chunk's true delta-rule values u_r
        O   = scale (Q ⊙ exp(G)) H + (scale Σ_c q_rc k_jc Γ_rjc, j ≤ r) V'
        H  ← Diag(exp(G_C)) H + (K ⊙ exp(G_C − G))ᵀ V'

    With a scalar gate Γ is one number per (r, j) and factors out of the channel sum (A = β KKᵀ ⊙ Γ, fla's
    ``naive_chunk_gated_delta_rule``); with KDA's per-channel gate it cannot, which is why the kernels compute
    KDA's C×C matrices in sub-chunks (see ``kernels/delta_rule.py``). T is padded with inert tokens (k = v = 0,
    β = 0, g = 0) to a multiple of C. Returns what ``gated_delta_rule_reference`` returns.
    """
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    S, dtype = _start(q, v, initial_state), q.dtype
    C, pad = chunk_size, (-T) % chunk_size
    g4 = g if g.dim() == 4 else g[..., None]  # [B, T, H, 1]: one decay shared by all channels

    def chunks(x):  # [B, T, H, D] → [B, H, N, C, D], fp32, zero-padded
        return rearrange(F.pad(_acc(x), (0, 0, 0, 0, 0, pad)), "b (n c) h d -> b h n c d", c=C)

    q, k, v, g4, beta = chunks(q), chunks(k), chunks(v), chunks(g4), chunks(beta[..., None])
    G = g4.cumsum(-2)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    gamma = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~lower[..., None], float("-inf")).exp()
    A = _pair_sum(beta * k, k, gamma).tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    Tm = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)
    W, U = Tm @ (beta * k * G.exp()), Tm @ (beta * v)
    Aqk = _pair_sum(q, k, gamma) * scale  # lower triangle incl. the diagonal (Γ is 0 above it)
    o = []
    for n in range(q.shape[2]):
        Vn = U[:, :, n] - W[:, :, n] @ S
        o.append(scale * (q[:, :, n] * G[:, :, n].exp()) @ S + Aqk[:, :, n] @ Vn)
        G_last = G[:, :, n, -1:]  # [B, H, 1, 1 or K]
        S = G_last.exp().transpose(-1, -2) * S + (k[:, :, n] * (G_last - G[:, :, n]).exp()).transpose(-1, -2) @ Vn
    o = rearrange(torch.stack(o, 2), "b h n c v -> b (n c) h v")[:, :T]
    return o.to(dtype), (S if output_final_state else None)


# ---- the kernels as one differentiable op, and the public dispatch --------------------------------------------


def _check(q, k, v, g, beta, initial_state, scale) -> None:
    """Shapes, dtypes and devices (never values: that would cost a host sync)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got {getattr(t, 'dtype', type(t))}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4 or q.shape[1] == 0:
        raise ValueError(f"q must be [B, T, H, K] with T > 0, got {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if g.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"g must be [B, T, H] (Gated DeltaNet) or [B, T, H, K] (KDA), got {tuple(g.shape)}")
    if beta.shape != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = [{B}, {T}, {H}], got {tuple(beta.shape)}")
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or initial_state.dtype != torch.float32:
            raise TypeError(f"initial_state must be a float32 tensor, got {getattr(initial_state, 'dtype', None)}")
        if initial_state.shape != (B, H, K, v.shape[-1]) or initial_state.device != q.device:
            raise ValueError(
                f"initial_state must be [B, H, K, V] = [{B}, {H}, {K}, {v.shape[-1]}] on {q.device}, "
                f"got {tuple(initial_state.shape)} on {initial_state.device}"
            )
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")


def _check_kernel_dims(q, v) -> None:
    K, V = q.shape[-1], v.shape[-1]
    if not (MIN_HEAD_DIM <= K <= MAX_KEY_DIM and V >= MIN_HEAD_DIM):
        raise ValueError(
            f"the kernels take {MIN_HEAD_DIM} ≤ K ≤ {MAX_KEY_DIM} and V ≥ {MIN_HEAD_DIM}, got K = {K}, V = {V}"
        )


class GatedDeltaRuleFunction(torch.autograd.Function):
    """The chunked kernels as one differentiable op. Saves only the inputs: the backward recomputes the
    chunk intermediates (cheaper to redo than to keep, as in fla)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state):
        from glmkit.kernels.delta_rule import chunk_gated_delta_rule_fwd

        o, final_state = chunk_gated_delta_rule_fwd(q, k, v, g, beta, scale, initial_state, output_final_state)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale = scale
        return o, final_state

    @staticmethod
    def backward(ctx, do, dht):
        from glmkit.kernels.delta_rule import chunk_gated_delta_rule_bwd

        q, k, v, g, beta, initial_state = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = chunk_gated_delta_rule_bwd(
            q, k, v, g, beta, ctx.scale, initial_state, do.contiguous(), None if dht is None else dht.contiguous()
        )
        return dq, dk, dv, dg, dbeta, None, dh0, None


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The gated delta rule over a whole sequence (training, prefill): ``gated_delta_rule_reference``'s result,
    differentiable in q, k, v, g, beta and initial_state, on the chunked Triton kernels where ``glmkit.backend``
    resolves to "triton" (the chunk reference otherwise). g [B, T, H] is Gated DeltaNet, g [B, T, H, K] KDA;
    g = 0 is DeltaNet. Returns (o [B, T, H, V] in q's dtype, final state [B, H, K, V] fp32 or None)."""
    _check(q, k, v, g, beta, initial_state, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    path = "triton" if backend.resolve(q) == "triton" else "torch"
    backend.record("delta_rule", path)
    if path == "torch":
        return chunk_gated_delta_rule_reference(q, k, v, g, beta, scale, initial_state, output_final_state)
    _check_kernel_dims(q, v)
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    initial_state = None if initial_state is None else initial_state.contiguous()
    return GatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state, output_final_state)


@torch.no_grad()
def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """Decode: a few tokens (T ≥ 1, usually 1) of the recurrence from ``state`` [B, H, K, V] fp32, which is
    updated in place (the fused recurrent kernel reads and writes it once). Inference only (no autograd).
    Shapes as ``gated_delta_rule``; returns o [B, T, H, V] in q's dtype."""
    _check(q, k, v, g, beta, state, scale)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    path = "triton" if backend.resolve(q) == "triton" else "torch"
    backend.record("delta_rule_step", path)
    if path == "torch":
        o, final_state = gated_delta_rule_reference(q, k, v, g, beta, scale, state, True)
        state.copy_(final_state)
        return o
    _check_kernel_dims(q, v)
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    from glmkit.kernels.delta_rule import fused_recurrent_gated_delta_rule

    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    return fused_recurrent_gated_delta_rule(q, k, v, g, beta, state, scale)
