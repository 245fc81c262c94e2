"""Exercise 07 — the gated delta rule: its recurrence, the UT transform of a chunk, the chunked forward, and a
Triton kernel for the decode step.

Lesson 07 wrote each recurrence for one head and derived the chunked form on paper. Here you write the versions a
library needs. Layouts are fla's and Hugging Face's (and glmkit's): q, k [B, T, H, K], v [B, T, H, V], beta
[B, T, H]; the state H of each head is a K × V matrix, [B, H, K, V] for a batch, in float32.

1. ``gated_delta_rule_recurrent`` — every head at once, one token at a time, for the three members of the family:

       g is None          DeltaNet         (no decay)
       g [B, T, H]        Gated DeltaNet   H ← exp(g_t) · H            one decay per head and token
       g [B, T, H, K]     KDA              H ← Diag(exp(g_t)) · H      row c of H decays by exp(g_t[c])

   then, for every token t, in this order:

       decay H (as above)
       u_t = β_t (v_t − Hᵀ k_t)              the error of the memory's prediction for k_t, times the step β_t
       H   ← H + k_t u_tᵀ
       o_t = Hᵀ (q_t · scale)                scale = K^-½ when None

2. ``ut_transform`` — the chunk's UT transform (scalar gate). Inside a chunk of C tokens (rows r, j), with G the
   in-chunk cumulative sum of the log-decay (G_r = g_1 + … + g_r; G = 0 for DeltaNet):

       A_rj = β_r (k_r · k_j) exp(G_r − G_j)    for j < r, else 0        strictly lower triangular, [C, C]
       T    = (I + A)⁻¹                                                 unit lower triangular
       W    = T · diag(β) · (K ⊙ exp(G)),   U = T · diag(β) · V

   Then the chunk's true writes from a start state H₀ are U − W H₀ (lesson 07, section 4). Compute T by forward
   substitution: row r of T needs only rows j < r. Mind the exponentials: exp(G_r − G_j) ≤ 1 for j ≤ r when every
   g ≤ 0, but exp(G_r) / exp(G_j) overflows (and so does exp(G_r − G_j) for j > r) once the decays are strong.

3. ``chunk_gated_delta_rule`` — the chunked forward for a scalar gate (g [B, T, H]), built on your ``ut_transform``:
   pad T up to a multiple of the chunk with tokens that change nothing (k = v = 0, β = 0, g = 0), then for every
   chunk n, in order, with Γ_rj = exp(G_r − G_j) for j ≤ r (else 0) and H the state at the chunk's start:

       V' = U − W H
       O  = scale · (Q ⊙ exp(G)) H + (scale · Q Kᵀ ⊙ Γ) V'
       H  ← exp(G_C) H + (K ⊙ exp(G_C − G))ᵀ V'                          G_C: the chunk's last entry

   It must give the recurrence's numbers (to float32 round-off) for any T, chunk size and initial state.

4. The decode step in Triton: ``recurrent_step_kernel`` runs a few tokens of the recurrence (part 1) for one
   (batch, head) pair with the state tile in registers — the whole [K, V] state read once and written once —
   and ``recurrent_step`` launches it. K and V need not be powers of two (mask them).

The notebook ex07.ipynb walks through the parts; write them here, then run ``self_check()`` there (or
``python -m glmkit.grading check`` in this folder). Do not import ``glmkit.ops.delta_rule``,
``glmkit.kernels.delta_rule`` or the delta-rule mixers: they are the references you are re-implementing, and the
grader does not make them importable (such a submission scores zero). torch, triton and plain Python are fine.

Without a GPU the kernel runs under the Triton interpreter (exact, slow: keep test shapes small). The lines below
select it before triton is imported; on a CUDA machine the same code compiles natively.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Part 1 — the recurrence, every head at once
# ----------------------------------------------------------------------------------------------------


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule, token by token (see the module docstring, part 1).

    q, k:          [B, T, H, K] float32; v [B, T, H, V] float32; beta [B, T, H] float32.
    g:             None (DeltaNet), [B, T, H] (Gated DeltaNet) or [B, T, H, K] (KDA): the log-decay, float32.
    scale:         multiplies q; None means K ** -0.5.
    initial_state: [B, H, K, V] float32 (do not change it in place), or None for zeros.
    Returns ``(o [B, T, H, V], final_state [B, H, K, V])``, both float32.
    """
    # BEGIN SOLUTION
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    if initial_state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    else:
        state = initial_state.clone()
    outputs = []
    for t in range(T):
        if g is not None:
            decay = g[:, t].exp()  # [B, H] or [B, H, K]
            state = state * (decay[:, :, None, None] if g.dim() == 3 else decay[..., None])
        kt, qt = k[:, t], q[:, t] * scale  # [B, H, K]
        prediction = torch.einsum("bhkv,bhk->bhv", state, kt)
        u = beta[:, t, :, None] * (v[:, t] - prediction)  # [B, H, V]
        state = state + kt[..., :, None] * u[..., None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", state, qt))
    return torch.stack(outputs, dim=1), state
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 2 — the UT transform of a chunk
# ----------------------------------------------------------------------------------------------------


def ut_transform(
    k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, G: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """W and U of chunks of C tokens (see the module docstring, part 2).

    k:    [..., C, K] float32 keys of the chunk(s) (any leading dims, e.g. [B, H, N] for N chunks, or none).
    v:    [..., C, V] float32 values; beta [..., C] float32 write strengths.
    G:    [..., C] float32, the in-chunk cumulative log-decay (non-increasing when every g ≤ 0; zeros: DeltaNet).
    Returns ``(W [..., C, K], U [..., C, V])``, float32.
    """
    # BEGIN SOLUTION
    C = k.shape[-2]
    tril = torch.ones(C, C, dtype=torch.bool, device=k.device).tril(-1)
    gap = (G[..., :, None] - G[..., None, :]).masked_fill(~tril, float("-inf"))  # G_r − G_j, j < r only
    A = beta[..., :, None] * (k @ k.transpose(-1, -2)) * gap.exp()
    T = torch.zeros_like(A)  # forward substitution: (I + A) T = I, so T = I − A T, row by row from the top
    eye = torch.eye(C, dtype=k.dtype, device=k.device)
    for r in range(C):
        T[..., r, :] = eye[r] - (A[..., r, :, None] * T).sum(-2)  # rows j ≥ r of T are still 0
    W = T @ (beta[..., None] * k * G[..., None].exp())
    U = T @ (beta[..., None] * v)
    return W, U
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 3 — the chunked forward
# ----------------------------------------------------------------------------------------------------


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated DeltaNet over a whole sequence, chunk by chunk (see the module docstring, part 3).

    Shapes and dtypes as ``gated_delta_rule_recurrent``, with g [B, T, H] (a scalar gate; zeros: DeltaNet) and
    chunk_size >= 1 (T need not be a multiple of it). Use your ``ut_transform``.
    Returns ``(o [B, T, H, V], final_state [B, H, K, V])``, float32.
    """
    # BEGIN SOLUTION
    B, T, H, K = q.shape
    Vd = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    C, pad = chunk_size, (-T) % chunk_size

    def chunks(x):  # [B, T, H, ...] → [B, H, N, C, ...], padded with zeros
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, 0, pad))
        return x.unflatten(1, (-1, C)).movedim(3, 1)

    qc, kc, vc, gc, bc = chunks(q), chunks(k), chunks(v), chunks(g), chunks(beta)
    G = gc.cumsum(-1)  # [B, H, N, C]
    W, U = ut_transform(kc, vc, bc, G)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    Gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    state = q.new_zeros(B, H, K, Vd) if initial_state is None else initial_state.clone()
    outs = []
    for n in range(qc.shape[2]):
        Gn, qn, kn = G[:, :, n], qc[:, :, n] * scale, kc[:, :, n]
        v_new = U[:, :, n] - W[:, :, n] @ state
        outs.append((qn * Gn[..., None].exp()) @ state + ((qn @ kn.transpose(-1, -2)) * Gamma[:, :, n]) @ v_new)
        last = Gn[..., -1:]  # [B, H, 1]
        state = last[..., None].exp() * state + (kn * (last - Gn)[..., None].exp()).transpose(-1, -2) @ v_new
    o = torch.stack(outs, dim=2).flatten(2, 3)[:, :, :T]  # [B, H, T, V]
    return o.transpose(1, 2), state
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# Part 4 — the decode step, in Triton
# ----------------------------------------------------------------------------------------------------


@triton.jit
def recurrent_step_kernel(
    Q,  # pointer: q [B, T, H, K] float32, contiguous (k the same)
    Kp,  # pointer: k
    Vp,  # pointer: v [B, T, H, V] float32
    G,  # pointer: g [B, T, H] (PER_CHANNEL False) or [B, T, H, K] (PER_CHANNEL True), float32
    BETA,  # pointer: beta [B, T, H] float32
    S,  # pointer: state [B, H, K, V] float32, read at the start and overwritten at the end (in place)
    O,  # pointer: o [B, T, H, V] float32 (arbitrary values on entry)
    scale,  # float: multiplies q
    T,  # tokens
    H,  # heads
    K: tl.constexpr,  # key size
    V: tl.constexpr,  # value size
    BK: tl.constexpr,  # a power of two >= K
    BV: tl.constexpr,  # a power of two >= V
    PER_CHANNEL: tl.constexpr,  # KDA's gate (one decay per key channel) or Gated DeltaNet's (one per head)
):
    """Program p runs batch b = p // H, head h = p % H: load its [K, V] state tile once (masked: rows c >= K and
    columns >= V are padding), then for each token t in order: decay the tile, u = β (v − Σ_c tile[c, :] k[c]),
    tile += k[:, None] u[None, :], store o = Σ_c tile[c, :] q[c] · scale; finally store the tile back into S.
    Element (b, t, h, c) of q is at ((b·T + t)·H + h)·K + c; state element (b, h, c, j) at ((b·H + h)·K + c)·V + j."""
    # BEGIN SOLUTION
    pid = tl.program_id(0)
    b, h = pid // H, pid % H
    ck, cv = tl.arange(0, BK), tl.arange(0, BV)
    mk, mv = ck < K, cv < V
    tile_ptr = S + (pid * K + ck[:, None]) * V + cv[None, :]
    tile = tl.load(tile_ptr, mask=mk[:, None] & mv[None, :], other=0.0)
    for t in range(T):
        row = (b * T + t) * H + h  # the token's (b, t, h) index
        kt = tl.load(Kp + row * K + ck, mask=mk, other=0.0)
        qt = tl.load(Q + row * K + ck, mask=mk, other=0.0)
        vt = tl.load(Vp + row * V + cv, mask=mv, other=0.0)
        if PER_CHANNEL:
            tile = tile * tl.exp(tl.load(G + row * K + ck, mask=mk, other=0.0))[:, None]
        else:
            tile = tile * tl.exp(tl.load(G + row))
        u = tl.load(BETA + row) * (vt - tl.sum(tile * kt[:, None], axis=0))
        tile = tile + kt[:, None] * u[None, :]
        tl.store(O + row * V + cv, tl.sum(tile * qt[:, None], axis=0) * scale, mask=mv)
    tl.store(tile_ptr, tile, mask=mk[:, None] & mv[None, :])
    # END SOLUTION


def recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A few decode tokens of Gated DeltaNet (g [B, T, H]) or KDA (g [B, T, H, K]) from ``state`` [B, H, K, V],
    which is updated in place. All float32. Returns ``(o [B, T, H, V], state)`` (the same state tensor).

    Given: the checks of the arguments, the output buffer and the sizes. Yours: the launch, one program per
    (batch, head) pair.
    """
    if g.dim() not in (3, 4) or not all(t.dtype == torch.float32 for t in (q, k, v, g, beta, state)):
        raise ValueError("recurrent_step takes float32 tensors and g [B, T, H] or [B, T, H, K]")
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    B, T, H, K = k.shape
    V = v.shape[-1]
    scale = float(K**-0.5 if scale is None else scale)
    o = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    BK, BV = triton.next_power_of_2(K), triton.next_power_of_2(V)
    # BEGIN SOLUTION
    recurrent_step_kernel[(B * H,)](
        q, k, v, g, beta, state, o, scale, T, H, K=K, V=V, BK=BK, BV=BV, PER_CHANNEL=g.dim() == 4
    )
    # END SOLUTION
    return o, state
